"""The values that flow through the data-preparation pipeline, and the reasons a record can be skipped."""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np

# Why a record or a whole file was not used. File-level reasons carry line 0.
TRUNCATED_STREAM = "truncated_stream"          # gzip/zstd stream ends before its end-of-stream marker
CORRUPT_STREAM = "corrupt_stream"              # compressed data that cannot be decoded at all
RECORD_TOO_LARGE = "record_too_large"          # a line (or text file) over --max-record-mb
INVALID_UTF8 = "invalid_utf8"                  # bytes that are not UTF-8 (in any reader)
UNPAIRED_SURROGATE = "unpaired_surrogate"      # a JSON "\ud800" escape: a string no UTF-8 can hold
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"                # a JSON value that is not an object, e.g. [1, 2, 3]
MISSING_TEXT = "missing_text"                  # no `text` field
NULL_TEXT = "null_text"
TEXT_NOT_STRING = "text_not_string"
EMPTY_TEXT = "empty_text"                      # empty, or whitespace only (after cleaning)
NOT_PARQUET = "not_parquet"
MISSING_TEXT_COLUMN = "missing_text_column"
UNSUPPORTED_FORMAT = "unsupported_format"      # a file name the readers do not know
BAD_INPUT_REASONS = (TRUNCATED_STREAM, CORRUPT_STREAM, RECORD_TOO_LARGE, INVALID_UTF8, UNPAIRED_SURROGATE,
                     INVALID_JSON, NOT_AN_OBJECT, MISSING_TEXT, NULL_TEXT, TEXT_NOT_STRING, EMPTY_TEXT, NOT_PARQUET,
                     MISSING_TEXT_COLUMN, UNSUPPORTED_FORMAT)

# Good documents that are still left out, by design.
DUPLICATE = "duplicate"                        # exact copy (same content hash) of a document kept elsewhere
TOO_SHORT = "too_short"                        # fewer tokens than --min-tokens
# Not a skip: one count per document read, so the summary can give documents per file.
DOCUMENT = "document"


class RawRecord(NamedTuple):
    """One record as read from a file: a JSON line (bytes), a whole text file (bytes) or a parquet row (dict;
    a string `text` cell as its stored bytes, decoded in `documents.parse_record` like every other text)."""

    source: str
    file: str
    line: int             # 1-based line (JSON lines), row (parquet), or 1 for a whole text file
    payload: Union[bytes, dict]


class BadRecord(NamedTuple):
    """A record or a file that could not be used, with the reason and a short human-readable detail."""

    source: str
    file: str
    line: int             # 0 when the whole file (or its remainder) is affected
    reason: str
    detail: str


class Document(NamedTuple):
    """A cleaned document and its content hash (hex sha256 of the UTF-8 text)."""

    source: str
    file: str
    line: int
    text: str
    digest: str


class TokenizedDocument(NamedTuple):
    """A document's token ids (no special tokens), its source and content hash."""

    source: str
    digest: str
    ids: np.ndarray       # (n_tokens,) uint16


class Tally(NamedTuple):
    """One event to count in the summary: a document read, or a record skipped for `outcome`."""

    source: str
    file: str
    outcome: str          # DOCUMENT, a BAD_INPUT_REASONS entry, DUPLICATE or TOO_SHORT
    line: int
    detail: str


class BadInputError(ValueError):
    """Raised in --strict mode on the first bad record; the message names the file, line and reason."""


def bad_input_message(record: BadRecord) -> str:
    """`file line N: reason (detail)`, the form used in logs, the summary and --strict errors."""
    where = f"{record.file} line {record.line}" if record.line else record.file
    return f"{where}: {record.reason} ({record.detail})"
