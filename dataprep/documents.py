"""From raw records to clean documents: validation, per-source cleaning, content hash, split and partition."""

from __future__ import annotations

import hashlib
import json
import re

from .readers import file_layout
from .records import (EMPTY_TEXT, INVALID_JSON, INVALID_UTF8, MISSING_TEXT, NOT_AN_OBJECT, NULL_TEXT,
                      TEXT_NOT_STRING, UNPAIRED_SURROGATE, BadRecord, Document, RawRecord)

# Project Gutenberg wraps each book in a header ending with a "*** START OF ..." line (sometimes split over
# two lines) and a licence footer starting with "End of [the] Project Gutenberg..." or "*** END OF ...".
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG EBOOK[^\n]*(\n[^\n]*)?\*{3}[ \t\r]*$",
                             re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK|End of (the )?Project Gutenberg)",
                           re.IGNORECASE | re.MULTILINE)
HASH_SPACE = float(1 << 64)


class _Unusable(Exception):
    """Why a record cannot be used: a bad-input reason and a detail for the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def parse_record(record: RawRecord) -> Document | BadRecord:
    """Validate one raw record and return its cleaned document, or the reason it cannot be used.

    Bytes become text, and text bytes, in exactly one place each (`_decode`, `_digest`), so every reader's
    undecodable bytes and every JSON string that is not Unicode text is a counted bad record, never a crash
    further on (in a Beam coder or the tokenizer).
    """
    try:
        text = clean_text(record.source, _record_text(record))
        if not text:
            raise _Unusable(EMPTY_TEXT, "no text left after stripping whitespace" +
                            (" and Project Gutenberg boilerplate" if record.source == "books" else ""))
        digest = _digest(text)
    except _Unusable as unusable:
        return BadRecord(record.source, record.file, record.line, unusable.reason, unusable.detail)
    return Document(record.source, record.file, record.line, text, digest)


def _record_text(record: RawRecord) -> str:
    """The `text` of a JSON line, a whole text file or a parquet row, checked to be a string."""
    payload = record.payload
    if isinstance(payload, bytes):
        decoded = _decode(payload)
        if file_layout(record.file)[0] == "text":
            return decoded
        try:
            payload = json.loads(decoded)
        except json.JSONDecodeError as error:
            raise _Unusable(INVALID_JSON, str(error)) from None
    if not isinstance(payload, dict):
        raise _Unusable(NOT_AN_OBJECT, f"a JSON {type(payload).__name__}, not an object")
    if "text" not in payload:
        raise _Unusable(MISSING_TEXT, f"fields are {sorted(payload)}")
    text = payload["text"]
    if isinstance(text, bytes):  # a parquet cell, as stored (see readers._parquet_rows)
        text = _decode(text)
    if text is None:
        raise _Unusable(NULL_TEXT, "text is null")
    if not isinstance(text, str):
        raise _Unusable(TEXT_NOT_STRING, f"text is a {type(text).__name__}")
    return text


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Unusable(INVALID_UTF8, str(error)) from None


def _digest(text: str) -> str:
    # A JSON escape can name half of a UTF-16 surrogate pair ("\ud800"): Python keeps it in the string,
    # but no UTF-8 (and no tokenizer) can take it.
    try:
        return content_digest(text)
    except UnicodeEncodeError as error:
        raise _Unusable(UNPAIRED_SURROGATE, f"U+{ord(text[error.start]):04X} at character {error.start} of the text, "
                                            f"half of a UTF-16 surrogate pair (a JSON \\u escape)") from None


def clean_text(source: str, text: str) -> str:
    """Source-specific cleaning, then surrounding whitespace removed."""
    if source == "books":
        text = strip_gutenberg_boilerplate(text)
    return text.strip()


def strip_gutenberg_boilerplate(text: str) -> str:
    """The body of a Project Gutenberg book, without its header and licence footer (text without them is kept as is)."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def content_digest(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the identity used for de-duplication, splits and partitions."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_fraction(digest: str) -> float:
    """A uniform number in [0, 1) from the first 64 bits of the digest; a document is held out when it is small."""
    return int(digest[:16], 16) / HASH_SPACE


def partition_of(digest: str, partitions: int) -> int:
    """The output partition of a document, from digest bits independent of those that choose the split."""
    return int(digest[16:32], 16) % partitions


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    `split_special_tokens`: a literal "[SEP]" or "[MASK]" in a web page is text, not a document boundary
    or a masked position.
    """
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]
