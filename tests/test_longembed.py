"""LongEmbed in its own file layout: reading a folder made here, its metrics in `eval.loco`, mteb's
LongEmbed tasks on the same folder, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import mteb
import pytest

from eval.data import LocoDataError, load_tasks
from eval.longembed import write_longembed_folder
from eval.loco import main
from eval.mteb_models import loco_model
from eval.mteb_tasks import longembed_tasks
from eval.needle import generate_longembed, passkey_haystack, passkey_needles
from model import load_tokenizer

LENGTHS = (64, 128)


@pytest.fixture(scope="module")
def longembed_folder(tmp_path_factory) -> Path:
    """A LongEmbed root: `qmsum` (a real task, 12 queries over 6 meetings of the bundled QMSum) and
    `passkey` (two lengths, 6 documents each)."""
    root = tmp_path_factory.mktemp("longembed")
    (task,) = [t.subset(max_queries=12, max_documents=6) for t in load_tasks()]
    write_longembed_folder(
        root / "qmsum",
        [{"doc_id": pid, "text": text} for pid, text in task.documents.items()],
        [{"qid": qid, "text": text} for qid, text in task.queries.items()],
        [{"qid": qid, "doc_id": pid} for qid, relevant in task.qrels.items() for pid in relevant])
    tokenizer = load_tokenizer()
    write_longembed_folder(root / "passkey", *generate_longembed(passkey_haystack(max(LENGTHS), tokenizer),
                                                                 passkey_needles(6), LENGTHS, [0.0, 0.5, 1.0],
                                                                 tokenizer))
    return root


def test_folder_loads_as_tasks_with_longembed_metrics(longembed_folder):
    tasks = load_tasks(longembed_folder)
    assert [t.name for t in tasks] == ["passkey-L64", "passkey-L128", "qmsum"]  # LongEmbed's order
    assert [(t.metric, t.group) for t in tasks] == [("nDCG@1", "passkey"), ("nDCG@1", "passkey"), ("nDCG@10", None)]
    passkey, _, qmsum = tasks
    assert (len(passkey.documents), len(passkey.queries), len(qmsum.documents), len(qmsum.queries)) == (6, 6, 6, 12)
    assert all(len(relevant) == 1 for relevant in passkey.qrels.values())
    assert [t.name for t in load_tasks(longembed_folder, ["passkey"])] == ["passkey-L64", "passkey-L128"]
    assert [t.name for t in load_tasks(longembed_folder / "qmsum")] == ["qmsum"]  # a task folder on its own


def test_eval_loco_scores_longembed_with_its_metrics(longembed_folder, tmp_path, capsys):
    assert main(["--data", str(longembed_folder), "--model", "bm25", "--output-dir", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    by_task = {r["task"]: r for r in results["results"]}
    assert [by_task[t]["metric"] for t in ("passkey-L64", "passkey-L128", "qmsum")] == ["nDCG@1", "nDCG@1", "nDCG@10"]
    main_scores = {t: r["metrics"][r["metric"]] for t, r in by_task.items()}
    # The average counts the passkey lengths once, as their mean.
    expected = ((main_scores["passkey-L64"] + main_scores["passkey-L128"]) / 2 + main_scores["qmsum"]) / 2
    assert results["averages"]["bm25"]["main"] == pytest.approx(expected)
    assert main_scores["passkey-L64"] == 1.0  # the name in the query occurs in one document only
    out = capsys.readouterr().out
    assert "nDCG@10; nDCG@1 for passkey x100" in out and "| model | passkey-L64 | passkey-L128 | qmsum | Average |" in out
    assert (tmp_path / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_mteb_longembed_tasks_read_the_folder_and_agree(longembed_folder, tiny_m2, tmp_path):
    model_dir = tiny_m2
    assert main(["--data", str(longembed_folder), "--model", str(model_dir), "--no-cache", "--quiet",
                 "--output-dir", str(tmp_path / "out")]) == 0
    ours = {r["task"]: r["metrics"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    tasks = longembed_tasks(longembed_folder)
    assert [t.metadata.name for t in tasks] == ["LEMBPasskeyRetrieval", "LEMBQMSumRetrieval"]
    assert list(tasks[0].eval_splits) == ["test_64", "test_128"]
    result = mteb.evaluate(loco_model(str(model_dir)), tasks, cache=None, co2_tracker=False, show_progress_bar=False)
    scores = {(r.task_name, split): s[0] for r in result.task_results for split, s in r.scores.items()}
    for length in LENGTHS:
        mteb_score = scores["LEMBPasskeyRetrieval", f"test_{length}"]
        assert mteb_score["main_score"] == mteb_score["ndcg_at_1"]
        assert mteb_score["ndcg_at_1"] == pytest.approx(ours[f"passkey-L{length}"]["nDCG@1"], abs=1e-3)
    assert scores["LEMBQMSumRetrieval", "test"]["ndcg_at_10"] == pytest.approx(ours["qmsum"]["nDCG@10"], abs=1e-3)


def _write(folder: Path, corpus, queries, qrels) -> Path:
    write_longembed_folder(folder, corpus, queries, qrels)
    return folder


CORPUS = [{"doc_id": "d1", "text": "alpha", "context_length": 64}, {"doc_id": "d2", "text": "beta", "context_length": 64}]
QUERIES = [{"qid": "q1", "text": "alpha?", "context_length": 64}, {"qid": "q2", "text": "beta?", "context_length": 64}]
QRELS = [{"qid": "q1", "doc_id": "d1", "context_length": 64}, {"qid": "q2", "doc_id": "d2", "context_length": 64}]


@pytest.mark.parametrize("change, message", [
    (lambda c, q, r: r[1].__setitem__("doc_id", "d9"), r"qrels\.jsonl, line 2: qrels name document 'd9', which the "
                                                       r"corpus does not hold at context_length 64"),
    (lambda c, q, r: r[0].__setitem__("context_length", 128), r"qrels\.jsonl, line 1: qrels name query 'q1'"),
    (lambda c, q, r: c[1].pop("context_length"), r"corpus\.jsonl, line 2: corpus record lacks `context_length`"),
    (lambda c, q, r: c[1].__setitem__("doc_id", "d1"), r"corpus\.jsonl, line 2: duplicate doc_id 'd1' \(first at "
                                                       r".*corpus\.jsonl, line 1\)"),
    (lambda c, q, r: q[0].pop("text"), r"queries\.jsonl, line 1: queries record lacks field\(s\) \['text'\]"),
    (lambda c, q, r: c[0].__setitem__("context_length", "64"), r"`context_length` must be a positive integer"),
])
def test_bad_records_are_named(tmp_path, change, message):
    corpus, queries, qrels = ([dict(r) for r in rows] for rows in (CORPUS, QUERIES, QRELS))
    change(corpus, queries, qrels)
    with pytest.raises(LocoDataError, match=message):
        load_tasks(_write(tmp_path / "needle", corpus, queries, qrels))


def test_folder_problems(tmp_path, caplog):
    folder = _write(tmp_path / "needle", CORPUS, QUERIES, QRELS)
    (folder / "qrels.jsonl").unlink()
    with pytest.raises(LocoDataError, match=r"needle: a LongEmbed task folder needs corpus, queries and qrels files; "
                                            r"no qrels file"):
        load_tasks(tmp_path)
    _write(folder, CORPUS, QUERIES, QRELS[:1])
    (task,) = load_tasks(folder)
    assert list(task.queries) == ["q1"] and "1 of 2 queries have no qrels and are skipped" in caplog.text
    with pytest.raises(LocoDataError, match=r"LongEmbed has only a 'test' split; asked for 'train'"):
        load_tasks(folder, split="train")
    with pytest.raises(LocoDataError, match=r"unknown task\(s\) \['needle-L65'\]; available: \['needle', 'needle-L64'\]"):
        load_tasks(folder, ["needle-L65"])


def test_hub_unreachable_fails_fast_with_advice(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(LocoDataError, match=r"cannot reach the Hugging Face Hub .* to load dwzhu/LongEmbed \(needle\)"):
        load_tasks("hf:longembed", ["needle-L256"])
    with pytest.raises(LocoDataError, match=r"unknown LongEmbed task\(s\) \['needles'\]"):
        load_tasks("hf:longembed", ["needles"])
