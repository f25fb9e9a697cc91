"""What `python -m dataprep.build_mixture` must never do, each shown on a hostile input built here.

It never deletes or overwrites what is not its own earlier output, never runs twice into one folder, and
counts text that is not Unicode as bad records instead of crashing (docs/reliability.md, "Data preparation",
names each promise and its test). Refusals happen before any Beam work, so most tests call `main()` in
process; the three pipeline runs use a tiny corpus in the runner's own process.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

from dataprep import build_mixture, output

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "dataprep" / "sample_data"
RUN_TIMEOUT_S = 300
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def sentence(number: int) -> str:
    """A distinct document of 20 words (well over --min-tokens)."""
    return " ".join(WORDS[(number * 7 + index) % len(WORDS)] for index in range(20)) + f" number {number}."


# Record ids and titles shaped like paths: nothing may be written where they point.
HOSTILE_IDS = ["../../../escaped-id", "/tmp/escaped-absolute-id", "train/c4-natural/index.json"]


def json_line(text: str, number: int = 0) -> bytes:
    record = {"text": text, "id": HOSTILE_IDS[number % len(HOSTILE_IDS)], "title": "../escaped-title"}
    return json.dumps(record).encode()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dataprep.build_mixture", *args, "--direct_running_mode=in_memory",
               "--direct_num_workers=1"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def file_digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def siblings(out: Path) -> list[str]:
    """What else a run left next to its output folder (lock, staging, replaced folders)."""
    return sorted(path.name for path in out.parent.iterdir() if path.name != out.name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Good and hostile files of every text path: JSON lines (gzip, zstd), parquet and plain text."""
    root = tmp_path_factory.mktemp("corpus")
    for folder in ("c4", "c4-surrogate-only", "wikipedia", "wikipedia-good", "books", "books-good"):
        (root / folder).mkdir()
    surrogates = [json_line(sentence(1), 1), b'{"text": "\\ud800"}', json_line(sentence(2), 2),
                  b'{"text": "' + sentence(3).encode() + b' \\udfff and on"}',
                  b'{"text": "a valid pair \\ud83d\\ude00 ' + sentence(4).encode() + b'"}']
    for folder in ("c4", "c4-surrogate-only"):
        (root / folder / "surrogates.jsonl.gz").write_bytes(gzip.compress(b"\n".join(surrogates) + b"\n"))
    (root / "c4" / "bytes.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join([
        json_line(sentence(5)), b'{"text": "caf\xe9 au lait, ' + sentence(6).encode() + b'"}',
        b'{"text": "\\ud800\\ud800"}', json_line(sentence(7))]) + b"\n"))
    # Parquet does not check UTF-8 on write either: a string column can hold any bytes.
    cells = pa.array([sentence(8).encode(), b"\xff\xfe not text", None, sentence(9).encode()], pa.binary())
    pq.write_table(pa.table({"id": HOSTILE_IDS + ["4"], "title": ["../../escaped-title"] * 4,
                             "text": cells.view(pa.string())}),
                   root / "wikipedia" / "cells.parquet")
    pq.write_table(pa.table({"text": [sentence(10), sentence(11)]}), root / "wikipedia-good" / "good.parquet")
    (root / "books" / "latin1.txt").write_bytes(f"{sentence(12)} na\xefve".encode("latin-1"))
    for folder in ("books", "books-good"):
        (root / folder / "good.txt").write_text(f"{sentence(13)}\n\n{sentence(14)}", encoding="utf-8")
    return {"root": root, "c4": root / "c4", "wikipedia": root / "wikipedia", "books": root / "books"}


def corpus_args(corpus: dict[str, Path]) -> list[str]:
    return ["--c4", str(corpus["c4"]), "--wikipedia", str(corpus["wikipedia"]), "--books", str(corpus["books"])]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, corpus) -> Path:
    """A complete output of the command, on the hostile corpus (its summary is checked below)."""
    out = tmp_path_factory.mktemp("earlier") / "mix"
    completed = run_cli("--out", str(out), *corpus_args(corpus))
    assert completed.returncode == 0, completed.stderr[-4000:]
    (out / "stderr.log").write_text(completed.stderr)
    return out


def test_text_that_is_not_unicode_is_a_counted_bad_record_on_every_path(earlier):
    summary = json.loads((earlier / "summary.json").read_text())
    files = {Path(path).name: entry for path, entry in summary["files"].items()}

    def skipped(name):
        return {reason: [example["line"] for example in entry["examples"]]
                for reason, entry in files[name]["skipped"].items()}

    assert skipped("surrogates.jsonl.gz") == {"unpaired_surrogate": [2, 4]}
    assert skipped("bytes.jsonl.zst") == {"invalid_utf8": [2], "unpaired_surrogate": [3]}
    assert skipped("cells.parquet") == {"invalid_utf8": [2], "null_text": [3]}
    assert skipped("latin1.txt") == {"invalid_utf8": [1]}
    # The good records of the same files are all kept, the valid surrogate pair (an emoji) among them.
    assert {name: entry["documents"] for name, entry in files.items()} == {
        "surrogates.jsonl.gz": 3, "bytes.jsonl.zst": 2, "cells.parquet": 2, "latin1.txt": 0, "good.txt": 1}
    c4 = summary["sources"]["c4"]
    assert c4["documents_train"] + c4["documents_validation"] == 5
    assert summary["bad_records"] == 7
    stderr = (earlier / "stderr.log").read_text()
    assert "surrogates.jsonl.gz line 2: unpaired_surrogate (U+D800 at character 0 of the text" in stderr
    assert "Traceback" not in stderr


def test_path_like_ids_write_nothing_outside_the_output(earlier, corpus):
    written = [str(path.relative_to(earlier)) for path in earlier.rglob("*") if path.is_file()]
    assert sorted(name for name in written if not output.OUTPUT_FILE.fullmatch(name)) == ["stderr.log"]  # ours
    assert siblings(earlier) == []
    assert sorted(path.name for path in corpus["root"].iterdir()) == sorted(
        ["c4", "c4-surrogate-only", "wikipedia", "wikipedia-good", "books", "books-good"])
    base = earlier.parents[1]  # the session's temporary folder, where ../ ids would lead
    assert not [path for path in base.rglob("escaped*")] and not Path("/tmp/escaped-absolute-id").exists()


def test_non_utf8_file_names_are_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "c4"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jsonl"), "wb") as handle:
        handle.write(json_line(sentence(1)) + b"\n")
    out = tmp_path / "mix"
    assert build_mixture.main(["--out", str(out), "--c4", str(folder), "--wikipedia", str(SAMPLE / "wikipedia"),
                               "--books", str(SAMPLE / "books")]) == 2
    assert "caf\\udce9.jsonl' is not valid UTF-8; rename the file" in capsys.readouterr().err
    assert not out.exists() and siblings(out) == ["c4"]


def foreign_folder(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    (out / "train").mkdir(parents=True)
    (out / "thesis.tex").write_text("two years of work")
    (out / "train" / "index.json").write_text("{}")
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_other_files_is_never_written(tmp_path, capsys, corpus, overwrite):
    out = foreign_folder(tmp_path)
    before = file_digests(out)
    assert build_mixture.main(["--out", str(out), *corpus_args(corpus)] + ["--overwrite"] * overwrite) == 2
    error = capsys.readouterr().err
    assert f"--out {out} is not empty and is not an output of build_mixture" in error and "thesis.tex" in error
    assert file_digests(out) == before and siblings(out) == []


def test_out_dot_is_refused_before_any_work(tmp_path, capsys, monkeypatch, corpus):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("mine")
    monkeypatch.chdir(work)
    assert build_mixture.main(["--out", ".", *corpus_args(corpus)]) == 2
    assert f"--out {work} is not empty and is not an output of build_mixture" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == ["notes.md"]


@pytest.mark.parametrize("kind, message", [("file", "exists and is not a folder"),
                                           ("link", "is a symbolic link")])
def test_an_out_that_is_not_a_folder_is_refused(tmp_path, capsys, corpus, kind, message):
    out = tmp_path / "mix"
    if kind == "file":
        out.write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    assert build_mixture.main(["--out", str(out), *corpus_args(corpus), "--overwrite"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(["mix"] + ["elsewhere"] * (kind == "link"))


def test_a_foreign_staging_folder_is_never_deleted(tmp_path, capsys, corpus):
    out = tmp_path / "mix"
    staging = tmp_path / "mix.partial"
    staging.mkdir()
    (staging / "draft.txt").write_text("mine")
    assert build_mixture.main(["--out", str(out), *corpus_args(corpus)]) == 2
    assert f"{staging} holds files build_mixture does not write (draft.txt)" in capsys.readouterr().err
    assert os.listdir(staging) == ["draft.txt"] and not out.exists()


@pytest.fixture
def earlier_copy(tmp_path, earlier) -> Path:
    out = tmp_path / "mix"
    shutil.copytree(earlier, out, ignore=shutil.ignore_patterns("stderr.log"))
    return out


def test_an_earlier_output_is_replaced_only_with_overwrite(earlier_copy, capsys, corpus):
    before = file_digests(earlier_copy)
    assert build_mixture.main(["--out", str(earlier_copy), *corpus_args(corpus)]) == 2
    error = capsys.readouterr().err
    assert f"--out {earlier_copy} already holds a mixture" in error and "pass --overwrite to replace it" in error
    assert file_digests(earlier_copy) == before and siblings(earlier_copy) == []
    (earlier_copy / "train" / "c4-natural" / "notes.txt").write_text("mine")
    assert build_mixture.main(["--out", str(earlier_copy), *corpus_args(corpus), "--overwrite"]) == 2
    assert "train/c4-natural/notes.txt" in capsys.readouterr().err
    assert (earlier_copy / "train" / "c4-natural" / "notes.txt").read_text() == "mine"


def test_strict_stops_at_a_lone_surrogate_and_a_failed_overwrite_keeps_the_earlier_output(earlier_copy, corpus):
    before = file_digests(earlier_copy)
    completed = run_cli("--out", str(earlier_copy), "--overwrite", "--strict",
                        "--c4", str(corpus["root"] / "c4-surrogate-only"),
                        "--wikipedia", str(corpus["root"] / "wikipedia-good"),
                        "--books", str(corpus["root"] / "books-good"))
    assert completed.returncode == 2
    surrogates = corpus["root"] / "c4-surrogate-only" / "surrogates.jsonl.gz"
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {surrogates} line 2: unpaired_surrogate (U+D800")
    assert file_digests(earlier_copy) == before and siblings(earlier_copy) == []


def holder_killed(out: Path) -> None:
    """A process that takes the output's lock and is then SIGKILLed: its lock file stays behind."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dataprep.output import OutputLock; "
                               f"OutputLock({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(300)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_overwrite_replaces_the_earlier_output_and_takes_over_a_stale_lock(earlier_copy, corpus):
    holder_killed(earlier_copy)
    stale = json.loads(Path(f"{earlier_copy}.lock").read_text())
    leftover = Path(f"{earlier_copy}.partial") / "train" / "c4-natural"
    leftover.mkdir(parents=True)
    (leftover / "index.json").write_text("{}")  # what an interrupted run leaves
    completed = run_cli("--out", str(earlier_copy), *corpus_args(corpus), "--overwrite", "--seq-len", "64")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"taking over {earlier_copy}.lock: its holder (host {stale['host']}, pid {stale['pid']}" in completed.stderr
    assert "left by an interrupted run" in completed.stderr
    assert json.loads((earlier_copy / "manifest.json").read_text())["seq_len"] == 64
    assert siblings(earlier_copy) == []  # no lock, staging or replaced folder left


def test_a_live_holder_is_named_and_its_lock_kept(tmp_path, capsys, corpus):
    out = tmp_path / "mix"
    with output.OutputLock(str(out)):
        assert build_mixture.main(["--out", str(out), *corpus_args(corpus)]) == 2
        error = capsys.readouterr().err
        assert Path(f"{out}.lock").exists()
    assert (f"--out {out} is in use by another build_mixture run (host {socket.gethostname()}, pid {os.getpid()}, "
            f"started 20") in error
    assert not out.exists() and siblings(out) == []


def test_a_folder_without_hard_links_still_gets_an_exclusive_lock(tmp_path, monkeypatch):
    def no_hard_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # as on some FUSE and SMB mounts

    monkeypatch.setattr(os, "link", no_hard_links)
    out = str(tmp_path / "mix")
    with output.OutputLock(out):
        assert json.loads(Path(f"{out}.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(output.OutputLockedError, match=f"pid {os.getpid()}"):
            output.OutputLock(out).__enter__()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("holder", ["another machine", "unreadable"])
def test_a_lock_that_may_be_alive_elsewhere_is_never_taken_over(tmp_path, capsys, corpus, holder):
    out = tmp_path / "mix"
    holder_killed(out)
    lock = Path(f"{out}.lock")
    record = json.loads(lock.read_text())
    lock.write_text(json.dumps({**record, "host": "gpu-node-17"}) if holder == "another machine" else "garbage")
    before = lock.read_text()
    assert build_mixture.main(["--out", str(out), *corpus_args(corpus)]) == 2
    error = capsys.readouterr().err
    assert f"lock file {lock}. If that run is no longer running" in error
    assert ("host gpu-node-17" if holder == "another machine" else "its holder record is unreadable") in error
    assert lock.read_text() == before and not out.exists()


class ObjectStore(LocalFileSystem):
    """`store://bucket/...` on a local folder: a Beam filesystem with a scheme, as gs:// and s3:// are."""

    root: Path | None = None
    PREFIX = "store://"

    @classmethod
    def scheme(cls):
        return "store"

    def _local(self, path: str) -> str:
        return os.path.join(str(self.root), path[len(self.PREFIX):])

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *paths])

    def _list(self, prefix):
        for folder, _, names in os.walk(self._local(prefix)):
            for name in names:
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, str(self.root))
                yield FileMetadata(self.PREFIX + relative, os.path.getsize(path), os.path.getmtime(path))

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def exists(self, path):
        return super().exists(self._local(path))

    def copy(self, sources, destinations):
        for destination in destinations:
            os.makedirs(os.path.dirname(self._local(destination)), exist_ok=True)
        return super().copy([self._local(path) for path in sources], [self._local(path) for path in destinations])

    def delete(self, paths):
        for path in map(self._local, paths):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def test_object_storage_outputs_get_the_same_checks_and_lock(tmp_path, earlier):
    ObjectStore.root = tmp_path
    out = "store://bucket/mix"
    shutil.copytree(earlier, tmp_path / "bucket" / "mix", ignore=shutil.ignore_patterns("stderr.log"))
    with pytest.raises(output.OutputError, match="already holds a mixture"):
        output.check_output(out, overwrite=False)
    output.check_output(out, overwrite=True)
    (tmp_path / "bucket" / "mix" / "notes.txt").write_text("mine")
    with pytest.raises(output.OutputError, match="does not write: notes.txt"):
        output.check_output(out, overwrite=True)
    with output.OutputLock(out):
        with pytest.raises(output.OutputLockedError, match=f"pid {os.getpid()}, started 20"):
            output.OutputLock(out).__enter__()
        assert (tmp_path / "bucket" / "mix.lock").exists()
    assert not (tmp_path / "bucket" / "mix.lock").exists()
    # Publishing copies the staging folder in, manifest last, and leaves no staging behind.
    (tmp_path / "bucket" / "mix" / "notes.txt").unlink()
    staging = output.prepare_staging(out)
    shutil.copytree(earlier / "train", tmp_path / "bucket" / "mix.partial" / "train")
    output.write_text(f"{staging}/manifest.json", (earlier / "manifest.json").read_text())
    output.publish(staging, out, overwrite=True)
    assert file_digests(tmp_path / "bucket" / "mix") == {
        name: digest for name, digest in file_digests(earlier).items()
        if name.startswith("train/") or name == "manifest.json"}
    assert sorted(os.listdir(tmp_path / "bucket")) == ["mix"]
