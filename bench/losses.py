"""The loss comparison: the orthogonal projection loss at batch 1 against MNRL at batch 2 and cached MNRL at
batch 32 (random and BM25 negatives), one encoder fine-tuned on one task, over several seeds.

    python bench/losses.py --jobs 2                      # both suites, 3 seeds (about 1.5 h on 2 busy CPU cores)
    python bench/losses.py --suites tiny-m2 --seeds 0    # a quick look
    python bench/losses.py --suites minilm --max-steps 1 --seeds 0 --work-dir runs/bench-losses-smoke

Suites:
  * `minilm`: all-MiniLM-L6-v2 on the bundled QMSum task, documents truncated to 512 tokens, trained with
    configs/finetune_minilm_qmsum_{opl,mnrl,cached_mnrl}.yaml (128 training queries, one random or BM25
    negative each, 4 optimizer steps of 32 queries at a constant lr 1e-4) and scored by nDCG@10 on the
    test split (281 queries, 35 meetings, `eval`'s dense retrieval, embeddings cached in --cache-dir),
    beside the zero-shot model and BM25;
  * `tiny-m2`: a randomly initialised tiny M2-BERT at its test scale (configs/finetune_tiny_m2_qmsum.yaml:
    16 meetings, 32-token texts, 80 steps), scored by its held-out accuracy and margin.

What "at batch b" means: every variant trains on the same examples (query, positive, negative), in
optimizer steps of the same 32 queries, with the same optimizer and schedule; what differs is the loss
and how many candidates a query is scored against, which memory limits. OPL at batch 1 scores each
(query, document) pair alone (64 pairs per step: each query's positive and negative); MNRL at batch 2
scores 2 queries against 2 positives and 2 negatives per micro-step (16 micro-steps of accumulation);
cached MNRL at batch 32 scores 32 queries against 32 positives and 32 negatives, embedding one text at a
time (MiniLM; 8 for the tiny M2), so its peak memory is OPL's at batch 1 (reported). In-batch duplicates
of a query's own positive are never its negatives (`train.losses.MultipleNegativesRankingLoss`).

Seed s sets training.seed and negatives.seed: other negatives, order, held-out queries and dropout.
Each run is `python -m train.finetune` in its own process (its peak memory is its own), under
--work-dir/<suite>/<variant>/seed<s>; a finished run with the same command is reused, an unfinished one
resumed, and its checkpoints are removed once it has finished (its export, logs and summary stay).
Time per optimizer step is the median of the logged per-step seconds (evaluations not counted); with
--jobs 2 two runs share the CPU. Writes losses.json (every run, mean ± sample std over seeds, ratios and
the held-out margin curves) and losses.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EVAL_LENGTH = 512  # tokens of a test document (as in training)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    variants: tuple[Variant, ...]
    test_split: bool  # scored by nDCG@10 on QMSum's test split (else by the held-out metrics only)


TINY = "finetune_tiny_m2_qmsum.yaml"
TINY_TRIPLETS = ("training.global_batch_size=32",)  # the 32 queries of the OPL steps' 64 pairs
SUITES = {suite.name: suite for suite in (
    Suite("minilm", "all-MiniLM-L6-v2 on QMSum, 512-token documents", (
        Variant("opl-1", "OPL, batch 1", "finetune_minilm_qmsum_opl.yaml"),
        Variant("opl-1-bm25", "OPL, batch 1, BM25 negatives", "finetune_minilm_qmsum_opl.yaml", ("negatives.kind=bm25",)),
        Variant("mnrl-2", "MNRL, batch 2", "finetune_minilm_qmsum_mnrl.yaml"),
        Variant("mnrl-2-bm25", "MNRL, batch 2, BM25 negatives", "finetune_minilm_qmsum_mnrl.yaml",
                ("negatives.kind=bm25",)),
        Variant("cached-32", "cached MNRL, batch 32", "finetune_minilm_qmsum_cached_mnrl.yaml"),
        Variant("cached-32-bm25", "cached MNRL, batch 32, BM25 negatives", "finetune_minilm_qmsum_cached_mnrl.yaml",
                ("negatives.kind=bm25",)),
    ), test_split=True),
    Suite("tiny-m2", "tiny M2-BERT (random init) on 16 QMSum meetings, 32-token texts", (
        Variant("opl-1", "OPL, batch 1", TINY),  # 16 pairs per forward pass: the same loss and gradients as 1
        Variant("opl-1-bm25", "OPL, batch 1, BM25 negatives", TINY, ("negatives.kind=bm25",)),
        Variant("mnrl-2", "MNRL, batch 2", TINY, ("loss.name=mnrl", "training.micro_batch_size=2", *TINY_TRIPLETS)),
        Variant("mnrl-2-bm25", "MNRL, batch 2, BM25 negatives", TINY, (
            "loss.name=mnrl", "training.micro_batch_size=2", *TINY_TRIPLETS, "negatives.kind=bm25")),
        Variant("cached-32", "cached MNRL, batch 32", TINY, (
            "loss.name=cached_mnrl", "loss.mini_batch_size=8", "training.micro_batch_size=32", *TINY_TRIPLETS)),
        Variant("cached-32-bm25", "cached MNRL, batch 32, BM25 negatives", TINY, (
            "loss.name=cached_mnrl", "loss.mini_batch_size=8", "training.micro_batch_size=32", *TINY_TRIPLETS,
            "negatives.kind=bm25")),
    ), test_split=False),
)}


def tiny_export(directory: Path) -> Path:
    """A randomly initialised tiny M2-BERT pretraining export (seed 0), the tests' starting point."""
    if not (directory / "config.json").is_file():
        import torch

        from model import M2BertConfig, M2BertForMaskedLM

        torch.manual_seed(0)
        M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(directory)
    return directory


def train(command: list[str], run_dir: Path, threads: int) -> Path:
    """Run (or resume, or reuse) one fine-tuning run; returns its folder."""
    marker = run_dir / "bench-command.json"
    summary = run_dir / "summary.json"
    if marker.is_file() and json.loads(marker.read_text()) == command:
        if summary.is_file() and json.loads(summary.read_text()).get("finished"):
            return run_dir
    elif marker.is_file():  # this bench's run of other settings: start afresh
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        raise SystemExit(f"{run_dir} exists but is not a run of this bench: choose another --work-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(command))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    with open(run_dir / "bench.log", "w") as log:
        child = subprocess.run([sys.executable, "-m", "train.finetune", *command, "--resume"], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    if child.returncode != 0:
        raise SystemExit(f"{run_dir}: fine-tuning failed (exit {child.returncode}); see {run_dir / 'bench.log'}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def run_result(run_dir: Path, seed: int) -> dict:
    """One run's figures from its summary and metrics."""
    from train.logging_utils import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    train_records, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    return {"seed": seed, "run": str(run_dir), "steps": summary["step"], "export": summary["export"],
            "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
            "seconds_per_step": statistics.median(r["seconds"] for r in train_records),
            "backward_calls_per_micro_step": summary.get("backward_calls_per_micro_step"),
            "heldout_before": summary["eval_initial"], "heldout_after": summary["eval"],
            "margin_curve": [[r["step"], r["margin"]] for r in evals]}


def per_query_ndcg(specs: list, cache_dir: Path | None) -> dict[str, dict[str, float]]:
    """nDCG@10 of every test query of QMSum, by model label."""
    import torch

    from eval.cache import EmbeddingCache
    from eval.data import load_tasks
    from eval.metrics import HEADLINE_METRIC, per_query_scores
    from eval.models import build_retriever

    (task,) = load_tasks(None, split="test")
    cache = EmbeddingCache(cache_dir)
    scores = {}
    try:
        for spec in specs:
            retriever = build_retriever(spec, cache, torch.device("cpu"), batch_size=8, show_progress=False)
            scores[spec.display_name] = per_query_scores(task.qrels, retriever.retrieve(task, 100))[HEADLINE_METRIC]
            del retriever
    finally:
        cache.close()
    return scores


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_difference(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, float]:
    """Mean over test queries of (a - b), each query's nDCG@10 averaged over seeds first, and the half-width
    of its 95% interval from the spread over queries: how well the test set resolves the gap."""
    queries = sorted(a[0])
    differences = [statistics.fmean(s[q] for s in a) - statistics.fmean(s[q] for s in b) for q in queries]
    mean = statistics.fmean(differences)
    half_width = 1.96 * statistics.stdev(differences) / len(differences) ** 0.5
    return {"mean": mean, "ci95_half_width": half_width, "queries": len(differences)}


def summarise(suite: Suite, runs: dict[str, list[dict]], ndcg: dict[str, dict[str, float]] | None) -> dict:
    """Mean ± std over seeds of every figure, the margin curves, and the ratios to OPL at batch 1."""
    variants = []
    for variant in suite.variants:
        results = runs[variant.key]
        entry = {"key": variant.key, "label": variant.label, "config": f"configs/{variant.config}",
                 "overrides": list(variant.overrides), "runs": results}
        for figure in ("peak_memory_gib", "seconds_per_step"):
            entry[figure] = mean_std([r[figure] for r in results])
        for figure in ("margin", "accuracy", "loss"):
            entry[f"heldout_{figure}"] = mean_std([r["heldout_after"][figure] for r in results])
        steps = [step for step, _ in results[0]["margin_curve"]]
        curves = [[margin for _, margin in r["margin_curve"]] for r in results]
        entry["margin_curve"] = {"steps": steps, **{key: [mean_std(list(column))[key] for column in zip(*curves)]
                                                   for key in ("mean", "std")}}
        if ndcg is not None:
            for r in results:
                r["ndcg@10"] = statistics.fmean(ndcg[run_label(variant, r["seed"])].values())
            entry["ndcg@10"] = mean_std([r["ndcg@10"] for r in results])
        variants.append(entry)
    reference = variants[0]
    ratios = {f"{v['label']} / {reference['label']}: {figure}": v[figure]["mean"] / reference[figure]["mean"]
              for v in variants[1:] for figure in ("peak_memory_gib", "seconds_per_step")}
    report = {"title": suite.title, "variants": variants, "ratios": ratios,
              "heldout_before": mean_std([r["heldout_before"]["accuracy"] for r in runs[suite.variants[0].key]])}
    if ndcg is not None:
        report["zero_shot_ndcg@10"] = statistics.fmean(ndcg["all-MiniLM-L6-v2 (zero-shot)"].values())
        report["bm25_ndcg@10"] = statistics.fmean(ndcg["bm25"].values())
        seeds = [r["seed"] for r in reference["runs"]]
        by_variant = {v.key: [ndcg[run_label(v, s)] for s in seeds] for v in suite.variants}
        report["paired_ndcg@10_differences"] = {
            f"{v.label} - {suite.variants[0].label}": paired_difference(by_variant[v.key],
                                                                       by_variant[suite.variants[0].key])
            for v in suite.variants[1:]}
    return report


def run_label(variant: Variant, seed: int) -> str:
    return f"{variant.label}, seed {seed}"


def plot(reports: dict[str, dict], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 4, figsize=(20, 4.6 * len(reports)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (name, report) in zip(axes, reports.items()):
        variants = report["variants"]
        labels = [v["label"].replace(", ", "\n") for v in variants]
        score = "ndcg@10" if "zero_shot_ndcg@10" in report else "heldout_accuracy"
        panels = ((score, "nDCG@10, QMSum test" if score == "ndcg@10" else "held-out accuracy (16 meetings)"),
                  ("peak_memory_gib", "training peak memory (GiB)"), ("seconds_per_step", "seconds / optimizer step"))
        for axis, (figure, title) in zip(row, panels):
            means = [v[figure]["mean"] for v in variants]
            stds = [v[figure]["std"] for v in variants]
            axis.bar(range(len(variants)), means, yerr=stds, capsize=4, color=colours[:len(variants)])
            axis.set_xticks(range(len(variants)), labels, fontsize=8)
            axis.set_title(title)
            axis.grid(axis="y", alpha=0.3)
        if score == "ndcg@10":
            row[0].axhline(report["zero_shot_ndcg@10"], color="grey", linestyle="--", label="zero-shot")
            row[0].axhline(report["bm25_ndcg@10"], color="black", linestyle=":", label="BM25")
        else:
            row[0].axhline(report["heldout_before"]["mean"], color="grey", linestyle="--", label="before training")
        row[0].legend(fontsize=8)
        curve_axis = row[3]
        for colour, v in zip(colours, variants):
            curve = v["margin_curve"]
            low = [m - s for m, s in zip(curve["mean"], curve["std"])]
            high = [m + s for m, s in zip(curve["mean"], curve["std"])]
            curve_axis.plot(curve["steps"], curve["mean"], marker="o", markersize=3, color=colour, label=v["label"])
            curve_axis.fill_between(curve["steps"], low, high, color=colour, alpha=0.15)
        curve_axis.set_title("held-out cosine margin (mean ± std over seeds)")
        curve_axis.set_xlabel("optimizer step")
        curve_axis.grid(alpha=0.3)
        curve_axis.legend(fontsize=7)
        row[0].set_ylabel(report["title"], fontsize=9)
    fig.suptitle(f"Loss comparison ({subtitle})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(name: str, report: dict) -> None:
    print(f"\n{name}: {report['title']}")
    score = "ndcg@10" if "zero_shot_ndcg@10" in report else "heldout_accuracy"
    print(f"{'variant':<40}{score:>16}{'held-out margin':>18}{'peak GiB':>14}{'s/step':>14}")
    for v in report["variants"]:
        cells = [f"{v[k]['mean']:.3f} ± {v[k]['std']:.3f}" for k in (score, "heldout_margin")]
        cells += [f"{v[k]['mean']:.2f} ± {v[k]['std']:.2f}" for k in ("peak_memory_gib", "seconds_per_step")]
        print(f"{v['label']:<40}{cells[0]:>16}{cells[1]:>18}{cells[2]:>14}{cells[3]:>14}")
    if score == "ndcg@10":
        print(f"zero-shot nDCG@10 {report['zero_shot_ndcg@10']:.3f}, BM25 {report['bm25_ndcg@10']:.3f}")
        for key, diff in report["paired_ndcg@10_differences"].items():
            print(f"{key}: {diff['mean']:+.3f} ± {diff['ci95_half_width']:.3f} (95%, over {diff['queries']} queries)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, help="stop every run after this many optimizer steps (a quick look)")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1 on a shared CPU)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-losses")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "loco-embeddings",
                        help="eval's embedding cache, for the test-split scores")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "losses")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--jobs, --threads and --max-steps must be positive")
    from tqdm import tqdm

    from eval.models import ModelSpec

    started, load_before = time.perf_counter(), os.getloadavg()
    jobs = []  # (suite, variant, seed, command, run folder)
    for name in args.suites:
        suite = SUITES[name]
        extra = [f"model.name_or_path={tiny_export(args.work_dir / name / 'pretrained')}"] if name == "tiny-m2" else []
        extra += [f"training.max_steps={args.max_steps}"] if args.max_steps else []
        for seed in args.seeds:
            for variant in suite.variants:
                run_dir = args.work_dir / name / variant.key / f"seed{seed}"
                command = ["--config", str(REPO / "configs" / variant.config), *variant.overrides, *extra,
                           f"training.seed={seed}", f"negatives.seed={seed}", f"output.dir={run_dir}"]
                jobs.append((name, variant, seed, command, run_dir))
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="fine-tuning runs") as bar:
        futures = [pool.submit(train, command, run_dir, args.threads) for *_, command, run_dir in jobs]
        for future in futures:
            future.result()
            bar.update(1)
    runs = {name: {v.key: [] for v in SUITES[name].variants} for name in args.suites}
    for name, variant, seed, _, run_dir in jobs:
        runs[name][variant.key].append(run_result(run_dir, seed))

    reports = {}
    for name in args.suites:
        suite = SUITES[name]
        ndcg = None
        if suite.test_split:
            specs = [ModelSpec("all-MiniLM-L6-v2", max_length=EVAL_LENGTH, label="all-MiniLM-L6-v2 (zero-shot)"),
                     ModelSpec("bm25")]
            specs += [ModelSpec(r["export"], max_length=EVAL_LENGTH, label=run_label(v, r["seed"]))
                      for v in suite.variants for r in runs[name][v.key]]
            ndcg = per_query_ndcg(specs, args.cache_dir)
        reports[name] = summarise(suite, runs[name], ndcg)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "losses.json"
    previous = json.loads(json_path.read_text()).get("suites", {}) if json_path.is_file() else {}
    device = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch thread(s)"
    for report in reports.values():
        report.update(device=device, jobs=args.jobs, seeds=args.seeds, max_steps=args.max_steps,
                      load_average_before=load_before, load_average_after=os.getloadavg(),
                      wall_seconds=time.perf_counter() - started,
                      command=" ".join(["python bench/losses.py", *(sys.argv[1:] if argv is None else argv)]))
    suites = {**previous, **reports}
    json_path.write_text(json.dumps({"benchmark": "losses", "suites": suites}, indent=2) + "\n")
    plot(suites, args.out / "losses.png", f"{device}, {args.jobs} run(s) at a time")
    for name, report in reports.items():
        print_report(name, report)
    print(f"\nwrote {json_path} and {args.out / 'losses.png'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
