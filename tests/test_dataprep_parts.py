"""The parts of the data-preparation pipeline on their own: readers, cleaning, sample building, manifest, CLI checks.

Fast (no Beam run): real files from the bundled sample and the broken corpora.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dataprep import build_mixture, documents, manifest, readers, records, samples

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "dataprep" / "sample_data"
BAD = REPO / "tests" / "data" / "bad_corpora"
MB = 1 << 20


def read(path: Path, source: str = "c4", max_bytes: int = 8 * MB) -> list:
    return list(readers.read_records(source, str(path), lambda name: open(name, "rb"), max_bytes))


def outcomes(items: list) -> list[tuple[int, str]]:
    return [(item.line, item.reason if isinstance(item, records.BadRecord) else "record") for item in items]


def test_truncated_gzip_keeps_the_complete_lines_before_the_break():
    assert outcomes(read(BAD / "c4-truncated.json.gz")) == [(1, "record"), (2, "record"), (3, "record"),
                                                            (4, records.TRUNCATED_STREAM)]


def test_truncated_zstd_is_reported_not_read_as_a_short_file():
    assert outcomes(read(BAD / "books-truncated.jsonl.zst", "books")) == [(1, records.TRUNCATED_STREAM)]


def test_a_line_over_the_limit_is_skipped_and_reading_goes_on(tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    good = json.dumps({"text": "a short document"}).encode()
    huge = gzip.decompress((BAD / "c4-one-huge-line.json.gz").read_bytes()).rstrip(b"\n")
    path.write_bytes(gzip.compress(good + b"\n" + huge + b"\n" + good))  # no newline at the very end
    assert outcomes(read(path)) == [(1, "record"), (2, records.RECORD_TOO_LARGE), (3, "record")]
    assert outcomes(read(path, max_bytes=20 * MB)) == [(1, "record"), (2, "record"), (3, "record")]


def test_lines_split_across_chunks_are_joined():
    chunks = [b'{"text": "one"}\n{"te', b'xt": "t', b'wo"}\n\n', b'{"text": "three"}']
    assert list(readers._lines(iter(chunks), max_bytes=100)) == [
        (1, b'{"text": "one"}'), (2, b'{"text": "two"}'), (3, b""), (4, b'{"text": "three"}')]
    assert list(readers._lines(iter(chunks), max_bytes=12)) == [(1, None), (2, None), (3, b""), (4, None)]


def test_concatenated_gzip_members_and_zstd_frames_are_all_read(tmp_path):
    gz = tmp_path / "two.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n') + gzip.compress(b'{"text": "b"}\n'))
    zst = tmp_path / "two.jsonl.zst"
    compressor = zstandard.ZstdCompressor()
    zst.write_bytes(compressor.compress(b'{"text": "a"}\n') + compressor.compress(b'{"text": "b"}\n'))
    for path in (gz, zst):
        assert [item.payload for item in read(path)] == [b'{"text": "a"}', b'{"text": "b"}']


def test_parquet_problems_are_file_level_records():
    assert outcomes(read(BAD / "not-a-parquet.parquet", "wikipedia")) == [(0, records.NOT_PARQUET)]
    assert outcomes(read(BAD / "wikipedia-no-text-column.parquet", "wikipedia")) == [(0, records.MISSING_TEXT_COLUMN)]
    rows = read(next((SAMPLE / "wikipedia").rglob("*.parquet")), "wikipedia")
    assert len(rows) == 61 and set(rows[0].payload) == {"text"} and isinstance(rows[0].payload["text"], bytes)


def test_unknown_file_kinds_are_reported():
    assert outcomes(read(BAD / "README.md")) == [(0, records.UNSUPPORTED_FORMAT)]
    assert readers.file_layout("x/c4-train.00000-of-01024.json.gz") == ("jsonl", "gzip")
    assert readers.file_layout("x/books.00.jsonl.zst") == ("jsonl", "zstd")
    assert readers.file_layout("x/14263.txt") == ("text", None)
    assert readers.file_layout("x/train-00000-of-00041.parquet") == ("parquet", None)


def test_each_bad_line_gets_its_reason():
    parsed = [documents.parse_record(item) for item in read(BAD / "c4-badlines.json.gz")]
    assert [(item.line, item.reason) for item in parsed if isinstance(item, records.BadRecord)] == [
        (2, records.INVALID_JSON), (3, records.MISSING_TEXT), (4, records.NULL_TEXT), (5, records.EMPTY_TEXT),
        (6, records.EMPTY_TEXT), (7, records.NOT_AN_OBJECT), (9, records.INVALID_UTF8)]
    good = [item for item in parsed if isinstance(item, records.Document)]
    assert [item.line for item in good] == [1, 8, 10]
    assert all(item.digest == documents.content_digest(item.text) for item in good)
    number = records.RawRecord("c4", "f.jsonl", 1, b'{"text": 5}')
    assert documents.parse_record(number).reason == records.TEXT_NOT_STRING


def test_gutenberg_header_and_licence_footer_are_stripped():
    raw = (SAMPLE / "books/pg19/train/972.txt").read_text(encoding="utf-8")
    body = documents.clean_text("books", raw)
    assert "START OF THIS PROJECT GUTENBERG" in raw and "Project Gutenberg" not in body
    assert body.startswith("Produced by Aloysius") and "THE DEVIL'S DICTIONARY" in body[:200]
    assert body.endswith("the domestic cow sheds its horn every two years.")
    # The two-line marker of another book, and text without markers, which is kept whole.
    split_marker = documents.clean_text("books", (SAMPLE / "books/pg19/train/14881.txt").read_text(encoding="utf-8"))
    assert split_marker.startswith("E-text prepared by") and "START OF THE PROJECT" not in split_marker
    assert split_marker.endswith("great ash-heaps that were left by the stupendous\nevent.")
    assert documents.strip_gutenberg_boilerplate("Chapter 1\nIt was a dark night.") == "Chapter 1\nIt was a dark night."


def test_split_and_partition_come_from_independent_hash_bits():
    digests = [documents.content_digest(str(number)) for number in range(4000)]
    fractions = np.array([documents.digest_fraction(digest) for digest in digests])
    partitions = np.array([documents.partition_of(digest, 8) for digest in digests])
    assert 0 <= fractions.min() and fractions.max() < 1 and abs(fractions.mean() - 0.5) < 0.02
    held_out = partitions[fractions < 0.1]
    assert len(np.unique(held_out)) == 8  # held-out documents are spread over every partition


@pytest.mark.parametrize("seq_len", [128, 2048, 8192, 32768])
def test_any_sequence_length(seq_len):
    rng = np.random.default_rng(seq_len)
    body = seq_len - 2
    parts = [rng.integers(1000, 30000, size=size, dtype=np.uint16) for size in (5, body, 3 * body + 9)]
    natural = list(samples.natural_samples(parts, seq_len=seq_len, min_tokens=8))
    concatenated = list(samples.concatenated_samples(parts, seq_len=seq_len))
    assert max(len(sample) for sample in natural) == seq_len and len(natural[0]) == 5 + 2
    assert len(natural) == 1 + 1 + 4 and len(natural[-1]) == 9 + 2
    assert sum(len(sample) - 2 for sample in natural) == sum(len(ids) for ids in parts)
    assert {len(sample) for sample in concatenated} == {seq_len}
    assert len(concatenated) == (sum(len(ids) for ids in parts) + len(parts) - 1) // body


def test_natural_samples_chunk_long_documents():
    long_document = np.arange(1000, 1000 + 300, dtype=np.uint16)
    short_tail = np.arange(2000, 2000 + 130, dtype=np.uint16)   # 126 + a 4-token tail under min_tokens
    built = list(samples.natural_samples([long_document, short_tail], seq_len=128, min_tokens=8))
    assert [len(sample) for sample in built] == [128, 128, 48 + 2, 128]
    assert all(sample[0] == 101 and sample[-1] == 102 for sample in built)
    assert np.array_equal(np.concatenate([sample[1:-1] for sample in built[:3]]), long_document)
    assert np.array_equal(built[3][1:-1], short_tail[:126])


def test_concatenated_samples_are_full_length_and_keep_document_order():
    parts = [np.full(100, 1000, np.uint16), np.full(100, 2000, np.uint16), np.full(100, 3000, np.uint16)]
    built = list(samples.concatenated_samples(parts, seq_len=128))
    assert [len(sample) for sample in built] == [128, 128]     # 302 tokens with separators: 2 x 126, tail dropped
    joined = np.concatenate([sample[1:-1] for sample in built])
    expected = np.concatenate([parts[0], [102], parts[1], [102], parts[2]]).astype(np.uint16)[:252]
    assert np.array_equal(joined, expected)
    assert list(samples.concatenated_samples([], seq_len=128)) == []


def valid_manifest() -> dict:
    streams = []
    for kind in manifest.KINDS:
        for source in manifest.SOURCES:
            name = manifest.stream_name(source, kind)
            streams.append({"name": name, "source": source, "kind": kind,
                            "proportion": manifest.DEFAULT_PROPORTIONS[name],
                            "splits": {split: {"path": f"{split}/{name}", "samples": 1, "tokens": 128}
                                       for split in manifest.SPLITS}})
    return {"format": manifest.FORMAT, "tokenizer": "bert-base-uncased", "seq_len": 128,
            "special_tokens": dict(manifest.SPECIAL_TOKENS), "streams": streams}


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="m2-mixture/0"), "'format'"),
    (lambda m: m["streams"][0].update(proportion=0.5), "sum to"),
    (lambda m: m["streams"][1]["splits"]["train"].update(path="/abs/path"), "streams[1].splits.train.path"),
    (lambda m: m["streams"][2].update(kind="long"), "streams[2].kind"),
    (lambda m: m["streams"][3]["splits"].pop("validation"), "streams[3].splits"),
    (lambda m: m["streams"][4]["splits"]["validation"].update(samples=-1), "samples"),
])
def test_read_manifest_names_the_file_and_the_bad_key(tmp_path, change, message):
    broken = valid_manifest()
    change(broken)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(manifest.ManifestError, match=re.escape(message)) as raised:
        manifest.read_manifest(path)
    assert str(path) in str(raised.value)


def test_streams_leave_out_empty_splits_with_their_proportions(tmp_path):
    written = valid_manifest()
    written["streams"][0]["splits"]["validation"]["samples"] = 0
    path = tmp_path / "manifest.json"
    path.write_text(manifest.manifest_json(written))
    assert manifest.read_manifest(path) == written
    train, validation = manifest.streams(path, "train"), manifest.streams(path, "validation")
    assert [stream.proportion for stream in train] == [entry["proportion"] for entry in written["streams"]]
    assert len(validation) == 5
    assert train[0].local == str(tmp_path / "train" / "c4-natural")


def test_manifest_of_custom_proportions_leaves_out_streams_at_zero():
    from dataprep import assemble

    proportions = {**manifest.DEFAULT_PROPORTIONS, "books-natural": 0.0, "books-concat": 0.0,
                   "c4-natural": 0.2, "c4-concat": 0.47}
    rows = [{"split": "train", "stream": "c4-concat", "partition": 3, "documents": 2, "document_tokens": 300,
             "samples": 2, "tokens": 4096}]
    built = assemble.build_manifest(2048, proportions, assemble.stream_totals(rows))
    assert [entry["name"] for entry in built["streams"]] == ["c4-natural", "wikipedia-natural", "c4-concat",
                                                             "wikipedia-concat"]
    assert built["streams"][2]["splits"]["train"] == {"path": "train/c4-concat", "samples": 2, "tokens": 4096}
    assert json.loads(manifest.manifest_json(built))["seq_len"] == 2048


@pytest.mark.parametrize("arguments, message", [
    (["--proportions", "c4-natural=0.5"], "sum to"),
    (["--c4", str(SAMPLE / "c4")], "no --wikipedia input"),
    (["--c4", str(SAMPLE / "c4"), "--wikipedia", str(SAMPLE / "wikipedia"), "--books", str(SAMPLE / "books" / "*.epub")],
     "--books " + str(SAMPLE / "books" / "*.epub") + ": no file matches"),
    (["--proportions", "c4-long=0.1"], "unknown stream names"),
])
def test_cli_rejects_arguments_that_cannot_work(tmp_path, capsys, arguments, message):
    assert build_mixture.main([*arguments, "--out", str(tmp_path / "never")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_mds_shards_are_the_bytes_streaming_writes_from_arrays_and_strings(tmp_path):
    from streaming import MDSWriter, StreamingDataset

    from dataprep import transforms

    rng = np.random.default_rng(3)
    parts = [rng.integers(1000, 30000, size=size, dtype=np.uint16) for size in (5, 126, 300, 40, 126)]
    built = list(samples.natural_samples(parts, seq_len=128, min_tokens=8))
    assert transforms.write_mds(iter(built), "books", "natural", str(tmp_path / "ours")) == (
        len(built), sum(len(sample) for sample in built))
    with MDSWriter(out=str(tmp_path / "plain"), columns=transforms.MDS_COLUMNS, compression="zstd") as writer:
        for sample in built:
            writer.write({"input_ids": sample, "source": "books", "kind": "natural"})
    ours = {path.name: path.read_bytes() for path in (tmp_path / "ours").iterdir()}
    assert ours == {path.name: path.read_bytes() for path in (tmp_path / "plain").iterdir()}
    dataset = StreamingDataset(local=str(tmp_path / "ours"), shuffle=False, batch_size=1)
    assert all(np.array_equal(dataset[index]["input_ids"], sample) for index, sample in enumerate(built))
