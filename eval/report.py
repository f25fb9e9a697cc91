"""Benchmark outputs: the models x tasks table (markdown), results.json, results.csv and scores.png.

Files hold metric values as fractions in [0, 1]; the markdown table and the chart show them x100,
as the paper does. The average is the mean over tasks (LoCo's score), not over queries.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .benchmark import TaskResult
from .metrics import HEADLINE_METRIC, METRICS

AVERAGE = "Average"


def score_table(results: list[TaskResult], metric: str = HEADLINE_METRIC) -> pd.DataFrame:
    """Models (rows, in run order) x tasks (columns, in run order) plus the average over tasks."""
    frame = pd.DataFrame([{"model": r.model, "task": r.task, "value": r.metrics[metric]} for r in results])
    models = list(dict.fromkeys(frame["model"]))
    tasks = list(dict.fromkeys(frame["task"]))
    table = frame.pivot(index="model", columns="task", values="value").loc[models, tasks]
    table[AVERAGE] = table[tasks].mean(axis=1)
    table.columns.name = None
    return table


def markdown_table(table: pd.DataFrame, title: str = "model") -> str:
    """`table` (fractions) as a markdown table of percentages with one decimal."""
    header = [title, *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for model, row in table.iterrows():
        cells = ["–" if np.isnan(value) else f"{100 * value:.1f}" for value in row]
        lines.append("| " + " | ".join([str(model), *cells]) + " |")
    return "\n".join(lines)


def write_outputs(output_dir: Path, results: list[TaskResult], models: list[dict], settings: dict) -> dict[str, Path]:
    """Write results.json, results.csv and scores.png into `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "csv": output_dir / "results.csv", "png": output_dir / "scores.png"}
    averages = {metric: score_table(results, metric)[AVERAGE].to_dict() for metric in METRICS}
    document = {
        "settings": settings,
        "metric_scale": "fraction (0-1)",
        "models": models,
        "results": [dataclasses.asdict(result) for result in results],
        "averages": {model: {metric: averages[metric][model] for metric in METRICS} for model in averages[HEADLINE_METRIC]},
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    _results_frame(results, averages).to_csv(paths["csv"], index=False)
    plot_scores(score_table(results), paths["png"], title=f"LoCo {HEADLINE_METRIC} (split {settings.get('split')})")
    return paths


def _results_frame(results: list[TaskResult], averages: dict[str, dict[str, float]]) -> pd.DataFrame:
    rows = [{"model": r.model, "task": r.task, "n_queries": r.n_queries, "n_documents": r.n_documents,
             **r.metrics, "seconds": round(r.seconds, 3), "embedded": r.embedded, "cached": r.cached}
            for r in results]
    for model in averages[HEADLINE_METRIC]:
        own = [r for r in results if r.model == model]
        rows.append({"model": model, "task": AVERAGE, "n_queries": sum(r.n_queries for r in own),
                     "n_documents": sum(r.n_documents for r in own),
                     **{metric: averages[metric][model] for metric in METRICS},
                     "seconds": round(sum(r.seconds for r in own), 3)})
    # Nullable integers: BM25 rows have no embedding counts.
    return pd.DataFrame(rows).astype({"embedded": "Int64", "cached": "Int64"})


def plot_scores(table: pd.DataFrame, path: Path, title: str) -> None:
    """Grouped bar chart: one group per task (and the average), one bar per model."""
    from matplotlib.figure import Figure

    n_models, n_groups = table.shape
    width = 0.8 / n_models
    figure = Figure(figsize=(max(6.0, 1.2 + n_groups * (0.35 + 0.25 * n_models)), 4.5), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(n_groups)
    for row, (model, values) in enumerate(table.iterrows()):
        offsets = positions - 0.4 + width * (row + 0.5)
        bars = axes.bar(offsets, 100 * values.to_numpy(), width, label=str(model))
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axes.set_xticks(positions, table.columns, rotation=30 if n_groups > 4 else 0, ha="right" if n_groups > 4 else "center")
    axes.set_ylim(0, 105)
    axes.set_ylabel(f"{HEADLINE_METRIC} (x100)")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, dpi=120)
