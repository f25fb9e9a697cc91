"""The whole pipeline at toy scale on the bundled real data, on CPU: raw text to a LoCo table.

    python -m train.quickstart [--out runs/quickstart] [--pretrain-steps 300] [--finetune-steps 100]

Each stage runs in its own process, with the same command a user would type:

    1. data       python -m dataprep.build_mixture --seq-len 512                      (Beam DirectRunner)
    2. pretrain   torchrun -m train.pretrain --config configs/quickstart_pretrain.yaml   (DeepSpeed, gloo)
    3. finetune   torchrun -m train.finetune --config configs/quickstart_finetune.yaml   (OPL, batch 1)
    4. evaluate   python -m eval.loco: the fine-tuned tiny M2, BM25 and all-MiniLM-L6-v2 on QMSum test

and a report folder gathers what they wrote: `report/README.md` (tables), `report/report.json`, and the PNG
plots of the training curves and the scores. Stage logs are in `<out>/logs/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.distributed import free_port

logger = logging.getLogger("train.quickstart")

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 512  # the quickstart model's length (configs/quickstart_pretrain.yaml): QMSum meetings are longer


@dataclass
class Stage:
    """One pipeline step: the command, and the files that prove it finished."""

    name: str
    command: list[str]
    outputs: list[Path]


def torchrun(nproc: int, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", module]


def build_stages(out: Path, pretrain_steps: int, finetune_steps: int, nproc: int, eval_queries: int | None) -> list[Stage]:
    mixture, pretrain, finetune, loco = out / "mixture", out / "pretrain", out / "finetune", out / "loco"
    configs = REPO / "configs"
    evaluate = [sys.executable, "-m", "eval.loco", "--config", str(out / "eval.yaml"), "--output-dir", str(loco),
                "--cache-dir", str(out / "embedding-cache")]
    if eval_queries:
        evaluate += ["--max-queries", str(eval_queries)]
    return [
        Stage("data", [sys.executable, "-m", "dataprep.build_mixture", "--out", str(mixture),
                       "--seq-len", str(SEQ_LEN), "--direct_num_workers", "2"],
              [mixture / "manifest.json", mixture / "summary.json"]),
        Stage("pretrain", torchrun(nproc, "train.pretrain") + [
            "--config", str(configs / "quickstart_pretrain.yaml"), f"data.manifest={mixture / 'manifest.json'}",
            f"training.max_steps={pretrain_steps}", f"training.eval_every={max(pretrain_steps // 4, 1)}",
            f"training.checkpoint_every={pretrain_steps}", f"output.dir={pretrain}"],
              [pretrain / "summary.json", pretrain / "curves.png", pretrain / "final" / "model.safetensors"]),
        Stage("finetune", torchrun(nproc, "train.finetune") + [
            "--config", str(configs / "quickstart_finetune.yaml"), f"model.name_or_path={pretrain / 'final'}",
            f"training.max_steps={finetune_steps}", f"training.eval_every={max(finetune_steps // 3, 1)}",
            f"training.checkpoint_every={finetune_steps}", f"output.dir={finetune}"],
              [finetune / "summary.json", finetune / "curves.png", finetune / "final" / "config.json"]),
        Stage("evaluate", evaluate, [loco / "results.json", loco / "results.csv", loco / "scores.png"]),
    ]


def write_eval_config(out: Path) -> None:
    """The models `eval.loco` compares: our fine-tuned tiny M2 and the two offline baselines."""
    models = [{"model": str(out / "finetune" / "final"), "label": "M2-BERT-tiny (quickstart, OPL)"},
              "bm25", {"model": "all-MiniLM-L6-v2", "label": "all-MiniLM-L6-v2 (truncate)"}]
    (out / "eval.yaml").write_text(json.dumps({"models": models, "split": "test"}, indent=2) + "\n")


def run_stage(stage: Stage, logs: Path) -> float:
    """Run one stage with its output on the console and in `logs/<name>.log`; returns seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print(f"\n=== {stage.name}: {' '.join(stage.command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(stage.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        status = process.wait()
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"stage {stage.name} failed with exit status {status}; its log: {log_path}")
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"stage {stage.name} finished but did not write {missing}; its log: {log_path}")
    print(f"=== {stage.name} done in {seconds:.0f} s", flush=True)
    return seconds


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def write_report(out: Path, seconds: dict[str, float]) -> Path:
    """Gather the stages' summaries and plots into `out/report/`."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    mixture = json.loads((out / "mixture" / "manifest.json").read_text())
    pretrain = json.loads((out / "pretrain" / "summary.json").read_text())
    finetune = json.loads((out / "finetune" / "summary.json").read_text())
    loco = json.loads((out / "loco" / "results.json").read_text())
    for source, name in ((out / "pretrain" / "curves.png", "pretrain_curves.png"),
                         (out / "finetune" / "curves.png", "finetune_curves.png"),
                         (out / "loco" / "scores.png", "loco_scores.png")):
        shutil.copy(source, report / name)

    scores = {r["model"]: r["metrics"] for r in loco["results"]}
    lines = ["# Quickstart report", "",
             "The whole pipeline at toy scale on the bundled real sample, on CPU.", "",
             "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    lines += ["", f"## Data: mixture of {mixture['seq_len']}-token samples", "",
              "| stream | proportion | train samples | train tokens |", "|---|---:|---:|---:|"]
    for stream in mixture["streams"]:
        train = stream["splits"]["train"]
        lines.append(f"| {stream['name']} | {stream['proportion']:.2f} | {train['samples']} | {train['tokens']} |")
    lines += ["", "## Pretraining (masked LM, tiny M2-BERT)", "",
              f"{pretrain['step']} steps on {pretrain['world_size']} processes, ZeRO stage {pretrain['zero_stage']}: "
              f"train loss {_fmt(pretrain['train'].get('loss'))}, validation loss {_fmt(pretrain['eval'].get('loss'))}, "
              f"validation MLM accuracy {_fmt(pretrain['eval'].get('accuracy'))}.", "",
              "![pretraining curves](pretrain_curves.png)", "",
              "## Fine-tuning (orthogonal projection loss, batch 1)", "",
              f"{finetune['step']} steps: train loss {_fmt(finetune['train'].get('loss'))}; held-out mean "
              f"cos(q, positive) - cos(q, negative): {_fmt(finetune['eval_initial'].get('margin'))} before, "
              f"{_fmt(finetune['eval'].get('margin'))} after.", "",
              "![fine-tuning curves](finetune_curves.png)", "",
              "## LoCo: QMSum test split", "", "| model | nDCG@10 | nDCG@1 | Recall@10 | MRR@10 |",
              "|---|---:|---:|---:|---:|"]
    for name, metrics in scores.items():
        lines.append(f"| {name} | {100 * metrics['nDCG@10']:.1f} | {100 * metrics['nDCG@1']:.1f} | "
                     f"{100 * metrics['Recall@10']:.1f} | {100 * metrics['MRR@10']:.1f} |")
    lines += ["", "![LoCo scores](loco_scores.png)", ""]
    (report / "README.md").write_text("\n".join(lines))
    (report / "report.json").write_text(json.dumps(
        {"seconds": seconds, "mixture": mixture, "pretrain": pretrain, "finetune": finetune,
         "loco": {model: metrics for model, metrics in scores.items()}}, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (replaced)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--nproc", type=int, default=2, help="training processes (CPU, gloo)")
    parser.add_argument("--eval-queries", type=int, default=None, help="quick run: queries per task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_eval_config(out)
    stages = build_stages(out, args.pretrain_steps, args.finetune_steps, args.nproc, args.eval_queries)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for stage in stages:
            seconds[stage.name] = run_stage(stage, out / "logs")
    except RuntimeError as err:
        print(f"\nquickstart stopped: {err}", file=sys.stderr)
        return 1
    seconds["total"] = time.perf_counter() - started
    report = write_report(out, seconds)
    print((report / "README.md").read_text().split("## LoCo: QMSum test split")[1].split("![")[0].strip())
    print(f"\nquickstart finished in {seconds['total'] / 60:.1f} min; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
