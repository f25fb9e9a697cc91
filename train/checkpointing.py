"""Resumable DeepSpeed checkpoints, published whole or not at all, and `save_pretrained` exports.

A checkpoint `<dir>/stepNNNNNNNN/` holds DeepSpeed's files (model, ZeRO optimizer partitions, lr scheduler)
with the run's state inside them as DeepSpeed's `client_state` (the trainer's step and the task's
`state_dict`, e.g. the data-loader position), plus one `rng_rank{r}.pt` per rank holding that rank's
random-number state and the task's per-rank tensors (e.g. its masking generator), so that a resumed run
draws the same batches, dropout and masking as an uninterrupted one. `train.trainer.Trainer` is the only caller.

Publication, for shared storage where any process may be killed at any moment:
  1. every rank writes its parts into a hidden staging folder `.stepNNNNNNNN.checkpoint-partial` and flushes
     them to storage; a barrier;
  2. rank 0 writes `manifest.json` (every file with its size, as the rank that wrote it sees it) into it,
     renames it to `stepNNNNNNNN` and then atomically replaces the pointer `latest` (for DeepSpeed's own
     tools, e.g. `zero_to_fp32.py`);
  3. rank 0 prunes: it keeps the newest `keep_last` complete checkpoints up to the new one (never the new one,
     never a newer one) and removes older ones and the staging leftovers of killed attempts.
A folder named `stepNNNNNNNN` is therefore complete when its manifest matches its files. `--resume` takes the
newest complete checkpoint (rank 0 decides for all ranks): a newer one with missing, resized or unreadable
parts is skipped with a warning naming them; checkpoints on disk but none complete (or a pointer naming a
checkpoint that is gone) is an error, never a silent restart from step 0; a file that would run code when
loaded is an error naming it (`train.checkpoint_loading`: every file is loaded with `weights_only=True`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .distributed import barrier, gather_full_state_dict, is_main_process
from .files import atomic_write_text, fsync_files, publish_folder, staging_folder, staging_path

logger = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step(\d+)$")
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A run folder's checkpoints cannot be resumed from; the message names the checkpoint or file and why."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def tag_step(tag: str) -> int:
    return int(TAG_PATTERN.match(tag).group(1))


def process_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


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


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative name -> size in bytes), as this process sees it."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def merge_file_sizes(views: list[dict[str, int]]) -> dict[str, int]:
    """One listing from several processes' views of a folder whose files are complete: the union, each file at
    the largest size seen (a lagging view sees a file shorter, or not at all)."""
    merged: dict[str, int] = {}
    for view in views:
        for name, size in view.items():
            merged[name] = max(size, merged.get(name, 0))
    return dict(sorted(merged.items()))


def gather_from_all(value) -> list:
    """Collective: every rank's `value`, in rank order."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def broadcast_from_main(value):
    """Collective: rank 0's `value` on every rank."""
    if not torch.distributed.is_initialized():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class CheckpointManager:
    """Saves, finds, checks, loads and prunes the DeepSpeed checkpoints of one run directory.

    `rank_state` adds per-rank tensors (e.g. a masking generator's state) to each rank's file.
    """

    def __init__(self, directory: str | Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    # --- what is on disk ------------------------------------------------------------------------------
    def tags(self) -> list[str]:
        """Published checkpoint folders (complete or damaged since), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
        return sorted(found, key=tag_step)

    def problems(self, tag: str) -> list[str]:
        """Why checkpoint `tag` is not complete, naming its files ([] when its manifest matches its files)."""
        folder = self.directory / tag
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [f"{folder / MANIFEST_FILE} is missing (the checkpoint was never published whole)"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return [f"{folder / MANIFEST_FILE} cannot be read ({err})"]
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (not isinstance(files, dict) or manifest.get("tag") != tag
                or not all(isinstance(size, int) for size in files.values())):
            return [f"{folder / MANIFEST_FILE} is not the manifest of checkpoint {tag}"]
        found = []
        for name, size in sorted(files.items()):
            path = folder / name
            if not path.is_file():
                found.append(f"{path} is missing")
            elif path.stat().st_size != size:
                found.append(f"{path} has {path.stat().st_size} bytes, the manifest lists {size} "
                             "(truncated or replaced)")
        return found

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        return next((tag for tag in reversed(self.tags()) if not self.problems(tag)), None)

    def has_checkpoints(self) -> bool:
        """Whether the run directory holds a checkpoint or a pointer to one (complete or not)."""
        return bool(self.tags()) or (self.directory / LATEST_FILE).exists()

    # --- saving -------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, rank_state: dict[str, torch.Tensor] | None = None) -> Path:
        """Collective: write the checkpoint of optimizer step `step` on every rank, publish it, prune old ones."""
        tag = step_tag(step)
        target = self.directory / tag
        staging = staging_path(target, "checkpoint")
        if is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            staging_folder(target, "checkpoint")
        barrier()
        engine.save_checkpoint(str(self.directory), tag=staging.name, client_state=client_state, save_latest=False)
        state = {"rng": capture_rng_state(), "extra": dict(rank_state or {})}
        torch.save(state, staging / f"rng_rank{process_rank()}.pt")
        fsync_files(staging)  # this rank's parts reach the storage before rank 0 declares the checkpoint whole
        barrier()
        # Each rank sees its own files exactly; on a network file system rank 0's view of the others' may lag.
        files = merge_file_sizes(gather_from_all(file_sizes(staging)))
        if is_main_process():
            world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            self.publish(staging, tag, step, world_size, files)
            self.prune(tag)
        barrier()
        return target

    def publish(self, staging: Path, tag: str, step: int, world_size: int, files: dict[str, int]) -> None:
        """Rank 0, once every rank's parts (`files`: name -> size) are in `staging`: the manifest, the folder's
        final name, then the pointer."""
        import deepspeed

        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "step": step, "world_size": world_size,
                    "deepspeed": deepspeed.__version__, "torch": torch.__version__, "files": files}
        atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        target = self.directory / tag
        if target.exists():
            logger.warning("replacing %s (%s)", target, "; ".join(self.problems(tag)) or "a complete earlier copy")
        publish_folder(staging, target)
        atomic_write_text(self.directory / LATEST_FILE, tag)

    def prune(self, newest: str) -> None:
        """Rank 0: keep the `keep_last` newest complete checkpoints up to `newest` (itself always); remove older
        checkpoints (complete or damaged) and the staging folders of killed attempts. Newer ones are left alone."""
        step = tag_step(newest)
        older = [tag for tag in self.tags() if tag_step(tag) < step]
        complete_older = [tag for tag in older if not self.problems(tag)]
        kept = set(complete_older[max(0, len(complete_older) - (self.keep_last - 1)):])
        for tag in older:
            if tag not in kept:
                shutil.rmtree(self.directory / tag)
                logger.info("removed old checkpoint %s", self.directory / tag)
        for leftover in self.directory.glob(".step*.checkpoint-partial"):
            shutil.rmtree(leftover)
            logger.info("removed %s, left by an interrupted checkpoint", leftover)
        newer = [tag for tag in self.tags() if tag_step(tag) > step]
        if newer:
            logger.warning("%s holds checkpoints newer than %s (%s): is another run writing to this folder?",
                           self.directory, newest, ", ".join(newer))

    # --- resuming -----------------------------------------------------------------------------------------
    def choose(self) -> str | None:
        """Rank 0: the newest complete checkpoint whose files are all loadable archives, or None when the run
        has none yet. Newer ones that are not are skipped with a warning naming what is wrong. CheckpointError
        when checkpoints exist but none is complete, when the pointer names one that is gone, or when a file
        of the chosen one would run code when loaded (that is refused, not skipped)."""
        from .checkpoint_loading import CheckpointFileError, unsafe_globals

        skipped = []
        for tag in reversed(self.tags()):
            problems = self.problems(tag)
            if not problems:
                folder = self.directory / tag
                for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
                    try:
                        unsafe = unsafe_globals(path)
                    except CheckpointFileError as err:
                        problems.append(str(err))
                        continue
                    if unsafe:
                        raise CheckpointError(f"{path}: refused: loading it would run {unsafe} (checkpoint files "
                                              "may hold only tensors and plain data; they are loaded with "
                                              "weights_only=True)")
            if not problems:
                if skipped:
                    logger.warning("resuming from %s, the newest complete checkpoint (the newer %s %s not)",
                                   self.directory / tag, ", ".join(skipped), "is" if len(skipped) == 1 else "are")
                return tag
            skipped.append(tag)
            logger.warning("%s is incomplete, not resuming from it: %s", self.directory / tag, "; ".join(problems))
        if skipped:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from ({', '.join(skipped)} "
                                  "incomplete: see the warnings above); refusing to start again from step 0 over "
                                  "them: remove the folder, or choose another output.dir")
        pointer = self.directory / LATEST_FILE
        if pointer.exists():
            named = pointer.read_text(encoding="utf-8", errors="replace").strip()
            raise CheckpointError(f"{pointer} names checkpoint {named!r}, which is not in {self.directory}; refusing "
                                  "to start again from step 0: remove the folder, or choose another output.dir")
        return None

    def load(self, engine) -> tuple[str, dict, dict[str, torch.Tensor]] | None:
        """Collective: restore engine, optimizer and scheduler from the newest complete checkpoint (`choose`) and
        this rank's random state, reading every file with `weights_only=True`. Returns (tag, client_state,
        rank_state extras), or None when the run has no checkpoint yet."""
        from .checkpoint_loading import load_weights_only, use_weights_only_loading, weights_only_loading

        decision = None
        if is_main_process():
            try:
                decision = ("tag", self.choose())
            except CheckpointError as err:
                decision = ("error", str(err))
        kind, value = broadcast_from_main(decision)
        if kind == "error":
            raise CheckpointError(value)
        tag = value
        if tag is None:
            return None
        use_weights_only_loading(engine)
        with weights_only_loading():
            path, client_state = engine.load_checkpoint(str(self.directory), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{self.directory / tag}: DeepSpeed found no model states to load")
        rank_file = self.directory / tag / f"rng_rank{process_rank()}.pt"
        if not rank_file.is_file():  # more processes than the run that wrote it (its manifest lists its own)
            logger.warning("%s: missing; this rank keeps fresh random state", rank_file)
            return tag, client_state or {}, {}
        state = load_weights_only(rank_file, map_location="cpu")
        restore_rng_state(state["rng"])
        logger.info("resumed from %s", self.directory / tag)
        return tag, client_state or {}, state.get("extra", {})


def export_pretrained(engine, fresh_model: Callable[[], torch.nn.Module], save: Callable[[torch.nn.Module, Path], None],
                      directory: str | Path) -> Path | None:
    """Collective: write the engine's model in fp32, whatever the ZeRO stage or precision, with
    `save(model, directory)` (e.g. `save_pretrained`, or `TextEncoder.save` for fine-tuned encoders), into a
    staging sibling first, so that `directory` holds a whole export or none.

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
        staging = staging_folder(path, "export")
        save(model, staging)
        publish_folder(staging, path)
        logger.info("exported %s to %s", type(model).__name__, path)
    barrier()
    return path
