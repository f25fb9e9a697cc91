"""The README's first command, end to end at reduced step counts: every promised artifact exists, the summaries and
the report say what the stages' own logs say, and the LoCo table equals an independent `eval.loco` run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_STEPS, FINETUNE_STEPS, EVAL_QUERIES = 12, 6, 24
LABELS = ["M2-BERT-tiny (quickstart, OPL)", "bm25", "all-MiniLM-L6-v2 (truncate)"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.quickstart", "--out", str(out), "--pretrain-steps", str(PRETRAIN_STEPS),
         "--finetune-steps", str(FINETUNE_STEPS), "--eval-queries", str(EVAL_QUERIES)],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result.stdout


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _logged(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ("step", "split")}


def test_every_stage_wrote_its_outputs(quickstart_run):
    out, _ = quickstart_run
    manifest = json.loads((out / "mixture" / "manifest.json").read_text())
    assert manifest["seq_len"] == 512 and len(manifest["streams"]) == 6
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    assert pretrain["finished"] and pretrain["world_size"] == 2 and pretrain["step"] == PRETRAIN_STEPS
    finetune = json.loads((out / "finetune" / "summary.json").read_text())
    assert finetune["finished"] and finetune["loss"] == "opl"
    assert (out / "finetune" / "final" / "modules.json").is_file()  # also a sentence-transformers model
    for log in ("data", "pretrain", "finetune", "evaluate"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0


def test_summaries_say_what_the_training_logs_say(quickstart_run):
    out, _ = quickstart_run
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    train, evaluation = read_metrics(out / "pretrain", "train"), read_metrics(out / "pretrain", "eval")
    # configs/quickstart_pretrain.yaml logs every 5 steps (and the last); the quickstart evaluates 4 times.
    assert [r["step"] for r in train] == [5, 10, 12] and [r["step"] for r in evaluation] == [3, 6, 9, 12]
    assert pretrain["train"] == _logged(train[-1]) and pretrain["eval"] == _logged(evaluation[-1])
    assert pretrain["global_batch_size"] == 2 * 4 and pretrain["seq_len"] == 512
    assert pretrain["train"]["tokens_seen"] == pytest.approx(sum(
        r["tokens_per_second"] * r["seconds"] for r in train), rel=1e-9)

    finetune = json.loads((out / "finetune" / "summary.json").read_text())
    train, evaluation = read_metrics(out / "finetune", "train"), read_metrics(out / "finetune", "eval")
    assert [r["step"] for r in train] == [5, 6] and [r["step"] for r in evaluation] == [0, 2, 4, 6]
    assert finetune["train"] == _logged(train[-1]) and finetune["eval"] == _logged(evaluation[-1])
    assert finetune["eval_initial"] == _logged(evaluation[0])
    # 3 negatives per example, each after its own copy of the positive pair: 6 OPL units per example
    assert finetune["units"] == 6 * finetune["examples"] and finetune["heldout_examples"] == 32
    assert finetune["global_batch_size"] == 8 and finetune["accumulation_steps"] == 4  # batch 8 over 2 processes
    assert yaml.safe_load((out / "finetune" / "config.yaml").read_text())["model"]["name_or_path"] == str(
        out / "pretrain" / "final")


def test_report_folder_has_the_stages_numbers_and_plots(quickstart_run):
    out, stdout = quickstart_run
    report = out / "report"
    assert f"report: {report}" in stdout
    data = json.loads((report / "report.json").read_text())
    assert set(data["seconds"]) == {"data", "pretrain", "finetune", "evaluate", "total"}
    for stage in ("pretrain", "finetune"):
        assert data[stage] == json.loads((out / stage / "summary.json").read_text())
    assert data["mixture"] == json.loads((out / "mixture" / "manifest.json").read_text())
    results = json.loads((out / "loco" / "results.json").read_text())["results"]
    assert data["loco"] == {r["model"]: r["metrics"] for r in results}
    text = (report / "README.md").read_text()
    for heading in ("## Data", "## Pretraining", "## Fine-tuning", "## LoCo: QMSum test split"):
        assert heading in text
    for name, metrics in data["loco"].items():
        row = (f"| {name} | {100 * metrics['nDCG@10']:.1f} | {100 * metrics['nDCG@1']:.1f} | "
               f"{100 * metrics['Recall@10']:.1f} | {100 * metrics['MRR@10']:.1f} |")
        assert row in text and row in stdout  # the LoCo table is printed on the console too
    assert f"train loss {data['pretrain']['train']['loss']:.4f}" in text
    assert f"{data['finetune']['eval_initial']['margin']:.4f} before" in text
    for name in ("pretrain_curves.png", "finetune_curves.png", "loco_scores.png"):
        assert _png(report / name), name


def test_loco_scores_equal_an_independent_eval_run(quickstart_run, tmp_path):
    out, _ = quickstart_run
    results = json.loads((out / "loco" / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == LABELS
    assert {(r["task"], r["n_queries"], r["n_documents"]) for r in results} == {("qmsum", EVAL_QUERIES, 35)}
    with open(out / "loco" / "results.csv") as f:
        assert {row["task"] for row in csv.DictReader(f)} >= {"qmsum"}
    assert yaml.safe_load((out / "eval.yaml").read_text())["split"] == "test"
    # The same models scored again from scratch (no embedding cache), under their plain names.
    command = [sys.executable, "-m", "eval.loco", "--model", str(out / "finetune" / "final"), "--model", "bm25",
               "--model", "all-MiniLM-L6-v2", "--split", "test", "--max-queries", str(EVAL_QUERIES), "--no-cache",
               "--quiet", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
