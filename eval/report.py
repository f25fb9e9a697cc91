"""Benchmark outputs: the models x tasks tables (markdown), results.json, results.csv and the plots.

Files hold metric values as fractions in [0, 1]; the markdown tables and the charts show them x100,
as the papers do. A table shows one metric for every task, or each task's own main metric (`MAIN`:
nDCG@10 for LoCo, nDCG@1 for LongEmbed's needle and passkey lengths). The average is over tasks
(LoCo's and LongEmbed's score), not over queries; the lengths of one synthetic task (a `group`)
count once, as their mean. A model that failed (its description has an `error`) is kept in every
output: its missing scores are blank, its average is blank, and the files carry its error.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from .benchmark import TaskResult
from .longembed import parse_length_task
from .metrics import HEADLINE_METRIC, METRICS

AVERAGE = "Average"
MAIN = "main"  # each task's own main metric


def score_table(results: list[TaskResult], metric: str = MAIN, models: list[str] | None = None,
                tasks: list[str] | None = None) -> pd.DataFrame:
    """Models (rows, in run order) x tasks (columns, in run order) plus the average over tasks; `models`
    and `tasks` (default: those of `results`) add rows and columns for what has no result (NaN), such as
    a model that failed. A model missing a task has no average."""
    models = list(dict.fromkeys([*(models or []), *(r.model for r in results)]))
    tasks = list(dict.fromkeys([*(tasks or []), *(r.task for r in results)]))
    table = pd.DataFrame(np.nan, index=pd.Index(models, name="model"), columns=tasks, dtype=float)
    for r in results:
        table.loc[r.model, r.task] = r.main_score if metric == MAIN else r.metrics[metric]
    groups = {task: task for task in tasks} | {r.task: r.group or r.task for r in results}
    # Mean within each group, then over groups (a task without a group is a group of its own).
    average = table[tasks].T.groupby([groups[task] for task in tasks], sort=False).mean().mean(axis=0)
    table[AVERAGE] = average.where(table[tasks].notna().all(axis=1))
    return table


def metric_title(results: list[TaskResult], metric: str = MAIN) -> str:
    """What a table of `metric` shows, e.g. "nDCG@10" or "main metric (nDCG@10; nDCG@1 for ...)"."""
    if metric != MAIN:
        return metric
    used = sorted(dict.fromkeys(r.metric for r in results), key=lambda m: m != HEADLINE_METRIC)
    if not used:  # every model failed
        return HEADLINE_METRIC
    if len(used) == 1:
        return used[0]
    by_metric = {m: list(dict.fromkeys(r.group or r.task for r in results if r.metric == m)) for m in used}
    first, *others = used
    return f"{first}; " + "; ".join(f"{m} for {', '.join(by_metric[m])}" for m in others)


def markdown_table(table: pd.DataFrame, title: str = "model") -> str:
    """`table` (fractions) as a markdown table of percentages with one decimal."""
    header = [title, *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for model, row in table.iterrows():
        cells = ["–" if np.isnan(value) else f"{100 * value:.1f}" for value in row]
        lines.append("| " + " | ".join([str(model), *cells]) + " |")
    return "\n".join(lines)


def full_table(results: list[TaskResult], models: list[dict], settings: dict, metric: str = MAIN) -> pd.DataFrame:
    """`score_table` with a row for every model described (failed ones too) and a column for every task run."""
    return score_table(results, metric, [m["label"] for m in models], settings.get("tasks"))


def write_outputs(output_dir: Path, results: list[TaskResult], models: list[dict], settings: dict) -> dict[str, Path]:
    """Write results.json, results.csv, scores.png and (for per-length tasks) lengths.png; their paths.
    `models` describes every model run, in order; a failed one has an `error`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "csv": output_dir / "results.csv", "png": output_dir / "scores.png"}
    averages = {metric: full_table(results, models, settings, metric)[AVERAGE].to_dict() for metric in (MAIN, *METRICS)}
    document = {
        "settings": settings,
        "metric_scale": "fraction (0-1)",
        "models": models,
        "failed": {m["label"]: m["error"] for m in models if "error" in m},
        "results": [dataclasses.asdict(result) for result in results],
        # A model without an average (it failed on some task) has null: JSON has no NaN.
        "averages": {model: {metric: None if np.isnan(values[model]) else values[model]
                             for metric, values in averages.items()} for model in averages[MAIN]},
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    _results_frame(results, averages, models, settings.get("tasks") or []).to_csv(paths["csv"], index=False)
    plot_scores(full_table(results, models, settings), paths["png"],
                title=f"{metric_title(results)} x100 (split {settings.get('split')})")
    if plot_length_curves(results, output_dir / "lengths.png"):
        paths["lengths"] = output_dir / "lengths.png"
    return paths


def _results_frame(results: list[TaskResult], averages: dict[str, dict[str, float]], models: list[dict],
                   tasks: list[str]) -> pd.DataFrame:
    """One row per model and task (a failed model's unscored tasks: its error), then one average per model."""
    errors = {m["label"]: m["error"] for m in models if "error" in m}
    rows = [{"model": r.model, "task": r.task, "n_queries": r.n_queries, "n_documents": r.n_documents,
             "main_metric": r.metric, MAIN: r.main_score, **r.metrics, "seconds": round(r.seconds, 3),
             "embedded": r.embedded, "cached": r.cached}
            for r in results]
    for model, error in errors.items():
        scored = {r.task for r in results if r.model == model}
        rows += [{"model": model, "task": task, "error": error} for task in tasks if task not in scored]
    for model in averages[MAIN]:
        own = [r for r in results if r.model == model]
        rows.append({"model": model, "task": AVERAGE, "n_queries": sum(r.n_queries for r in own),
                     "n_documents": sum(r.n_documents for r in own), "main_metric": MAIN,
                     **{metric: values[model] for metric, values in averages.items()},
                     "seconds": round(sum(r.seconds for r in own), 3), "error": errors.get(model)})
    # Nullable integers: BM25 rows have no embedding counts.
    return pd.DataFrame(rows, columns=_CSV_COLUMNS).astype({"n_queries": "Int64", "n_documents": "Int64",
                                                            "embedded": "Int64", "cached": "Int64"})


_CSV_COLUMNS = ["model", "task", "n_queries", "n_documents", "main_metric", MAIN, *METRICS, "seconds", "embedded",
                "cached", "error"]


def plot_scores(table: pd.DataFrame, path: Path, title: str) -> None:
    """Write `scores_figure` to `path`."""
    scores_figure(table, title).savefig(path, dpi=120)


def scores_figure(table: pd.DataFrame, title: str):
    """Grouped bar chart: one group per task (and the average), one bar per model, labelled x100
    with one decimal. Task names are slanted when many or long; long model names wrap in the legend."""
    from matplotlib.figure import Figure

    n_models, n_groups = table.shape
    width = 0.8 / n_models
    figure = Figure(figsize=(max(6.0, 1.5 + n_groups * (0.3 + 0.32 * n_models)), 5.0), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(n_groups)
    for row, (model, values) in enumerate(table.iterrows()):
        offsets = positions - 0.4 + width * (row + 0.5)
        scores = 100 * values.to_numpy()
        # A model without an average has failed somewhere: the legend says so, its missing bars stay blank.
        label = str(model) + (" (failed)" if np.isnan(scores[-1]) else "")
        bars = axes.bar(offsets, np.nan_to_num(scores), width, label=textwrap.fill(label, 40))
        axes.bar_label(bars, labels=["" if np.isnan(s) else f"{s:.1f}" for s in scores], fontsize=6, padding=1,
                       rotation=90 if n_models > 1 else 0)
    labels = [str(task) for task in table.columns]
    slanted = n_groups > 4 or max(map(len, labels)) > 10  # slanted labels never run into each other
    axes.set_xticks(positions, labels, rotation=40 if slanted else 0, ha="right" if slanted else "center",
                    rotation_mode="anchor", fontsize=8)
    axes.set_xlim(-0.6, n_groups - 0.4)
    axes.set_ylim(0, 112)
    axes.set_ylabel("score (x100)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def plot_length_curves(results: list[TaskResult], path: Path) -> bool:
    """Score against document length for tasks split by length (LongEmbed's needle and passkey,
    `needle-L256`, ...): one panel per task, one line per model, the length on a log scale.
    False (and nothing written) when no such task ran."""
    from matplotlib.figure import Figure

    points = [(r.group, parse_length_task(r.task)[1], r.model, r.main_score, r.metric)
              for r in results if r.group and parse_length_task(r.task)]
    if not points:
        return False
    groups = list(dict.fromkeys(point[0] for point in points))
    models = list(dict.fromkeys(point[2] for point in points))
    figure = Figure(figsize=(1.0 + 4.2 * len(groups), 3.8), layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(groups), squeeze=False)[0])
    for panel, group in zip(panels, groups):
        for model in models:
            curve = sorted((length, score) for g, length, m, score, _ in points if g == group and m == model)
            if curve:
                lengths, scores = zip(*curve)
                panel.plot(lengths, [100 * s for s in scores], marker="o", label=textwrap.fill(model, 36))
        lengths = sorted({length for g, length, *_ in points if g == group})
        panel.set_xscale("log", base=2)
        panel.set_xticks(lengths, [f"{length // 1024}k" if length >= 1024 else str(length) for length in lengths])
        panel.set_ylim(-3, 103)
        panel.set_xlabel("document length (tokens)")
        metric = next(point[4] for point in points if point[0] == group)
        panel.set_ylabel(f"{metric} (x100)")
        panel.set_title(group)
        panel.grid(alpha=0.3)
    panels[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)
    return True
