"""Resumable DeepSpeed checkpoints and `save_pretrained` exports.

A checkpoint is DeepSpeed's own (model, ZeRO optimizer partitions, lr scheduler) under `<dir>/<tag>/`,
with the run's state inside it as DeepSpeed's `client_state` (the trainer's step and the task's
`state_dict`, e.g. the data-loader position), plus one `rng_rank{r}.pt` per rank holding that rank's
random-number state and the task's per-rank tensors (e.g. its masking generator), so that a resumed run
draws the same batches, dropout and masking as an uninterrupted one. DeepSpeed's `latest` file names the
newest complete checkpoint. `train.trainer.Trainer` is the only caller.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .distributed import barrier, gather_full_state_dict, is_main_process

logger = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step(\d+)$")
LATEST_FILE = "latest"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def capture_rng_state() -> dict[str, torch.Tensor]:
    """This process's torch random-number generators (CPU and, when present, the current CUDA device)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


class CheckpointManager:
    """Saves, finds, loads and prunes the DeepSpeed checkpoints of one run directory.

    `rank_state` adds per-rank tensors (e.g. a masking generator's state) to each rank's file.
    """

    def __init__(self, directory: str | Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def tags(self) -> list[str]:
        """Checkpoint tags on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
        return sorted(found, key=lambda tag: int(TAG_PATTERN.match(tag).group(1)))

    def latest(self) -> str | None:
        """The tag DeepSpeed marked as latest (complete), or None when the run has no checkpoint."""
        path = self.directory / LATEST_FILE
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.directory / tag).is_dir():
            raise FileNotFoundError(f"{path} names checkpoint {tag!r}, which is not in {self.directory}")
        return tag

    def save(self, engine, step: int, client_state: dict, rank_state: dict[str, torch.Tensor] | None = None) -> Path:
        """Collective: write the checkpoint of optimizer step `step` on every rank, then prune old ones."""
        tag = step_tag(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=True)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        state = {"rng": capture_rng_state(), "extra": dict(rank_state or {})}
        torch.save(state, self.directory / tag / f"rng_rank{rank}.pt")
        barrier()
        if is_main_process():
            for old in self.tags()[:-self.keep_last]:
                shutil.rmtree(self.directory / old)
                logger.info("removed old checkpoint %s", self.directory / old)
        barrier()
        return self.directory / tag

    def load(self, engine, tag: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Collective: restore engine, optimizer and scheduler from `tag` (default latest) and this rank's
        random state. Returns (client_state, rank_state extras)."""
        tag = tag or self.latest()
        if tag is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{self.directory / tag}: DeepSpeed could not load this checkpoint")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rank_file = self.directory / tag / f"rng_rank{rank}.pt"
        if not rank_file.is_file():  # more processes than the run that wrote it
            logger.warning("%s: missing; this rank keeps fresh random state", rank_file)
            return client_state or {}, {}
        state = torch.load(rank_file, map_location="cpu", weights_only=True)
        restore_rng_state(state["rng"])
        logger.info("resumed from %s", self.directory / tag)
        return client_state or {}, state.get("extra", {})


def export_pretrained(engine, fresh_model: Callable[[], torch.nn.Module], save: Callable[[torch.nn.Module, Path], None],
                      directory: str | Path) -> Path | None:
    """Collective: write the engine's model in fp32, whatever the ZeRO stage or precision, with
    `save(model, directory)` (e.g. `save_pretrained`, or `TextEncoder.save` for fine-tuned encoders).

    `fresh_model` makes a model of the same class and config on CPU; it receives the full fp32
    parameters and keeps its own freshly computed buffers (the Hyena time grid and decay rates are
    functions of the config, and in bf16 training the engine's copies are rounded).
    """
    state = gather_full_state_dict(engine)
    path = None
    if is_main_process():
        model = fresh_model()
        missing, unexpected = model.load_state_dict(state, strict=False)
        buffers = {name for name, _ in model.named_buffers()}
        tied = set(getattr(model, "tied_weight_keys", ()))
        missing = [k for k in missing if k not in buffers and k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"export to {directory}: parameters do not match the model "
                               f"(missing {missing}, unexpected {unexpected})")
        path = Path(directory)
        save(model, path)
        logger.info("exported %s to %s", type(model).__name__, path)
    barrier()
    return path
