"""Readers for the upstream corpus layouts: JSON lines (plain, gzip, zstd), parquet, and one text file per book.

Each reader turns one file into `RawRecord`s and, for what cannot be read, `BadRecord`s: a truncated
gzip/zstd stream keeps every complete line before the break, an over-long line is skipped without holding
it in memory, and a file that is not parquet (or lacks a `text` column) is reported instead of failing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Union

from .records import (CORRUPT_STREAM, MISSING_TEXT_COLUMN, NOT_PARQUET, RECORD_TOO_LARGE, TRUNCATED_STREAM,
                      UNSUPPORTED_FORMAT, BadRecord, RawRecord)

CHUNK_BYTES = 1 << 20
# Compressed input is read in smaller steps: each step's output grows with the compression ratio, which for
# repetitive text (like a 10 MB line of one word) reaches the hundreds.
COMPRESSED_CHUNK_BYTES = 1 << 16
PARQUET_BATCH_ROWS = 256
COMPRESSION_SUFFIXES = ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd"))
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around deflate data

Output = Union[RawRecord, BadRecord]


class TruncatedStreamError(EOFError):
    """A compressed stream that ends before its end-of-stream marker."""


def file_layout(path: str) -> tuple[str, str | None] | None:
    """(`jsonl` | `parquet` | `text`, codec or None) from the file name, or None for an unknown kind of file."""
    name = path.lower()
    codec = None
    for suffix, suffix_codec in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name, codec = name[: -len(suffix)], suffix_codec
            break
    if name.endswith((".json", ".jsonl")):
        return "jsonl", codec
    if name.endswith(".txt"):
        return "text", codec
    if name.endswith(".parquet") and codec is None:
        return "parquet", None
    return None


def read_records(source: str, path: str, open_file: Callable[[str], BinaryIO], max_record_bytes: int) -> Iterator[Output]:
    """Every record of one file, in file order, then the file's problems (if any) as `BadRecord`s."""
    layout = file_layout(path)
    if layout is None:
        yield BadRecord(source, path, 0, UNSUPPORTED_FORMAT,
                        "expected .json/.jsonl (optionally .gz/.zst), .txt or .parquet")
        return
    kind, codec = layout
    with open_file(path) as handle:
        if kind == "parquet":
            yield from _parquet_rows(source, path, handle)
        elif kind == "jsonl":
            yield from _json_lines(source, path, _decompressed_chunks(handle, codec), max_record_bytes)
        else:
            yield from _whole_text(source, path, _decompressed_chunks(handle, codec), max_record_bytes)


def _decompressed_chunks(handle: BinaryIO, codec: str | None) -> Iterator[bytes]:
    """Decompressed bytes in chunks; raises `TruncatedStreamError` or `ValueError` (corrupt data) at the break."""
    if codec is None:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
        return
    import zstandard

    # Decompression objects rather than file wrappers: `gzip.GzipFile.read` drops what it decoded when it
    # meets a truncated stream, and zstandard's stream reader ends quietly there; `eof` tells a complete
    # stream from a cut one. Several concatenated members or frames continue on `unused_data`.
    def start():
        return zlib.decompressobj(GZIP_WBITS) if codec == "gzip" else zstandard.ZstdDecompressor().decompressobj()

    decompressor, fed = start(), False
    try:
        while data := handle.read(COMPRESSED_CHUNK_BYTES):
            while data:
                if chunk := decompressor.decompress(data):
                    yield chunk
                fed, data = True, b""
                if decompressor.eof:
                    decompressor, fed, data = start(), False, decompressor.unused_data
    except (zlib.error, zstandard.ZstdError) as error:
        raise ValueError(f"{codec}: {error}") from error
    if fed and not decompressor.eof:
        raise TruncatedStreamError(f"{codec} stream ends before its end marker")


def _lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line without newline), or None in place of a line over `max_bytes`.

    An over-long line is dropped as it streams past, so a single 10 MB line never sits in memory whole.
    A last line without a newline is yielded at the end of the stream.
    """
    pending = bytearray()
    too_long = False
    number = 1
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if not too_long:
                pending += chunk[start:end]
            yield number, None if too_long or len(pending) > max_bytes else bytes(pending)
            pending.clear()
            too_long = False
            number += 1
            start = end + 1
        if not too_long:
            pending += chunk[start:]
            if len(pending) > max_bytes:
                too_long = True
                pending.clear()
    if too_long or pending:
        yield number, None if too_long else bytes(pending)


def _json_lines(source: str, path: str, chunks: Iterator[bytes], max_bytes: int) -> Iterator[Output]:
    last_line = 0
    try:
        for last_line, line in _lines(chunks, max_bytes):
            if line is None:
                yield BadRecord(source, path, last_line, RECORD_TOO_LARGE, f"line longer than {max_bytes} bytes")
            elif line.strip():
                yield RawRecord(source, path, last_line, line)
    except TruncatedStreamError as error:
        yield BadRecord(source, path, last_line + 1, TRUNCATED_STREAM,
                        f"stream ends after line {last_line}; the incomplete rest is dropped ({error})")
    except ValueError as error:
        yield BadRecord(source, path, last_line + 1, CORRUPT_STREAM, f"undecodable after line {last_line} ({error})")


def _whole_text(source: str, path: str, chunks: Iterator[bytes], max_bytes: int) -> Iterator[Output]:
    data = bytearray()
    try:
        for chunk in chunks:
            data += chunk
            if len(data) > max_bytes:
                yield BadRecord(source, path, 1, RECORD_TOO_LARGE, f"text file longer than {max_bytes} bytes")
                return
    except TruncatedStreamError as error:
        yield BadRecord(source, path, 1, TRUNCATED_STREAM, f"compressed text file is cut short ({error})")
        return
    except ValueError as error:
        yield BadRecord(source, path, 1, CORRUPT_STREAM, str(error))
        return
    yield RawRecord(source, path, 1, bytes(data))


def _parquet_rows(source: str, path: str, handle: BinaryIO) -> Iterator[Output]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
    except (pa.ArrowInvalid, OSError) as error:
        yield BadRecord(source, path, 0, NOT_PARQUET, str(error))
        return
    names = parquet.schema_arrow.names
    if "text" not in names:
        yield BadRecord(source, path, 0, MISSING_TEXT_COLUMN, f"columns are {names}")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            texts = batch.column(0)
            # Strings as their stored bytes: parquet does not check UTF-8, and one bad cell would fail the
            # whole batch's conversion; parse_record decodes each cell and counts a bad one as a bad record.
            if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
                texts = texts.view(pa.large_binary() if pa.types.is_large_string(texts.type) else pa.binary())
            for text in texts.to_pylist():
                row += 1
                yield RawRecord(source, path, row, {"text": text})
    except (pa.ArrowException, OSError) as error:
        yield BadRecord(source, path, row + 1, CORRUPT_STREAM, f"rows after {row} unreadable ({error})")
