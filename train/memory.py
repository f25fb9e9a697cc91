"""Peak memory of one phase of a run (e.g. training, after the data and model are loaded).

On a GPU this is the CUDA allocator's peak since `reset_peak_memory`. On a CPU it is the process's
resident-set high-water mark (`VmHWM`), which Linux resets when "5" is written to /proc/self/clear_refs;
`resource.getrusage` cannot be reset, so it would also count loading-time peaks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak from now on."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as err:  # not Linux, or a sandbox that forbids it: the peak then covers the whole process
        logger.warning("cannot reset the resident-set peak (%s): peak memory includes loading", err)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory` (CUDA allocator, or resident set on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
