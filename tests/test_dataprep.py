"""The real mixture pipeline (Beam DirectRunner, worker processes) on the bundled sample, read back with StreamingDataset.

Pipeline runs (about 10-25 s each on 2 cores): the bundled sample with 2 workers; the same with 1 worker,
killed mid-way (a second run into the same folder is refused meanwhile) and run again; the broken corpora,
skipping (in process) and --strict (in a worker).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "dataprep" / "sample_data"
BAD = REPO / "tests" / "data" / "bad_corpora"
SEQ_LEN = 128
STREAMS = [f"{source}-{kind}" for kind in ("natural", "concat") for source in ("c4", "wikipedia", "books")]
RUN_TIMEOUT_S = 300


def run_cli(*args: str, workers: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dataprep.build_mixture", *args, f"--direct_num_workers={workers}"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check:
        assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def without_timing(summary_path: Path) -> dict:
    summary = json.loads(summary_path.read_text())
    summary.pop("timing")
    return summary


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """The bundled sample built with 2 workers: (output folder, CLI result, file digests taken before any read)."""
    out = tmp_path_factory.mktemp("mixture") / "mix"
    completed = run_cli("--out", str(out), "--seq-len", str(SEQ_LEN))
    return out, completed, file_digests(out)


@pytest.fixture(scope="module")
def source_documents():
    """Every document of the bundled sample, read here without the pipeline: source -> list of token id arrays."""
    import pyarrow.parquet as pq
    import zstandard

    from dataprep.documents import clean_text, tokenize_texts
    from model import load_tokenizer

    texts = {"c4": [], "wikipedia": [], "books": []}
    for path in sorted((SAMPLE / "c4").rglob("*.json.gz")):
        texts["c4"] += [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8")]
    for path in sorted((SAMPLE / "wikipedia").rglob("*.parquet")):
        texts["wikipedia"] += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    for path in sorted((SAMPLE / "books" / "pg19").rglob("*.txt")):
        texts["books"].append(path.read_text(encoding="utf-8"))
    with zstandard.ZstdDecompressor().stream_reader(open(SAMPLE / "books/pile-format/books.00.jsonl.zst", "rb")) as raw:
        texts["books"] += [json.loads(line)["text"] for line in io.TextIOWrapper(raw, encoding="utf-8")]
    tokenizer = load_tokenizer()
    documents = {}
    for source, raw_texts in texts.items():
        unique = sorted({clean_text(source, text) for text in raw_texts})
        ids = tokenize_texts(tokenizer, unique)
        documents[source] = [np.asarray(one, dtype=np.uint16) for one in ids]
    return documents


def read_split(out: Path, split: str) -> dict[str, list[np.ndarray]]:
    """Every sample of every stream of one split, read with `StreamingDataset` (stream name -> input_ids)."""
    from streaming import StreamingDataset

    from dataprep.manifest import read_manifest

    manifest = read_manifest(out / "manifest.json")
    samples = {}
    for entry in manifest["streams"]:
        dataset = StreamingDataset(local=str(out / entry["splits"][split]["path"]), shuffle=False, batch_size=1)
        rows = [dataset[index] for index in range(len(dataset))]
        assert {(row["source"], row["kind"]) for row in rows} <= {(entry["source"], entry["kind"])}
        samples[entry["name"]] = [row["input_ids"] for row in rows]
    return samples


@pytest.fixture(scope="module")
def read_back(mixture):
    out, _, _ = mixture
    return {split: read_split(out, split) for split in ("train", "validation")}


def test_manifest_lists_every_stream_with_counts_and_proportions(mixture, read_back):
    from dataprep.manifest import read_manifest

    out, completed, _ = mixture
    manifest = read_manifest(out / "manifest.json")
    assert manifest["seq_len"] == SEQ_LEN
    by_name = {entry["name"]: entry for entry in manifest["streams"]}
    assert sorted(by_name) == sorted(STREAMS)
    assert {name: entry["proportion"] for name, entry in by_name.items()} == {
        "c4-natural": 0.10, "wikipedia-natural": 0.10, "books-natural": 0.10,
        "c4-concat": 0.24, "wikipedia-concat": 0.23, "books-concat": 0.23}
    for split, streams in read_back.items():
        for name, samples in streams.items():
            counted = by_name[name]["splits"][split]
            assert counted["samples"] == len(samples) > 0, (split, name)
            assert counted["tokens"] == sum(len(sample) for sample in samples)
    assert f"manifest: {out / 'manifest.json'}" in completed.stdout
    assert "books-concat" in completed.stdout and "tokens/s" in completed.stdout  # the summary table


def test_sample_lengths_and_special_tokens(read_back):
    for streams in read_back.values():
        for name, samples in streams.items():
            lengths = np.array([len(sample) for sample in samples])
            assert all(sample[0] == 101 and sample[-1] == 102 and sample.dtype == np.uint16 for sample in samples)
            if name.endswith("-concat"):
                assert (lengths == SEQ_LEN).all(), name
            else:
                assert lengths.min() >= 2 + 8 and lengths.max() == SEQ_LEN, name
                assert (lengths < SEQ_LEN).any(), name  # documents (or their last chunks) shorter than the length


def test_samples_are_pieces_of_the_source_documents(read_back, source_documents):
    from model import load_tokenizer

    separator = np.array([65535], dtype=np.uint16).tobytes()  # not a token id, so no match crosses documents
    for source, documents in source_documents.items():
        joined = separator.join(ids.tobytes() for ids in documents)
        for split, streams in read_back.items():
            for kind in ("natural", "concat"):
                for sample in streams[f"{source}-{kind}"]:
                    for piece in np.split(sample[1:-1], np.flatnonzero(sample[1:-1] == 102)):
                        piece = piece[piece != 102]
                        assert piece.tobytes() in joined, (source, split, kind)
    # And the ids decode to the documents' text: the opening words of one document of each source.
    tokenizer = load_tokenizer()
    openings = {"c4": "fellowcitizens,inobediencetothewillofthepeople",
                "wikipedia": "homarusgammarus,knownastheeuropeanlobster",
                "books": "thedevil'sdictionarybyambrosebierce"}
    for source, opening in openings.items():
        decoded = [re.sub(r"\s+", "", tokenizer.decode(sample[1:-1])) for split in read_back.values()
                   for sample in split[f"{source}-natural"]]
        assert any(opening in text for text in decoded), source


def test_every_unique_document_lands_in_exactly_one_split(read_back, source_documents):
    body = SEQ_LEN - 2
    for source, documents in source_documents.items():
        first_chunks: dict[bytes, set[int]] = {}
        for index, ids in enumerate(documents):
            first_chunks.setdefault(ids[:body].tobytes(), set()).add(index)
        found = {}
        for split, streams in read_back.items():
            found[split] = set()
            for sample in streams[f"{source}-natural"]:
                found[split] |= first_chunks.get(sample[1:-1].tobytes(), set())
        assert not found["train"] & found["validation"], source
        assert found["train"] | found["validation"] == set(range(len(documents))), source
        assert found["validation"], source
    assert len(source_documents["books"]) == 8  # the PG-19 and Pile copies of the 8 books are one document each


def test_realised_mixture_matches_the_proportions(mixture):
    from streaming import StreamingDataset

    from dataprep.manifest import read_manifest, streams

    out, _, _ = mixture
    manifest_path = out / "manifest.json"
    wanted = {entry["name"]: entry["proportion"] for entry in read_manifest(manifest_path)["streams"]}
    draws = 3000
    dataset = StreamingDataset(streams=streams(manifest_path, "train"), epoch_size=draws, shuffle=True,
                               shuffle_seed=7, batch_size=1)
    counts = dict.fromkeys(wanted, 0)
    for sample in dataset:
        counts[f"{sample['source']}-{sample['kind']}"] += 1
    assert sum(counts.values()) == draws
    for name, proportion in wanted.items():
        assert abs(counts[name] / draws - proportion) <= 0.02, (name, counts[name] / draws, proportion)


def test_summary_counts_documents_and_duplicates(mixture):
    out, _, _ = mixture
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_records"] == 0 and summary["empty_streams"] == []
    assert summary["sources"]["c4"]["documents_read"] == 324
    assert summary["sources"]["wikipedia"]["documents_read"] == 122
    assert summary["sources"]["books"]["documents_read"] == 16
    assert summary["sources"]["books"]["skipped"] == {"duplicate": 8}
    for source in ("c4", "wikipedia", "books"):
        entry = summary["sources"][source]
        assert entry["documents_train"] + entry["documents_validation"] == (
            entry["documents_read"] - sum(entry["skipped"].values()))
    assert summary["timing"]["tokens_per_second"] > 0


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """A 1-worker build killed (SIGKILL, whole process group) once it has written MDS files, then run again.

    While it runs, a second build into the same folder is started (and refused).
    """
    out = tmp_path_factory.mktemp("interrupted") / "mix"
    staging, lock = Path(f"{out}.partial"), Path(f"{out}.lock")
    command = [sys.executable, "-m", "dataprep.build_mixture", "--out", str(out), "--seq-len", str(SEQ_LEN),
               "--direct_num_workers=1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not lock.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        concurrent = run_cli("--out", str(out), "--seq-len", str(SEQ_LEN), workers=1, check=False)
        while not any(staging.rglob("shard.*.mds.zstd")):
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    left_behind = {"out_exists": out.exists(), "staging_has_mds": any(staging.rglob("*.mds.zstd")),
                   "manifests": [str(path) for path in out.parent.rglob("manifest.json")],
                   "lock_holder": json.loads(lock.read_text())}
    completed = run_cli("--out", str(out), "--seq-len", str(SEQ_LEN), workers=1)
    return out, left_behind, completed, {"pid": process.pid, "result": concurrent}


def test_interrupted_run_leaves_nothing_that_looks_finished(killed_then_rerun):
    out, left_behind, completed, _ = killed_then_rerun
    assert {key: value for key, value in left_behind.items() if key != "lock_holder"} == {
        "out_exists": False, "staging_has_mds": True, "manifests": []}
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.lock").exists()
    assert "left by an interrupted run" in completed.stderr
    holder = left_behind["lock_holder"]
    assert f"taking over {out}.lock: its holder (host {holder['host']}, pid {holder['pid']}" in completed.stderr


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(killed_then_rerun):
    out, left_behind, _, first = killed_then_rerun
    refused = first["result"]
    assert refused.returncode == 2
    assert left_behind["lock_holder"]["pid"] == first["pid"]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --out {out} is in use by another build_mixture run (host {socket.gethostname()}, pid {first['pid']}, "
        f"started {left_behind['lock_holder']['started']}); lock file {out}.lock. If that run is no longer running "
        f"(for example killed on another machine), delete the lock file and run again.")


def test_same_bytes_whatever_the_workers_and_after_an_interruption(mixture, killed_then_rerun):
    two_workers, _, digests = mixture
    one_worker_rerun, _, _, _ = killed_then_rerun
    rerun_digests = file_digests(one_worker_rerun)
    assert len(digests) > 50
    assert {path: digest for path, digest in digests.items() if path != "summary.json"} == {
        path: digest for path, digest in rerun_digests.items() if path != "summary.json"}
    assert without_timing(two_workers / "summary.json") == without_timing(one_worker_rerun / "summary.json")


def bad_input_args(out: Path) -> list[str]:
    return ["--out", str(out), "--c4", str(BAD / "c4-*.json.gz"), "--wikipedia", str(BAD / "*.parquet"),
            "--books", str(BAD / "books-truncated.jsonl.zst")]


def test_bad_input_is_counted_per_file_and_reason_and_good_records_kept(tmp_path):
    out = tmp_path / "bad"
    # In the runner's own process, which saves a worker start-up; --strict below runs in a worker process.
    completed = run_cli(*bad_input_args(out), "--direct_running_mode=in_memory", workers=1)
    summary = json.loads((out / "summary.json").read_text())
    files = {Path(path).name: entry for path, entry in summary["files"].items()}

    def reasons(name):
        return {reason: entry["count"] for reason, entry in files[name]["skipped"].items()}

    assert reasons("c4-badlines.json.gz") == {"invalid_json": 1, "missing_text": 1, "null_text": 1, "empty_text": 2,
                                              "not_an_object": 1, "invalid_utf8": 1}
    assert [example["line"] for example in files["c4-badlines.json.gz"]["skipped"]["empty_text"]["examples"]] == [5, 6]
    # The 3 complete lines before the break are read; they repeat the good lines of c4-badlines.json.gz.
    assert reasons("c4-truncated.json.gz") == {"truncated_stream": 1, "duplicate": 3}
    assert reasons("c4-one-huge-line.json.gz") == {"record_too_large": 1}
    assert reasons("books-truncated.jsonl.zst") == {"truncated_stream": 1}
    assert reasons("not-a-parquet.parquet") == {"not_parquet": 1}
    assert reasons("wikipedia-no-text-column.parquet") == {"missing_text_column": 1}
    # The good records of the same files are kept.
    assert files["c4-badlines.json.gz"]["documents"] == 3 and files["c4-truncated.json.gz"]["documents"] == 3
    c4 = summary["sources"]["c4"]
    assert c4["documents_train"] + c4["documents_validation"] == 3
    assert summary["bad_records"] == 12
    assert "train/books-natural" in summary["empty_streams"]
    assert "c4-badlines.json.gz line 2: invalid_json" in completed.stderr  # logged with the file name
    assert "empty_text 2" in completed.stdout                              # and in the summary table


def test_strict_mode_fails_naming_the_file_and_line(tmp_path):
    out = tmp_path / "strict"
    completed = run_cli(*bad_input_args(out), "--strict", workers=1, check=False)
    assert completed.returncode == 2
    last_line = completed.stderr.strip().splitlines()[-1]
    assert re.match(r"error: \S*(c4-badlines\.json\.gz|c4-one-huge-line\.json\.gz|c4-truncated\.json\.gz|"
                    r"books-truncated\.jsonl\.zst|not-a-parquet\.parquet|wikipedia-no-text-column\.parquet)", last_line)
    assert not out.exists() and not Path(f"{out}.partial").exists()
