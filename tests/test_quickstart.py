"""The README's first command, end to end at reduced step counts: every promised artifact exists and parses."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.quickstart", "--out", str(out), "--pretrain-steps", "12",
         "--finetune-steps", "6", "--eval-queries", "24"],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result.stdout


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_stage_wrote_its_outputs(quickstart_run):
    out, _ = quickstart_run
    manifest = json.loads((out / "mixture" / "manifest.json").read_text())
    assert manifest["seq_len"] == 512 and len(manifest["streams"]) == 6
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    assert pretrain["finished"] and pretrain["world_size"] == 2 and pretrain["step"] == 12
    finetune = json.loads((out / "finetune" / "summary.json").read_text())
    assert finetune["finished"] and finetune["loss"] == "opl"
    assert (out / "finetune" / "final" / "modules.json").is_file()  # also a sentence-transformers model
    for log in ("data", "pretrain", "finetune", "evaluate"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0


def test_report_folder_has_tables_and_plots(quickstart_run):
    out, stdout = quickstart_run
    report = out / "report"
    assert f"report: {report}" in stdout
    data = json.loads((report / "report.json").read_text())
    assert set(data["seconds"]) == {"data", "pretrain", "finetune", "evaluate", "total"}
    assert set(data["loco"]) == {"M2-BERT-tiny (quickstart, OPL)", "bm25", "all-MiniLM-L6-v2 (truncate)"}
    for metrics in data["loco"].values():
        assert 0.0 <= metrics["nDCG@10"] <= 1.0
    text = (report / "README.md").read_text()
    for heading in ("## Data", "## Pretraining", "## Fine-tuning", "## LoCo: QMSum test split"):
        assert heading in text
    for name in ("pretrain_curves.png", "finetune_curves.png", "loco_scores.png"):
        assert _png(report / name), name
    # the LoCo table is printed on the console
    assert "| bm25 |" in stdout and "nDCG@10" in stdout


def test_loco_outputs_parse(quickstart_run):
    out, _ = quickstart_run
    results = json.loads((out / "loco" / "results.json").read_text())
    assert {r["model"] for r in results["results"]} == {"M2-BERT-tiny (quickstart, OPL)", "bm25",
                                                        "all-MiniLM-L6-v2 (truncate)"}
    with open(out / "loco" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["task"] for row in rows} >= {"qmsum"}
    assert yaml.safe_load((out / "eval.yaml").read_text())["split"] == "test"
