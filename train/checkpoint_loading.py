"""Reading checkpoint files without running code from them.

A pickle can name any function to call while it loads, so a crafted file in a run folder would run code in
every rank that resumes from it. Every file of a checkpoint is therefore read weights-only (`torch.load`
with `weights_only=True`): tensors and plain data (dicts, lists, numbers, strings), plus the few DeepSpeed classes its
ZeRO optimizer partitions hold (`DEEPSPEED_SAFE_GLOBALS`, plain records). DeepSpeed reads its files through
its checkpoint-engine abstraction; `WeightsOnlyCheckpointEngine` is its torch engine with this `load`.
`unsafe_globals` finds what a file would run without loading it (a static read of its pickle), so that the
checkpoint can be refused by rank 0 for all ranks before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed 0.19 pickles into ZeRO 1/2/3 optimizer partitions besides tensors and plain data (fp32, bf16,
# torch autocast): an int enum, a dataclass of two ints and a record of the (static) loss scale.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, fragment_address, LossScaler]


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be loaded, or that would run code when loaded; the message names it."""


@contextlib.contextmanager
def weights_only_loading():
    """Within: every `torch.load` in this process is weights-only, whatever its caller asks (torch's
    `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, for the loads DeepSpeed makes outside its checkpoint engine, such as
    universal checkpoints), and DeepSpeed's classes are allowed."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_weights_only(path: str | Path, map_location=None):
    """`torch.load(path, weights_only=True)` with DeepSpeed's classes allowed; errors name the file."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFileError(f"{path}: refused: loading it would need more than tensors and plain data "
                                  f"(checkpoints are loaded with weights_only=True): {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(f"{path}: cannot be read (truncated or damaged?): {err}") from err


def unsafe_globals(path: str | Path) -> list[str]:
    """The functions and classes the pickle in `path` (a `torch.save` archive) names beyond what weights-only
    loading allows, read statically (nothing is loaded). CheckpointFileError when it is not a readable archive."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(f"{path}: not a readable torch.save archive (truncated or damaged?): {err}") from err


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine (it writes the same files) that loads with `load_weights_only`."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


def use_weights_only_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with `WeightsOnlyCheckpointEngine`. Only DeepSpeed's default
    torch engine is replaced: another one configured in the `deepspeed` block is refused."""
    current = engine.checkpoint_engine
    if isinstance(current, WeightsOnlyCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"the deepspeed block selects checkpoint engine {type(current).__name__}; resuming "
                         "loads checkpoints with weights_only=True through DeepSpeed's torch engine only")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
