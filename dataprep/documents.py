"""From raw records to clean documents: validation, per-source cleaning, content hash, split and partition."""

from __future__ import annotations

import hashlib
import json
import re

from .records import (EMPTY_TEXT, INVALID_JSON, INVALID_UTF8, MISSING_TEXT, NOT_AN_OBJECT, NULL_TEXT,
                      TEXT_NOT_STRING, BadRecord, Document, RawRecord)

# Project Gutenberg wraps each book in a header ending with a "*** START OF ..." line (sometimes split over
# two lines) and a licence footer starting with "End of [the] Project Gutenberg..." or "*** END OF ...".
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG EBOOK[^\n]*(\n[^\n]*)?\*{3}[ \t\r]*$",
                             re.IGNORECASE | re.MULTILINE)
GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK|End of (the )?Project Gutenberg)",
                           re.IGNORECASE | re.MULTILINE)
HASH_SPACE = float(1 << 64)


def parse_record(record: RawRecord) -> Document | BadRecord:
    """Validate one raw record and return its cleaned document, or the reason it cannot be used."""
    def bad(reason: str, detail: str) -> BadRecord:
        return BadRecord(record.source, record.file, record.line, reason, detail)

    payload = record.payload
    if isinstance(payload, bytes):
        try:
            decoded = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            return bad(INVALID_UTF8, str(error))
        if record.file.lower().endswith((".txt", ".txt.gz", ".txt.zst", ".txt.zstd")):
            payload = {"text": decoded}
        else:
            try:
                payload = json.loads(decoded)
            except json.JSONDecodeError as error:
                return bad(INVALID_JSON, str(error))
    if not isinstance(payload, dict):
        return bad(NOT_AN_OBJECT, f"a JSON {type(payload).__name__}, not an object")
    if "text" not in payload:
        return bad(MISSING_TEXT, f"fields are {sorted(payload)}")
    text = payload["text"]
    if text is None:
        return bad(NULL_TEXT, "text is null")
    if not isinstance(text, str):
        return bad(TEXT_NOT_STRING, f"text is a {type(text).__name__}")
    text = clean_text(record.source, text)
    if not text:
        return bad(EMPTY_TEXT, "no text left after stripping whitespace" +
                   (" and Project Gutenberg boilerplate" if record.source == "books" else ""))
    return Document(record.source, record.file, record.line, text, content_digest(text))


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
