"""Writing files and folders so that a reader, or a run resumed after a kill, finds the old version or the new
one and never a part of either: write to a temporary sibling, flush it to storage, then rename (a rename within
one file system is atomic, on local disks as on Lustre, GPFS and NFS).

Used for checkpoints and their `latest` pointer (`train.checkpointing`), the rewritten `metrics.jsonl`
(`train.logging_utils`), the exported model and the warm start (`train.warm_start`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_directory(path: str | Path) -> None:
    """Make the names created or renamed in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_files(directory: str | Path) -> None:
    """Flush every file under `directory` to storage (what this process wrote there and had not yet flushed)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` in one step: the file holds either its old content or all of `text`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def staging_path(target: str | Path, purpose: str) -> Path:
    """The hidden sibling of `target` in which its new content is built (`.<name>.<purpose>-partial`)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{purpose}-partial")


def staging_folder(target: str | Path, purpose: str) -> Path:
    """`staging_path`, created empty (a leftover of a killed attempt is removed)."""
    staging = staging_path(target, purpose)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish_folder(staging: str | Path, target: str | Path) -> None:
    """Move the finished folder `staging` to `target`, replacing an earlier `target` if there is one: the
    earlier folder is renamed aside first and deleted only once the new one is in place."""
    staging, target = Path(staging), Path(target)
    fsync_files(staging)
    replaced = target.with_name(f".{target.name}.replaced")
    if replaced.exists():
        shutil.rmtree(replaced)
    if target.exists():
        os.rename(target, replaced)
    os.rename(staging, target)
    fsync_directory(target.parent)
    if replaced.exists():
        shutil.rmtree(replaced)
