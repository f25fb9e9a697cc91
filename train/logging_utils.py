"""Run logging: console set-up, metrics to TensorBoard and JSON lines, a rank-0 progress bar and PNG training
curves (peak memory: `train.memory`)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from eval.data import read_json_lines
from train.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger(__name__)


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

    Each JSON line is `{"step": s, "split": "train"|"eval", ...metrics}`, one per (split, step). A run resumed
    from the checkpoint of step S (`resumed_from`) keeps what was logged up to S and drops what the interrupted
    attempt logged after it (those steps are trained again): `metrics.jsonl` is rewritten atomically without
    them (and without a line torn by the kill), and TensorBoard is told to purge them. A fresh run
    (`resumed_from` None) drops what an attempt without a checkpoint logged.
    """

    def __init__(self, directory: str | Path, enabled: bool, tensorboard: bool = True, resumed_from: int | None = None):
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = None
        self._file = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            last_kept = -1 if resumed_from is None else resumed_from
            path = self.directory / METRICS_FILE
            if path.exists():
                truncate_metrics(path, last_kept)
            self._file = open(path, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                log_dir = self.directory / "tensorboard"
                # Events of steps after `last_kept` written by an earlier attempt are hidden from TensorBoard.
                purge_step = last_kept + 1 if log_dir.is_dir() else None
                self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

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


def truncate_metrics(path: Path, last_kept: int) -> None:
    """Rewrite the metrics file `path` (atomically) without its records of steps after `last_kept`, and
    without a last line torn by a kill. Any other line that is not a JSON record is an error naming it."""
    text = path.read_text(encoding="utf-8")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    torn = False
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1][1])
        except json.JSONDecodeError:
            logger.warning("%s, line %d: dropped, cut short when the run was killed", path, lines[-1][0])
            lines.pop()
            torn = True
    kept = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: not a metrics record (no integer step)")
        if record["step"] <= last_kept:
            kept.append(line)
    if len(kept) < len(lines) or torn:
        logger.info("%s: dropped %d record(s) logged after %s by an attempt interrupted before its next "
                    "checkpoint", path, len(lines) - len(kept), f"step {last_kept}" if last_kept >= 0 else "the start")
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(directory: str | Path, split: str) -> list[dict]:
    """The records of `split` in `<directory>/metrics.jsonl`, by step (the file holds one per step; were a
    step there twice, the last written would win)."""
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
