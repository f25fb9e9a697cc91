"""Run logging: console set-up, metrics to TensorBoard and JSON lines, a rank-0 progress bar and PNG training
curves (peak memory: `train.memory`)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from eval.data import read_json_lines

METRICS_FILE = "metrics.jsonl"


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Console logging: INFO on rank 0, warnings only on the other ranks (each line names its rank)."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricsLogger:
    """Scalars per step to TensorBoard (`<dir>/tensorboard`) and to `<dir>/metrics.jsonl`, on rank 0 only.

    Each JSON line is `{"step": s, "split": "train"|"eval", ...metrics}`; appending keeps the history of
    a resumed run, and `read_metrics` keeps the last record of each (split, step).
    """

    def __init__(self, directory: str | Path, enabled: bool, tensorboard: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = None
        self._file = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.directory / METRICS_FILE, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.directory / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(directory: str | Path, split: str) -> list[dict]:
    """The records of `split` in `<directory>/metrics.jsonl`, one per step (the last written wins), by step."""
    by_step = {record["step"]: record for _, record in read_json_lines(Path(directory) / METRICS_FILE)
               if record.get("split") == split}
    return [by_step[s] for s in sorted(by_step)]


def progress_bar(total: int, initial: int, enabled: bool, description: str):
    """A tqdm bar on the main process; a disabled (silent) one elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def plot_training_curves(directory: str | Path, output: str | Path, panels: tuple[str, ...] = ("loss", "accuracy"),
                         title: str = "") -> Path:
    """One PNG with a panel per metric, train and eval curves against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = {split: read_metrics(directory, split) for split in ("train", "eval")}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, key in zip(axes[0], panels):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in splits[split] if key in r and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=split, markersize=3)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
