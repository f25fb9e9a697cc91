"""LoCo-format data: the bundled task, folder layouts, formats, splits, and clear errors on bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.data import LocoDataError, LocoTask, list_tasks, load_tasks

DOCUMENTS = [
    {"pid": "d1", "passage": "alpha beta", "dataset": "toy", "split": "test"},
    {"pid": "d2", "passage": "gamma delta", "dataset": "toy", "split": "test"},
    {"pid": "d3", "passage": "train only", "dataset": "toy", "split": "train"},
    {"pid": "e1", "passage": "epsilon", "dataset": "other", "split": "test"},
]
QUERIES = [
    {"qid": "q1", "query": "alpha?", "answer_pids": ["d1"], "dataset": "toy", "split": "test"},
    {"qid": "q2", "query": "gamma or alpha?", "answer_pids": ["d2", "d1"], "dataset": "toy", "split": "test"},
    {"qid": "q3", "query": "train?", "answer_pids": ["d3"], "dataset": "toy", "split": "train"},
    {"qid": "r1", "query": "epsilon?", "answer_pids": ["e1"], "dataset": "other", "split": "test"},
]


def write_json_lines(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def write_task(folder: Path, documents=DOCUMENTS, queries=QUERIES, suffix=".jsonl") -> Path:
    write_json_lines(folder / f"documents{suffix}", documents)
    write_json_lines(folder / f"queries{suffix}", queries)
    return folder


def test_bundled_qmsum_test_split():
    (task,) = load_tasks()
    assert (task.name, task.split) == ("qmsum", "test")
    assert (len(task.documents), len(task.queries)) == (35, 281)
    assert set(task.qrels) == set(task.queries)
    assert all(pid in task.documents for relevant in task.qrels.values() for pid in relevant)
    assert sum(len(load_tasks(split=split)[0].queries) for split in ("train", "val", "test")) == \
        len(load_tasks(split=None)[0].queries)


def test_many_tasks_per_folder_with_split_and_order(tmp_path):
    toy, other = load_tasks(write_task(tmp_path))
    assert (toy.name, other.name) == ("toy", "other")
    assert toy.documents == {"d1": "alpha beta", "d2": "gamma delta"}
    assert toy.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1, "d1": 1}}
    (train,) = load_tasks(tmp_path, tasks=["toy"], split="train")
    assert list(train.queries) == ["q3"] and list(train.documents) == ["d3"]


def test_gzip_parquet_and_task_subfolders(tmp_path):
    write_task(tmp_path / "one", DOCUMENTS[:3], QUERIES[:3], suffix=".jsonl.gz")
    (tmp_path / "two").mkdir()
    pq.write_table(pa.Table.from_pylist(DOCUMENTS[3:]), tmp_path / "two" / "documents.parquet")
    pq.write_table(pa.Table.from_pylist(QUERIES[3:]), tmp_path / "two" / "queries.parquet")
    assert [t.name for t in load_tasks(tmp_path)] == ["toy", "other"]
    assert list_tasks(tmp_path) == ["toy", "other"]


def test_rows_without_split_belong_to_every_split(tmp_path, caplog):
    no_split = [{k: v for k, v in r.items() if k != "split"} for r in DOCUMENTS[:2]]
    write_task(tmp_path, no_split, [{k: v for k, v in QUERIES[0].items() if k != "split"}])
    assert list(load_tasks(tmp_path, split="train")[0].queries) == ["q1"]
    assert "has no `split` column" in caplog.text


def test_integer_ids_become_strings(tmp_path):
    write_task(tmp_path, [{"pid": 7, "passage": "x", "dataset": "t"}],
               [{"qid": 1, "query": "x?", "answer_pids": [7], "dataset": "t"}])
    (task,) = load_tasks(tmp_path, split=None)
    assert task.qrels == {"1": {"7": 1}}


def test_subset_keeps_relevant_documents_first():
    (task,) = load_tasks()
    small = task.subset(max_queries=12, max_documents=3)
    assert len(small.documents) == 3 and 0 < len(small.queries) <= 12
    assert all(pid in small.documents for relevant in small.qrels.values() for pid in relevant)
    assert list(small.queries) == [qid for qid in task.queries if qid in small.queries][:len(small.queries)]
    assert isinstance(small, LocoTask) and task.subset() is task


@pytest.mark.parametrize("change, message", [
    (lambda d, q: d.__setitem__(1, {"pid": "d2", "dataset": "toy"}), r"documents\.jsonl, line 2: document record lacks field\(s\) \['passage'\]"),
    (lambda d, q: q.__setitem__(0, {"qid": "q1", "query": "x", "dataset": "toy"}), r"queries\.jsonl, line 1: query record lacks field\(s\) \['answer_pids'\]"),
    (lambda d, q: q[1].__setitem__("answer_pids", ["d2", "nope"]), r"queries\.jsonl, line 2: query 'q2' of task 'toy': answer_pids \['nope'\] name no document"),
    (lambda d, q: q[1].__setitem__("answer_pids", []), r"queries\.jsonl, line 2: `answer_pids` must be a non-empty list"),
    (lambda d, q: q[1].__setitem__("answer_pids", "d1"), r"queries\.jsonl, line 2: `answer_pids` must be a list"),
    (lambda d, q: d.__setitem__(1, dict(d[0])), r"documents\.jsonl, line 2: duplicate pid 'd1' in task 'toy' \(first at .*documents\.jsonl, line 1\)"),
    (lambda d, q: q.__setitem__(1, dict(q[0])), r"queries\.jsonl, line 2: duplicate qid 'q1'"),
    (lambda d, q: d[0].__setitem__("passage", 3), r"documents\.jsonl, line 1: `passage` must be a string"),
    (lambda d, q: d.__setitem__(0, "not json"), r"documents\.jsonl, line 1: not valid JSON"),
    (lambda d, q: d.__setitem__(0, "[1, 2]"), r"documents\.jsonl, line 1: expected a JSON object"),
    (lambda d, q: d[3].__setitem__("dataset", "elsewhere"), r"queries\.jsonl, line 4: task 'other' has queries but an empty corpus"),
])
def test_bad_records_are_named(tmp_path, change, message):
    documents = [dict(r) for r in DOCUMENTS]
    queries = [dict(r) for r in QUERIES]
    change(documents, queries)
    write_task(tmp_path, documents, queries)
    with pytest.raises(LocoDataError, match=message):
        load_tasks(tmp_path)


def test_empty_documents_file_is_named_as_the_cause(tmp_path, caplog):
    write_task(tmp_path, [], QUERIES)
    with pytest.raises(LocoDataError, match=r"documents\.jsonl: the file is empty \(expected documents records\)"):
        load_tasks(tmp_path)
    assert "split" not in caplog.text  # no misleading warning about a missing split column first


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(LocoDataError, match=r"unknown task\(s\) \['qmsun'\] for split 'test'; available: \['qmsum'\]"):
        load_tasks(tasks=["qmsun"])


def test_unknown_split_lists_the_present_ones():
    with pytest.raises(LocoDataError, match=r"documents\.jsonl\.gz: no rows of split 'validation' \(splits present: \['test', 'train', 'val'\]\)"):
        load_tasks(split="validation")


def test_folder_problems(tmp_path):
    with pytest.raises(LocoDataError, match="no such folder"):
        load_tasks(tmp_path / "missing")
    with pytest.raises(LocoDataError, match="no LoCo data"):
        load_tasks(tmp_path)
    write_json_lines(tmp_path / "queries.jsonl", QUERIES)
    with pytest.raises(LocoDataError, match="queries files but no documents file"):
        load_tasks(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "documents.jsonl.gz").write_bytes(gzip.compress(b'{"pid": "a"}\n')[:-12])
    write_json_lines(tmp_path / "broken" / "queries.jsonl", QUERIES)
    (tmp_path / "queries.jsonl").unlink()
    with pytest.raises(LocoDataError, match=r"documents\.jsonl\.gz: cannot be read"):
        load_tasks(tmp_path)
    (tmp_path / "bad.parquet").mkdir()
    (tmp_path / "bad.parquet" / "documents.parquet").write_bytes(b"not parquet")
    write_json_lines(tmp_path / "bad.parquet" / "queries.jsonl", QUERIES)
    with pytest.raises(LocoDataError, match=r"documents\.parquet: cannot be read as parquet"):
        load_tasks(tmp_path / "bad.parquet")


def test_hub_unreachable_fails_fast_with_advice(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(LocoDataError, match=r"cannot reach the Hugging Face Hub at http://127\.0\.0\.1:9 .*pass --data"):
        load_tasks("hf")
