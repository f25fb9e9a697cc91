"""The output folder of a build: what a run may replace, the lock that keeps two runs apart, and publishing.

- `check_output`: `--out` must be absent, empty, or a complete earlier output of this command (a valid
  manifest and only the files the command writes); the last is replaced only with `--overwrite`. Checked
  before any work, so a refused run writes nothing.
- `OutputLock`: one run per `--out` at a time. `<out>.lock` records its holder (host, pid, start time); a
  second run refuses and names it. A lock whose holder is provably gone (same machine, process no longer
  running) is taken over; one from another machine is left for a person to remove.
- `prepare_staging` / `publish`: the result is built in `<out>.partial/` and moved into place only when
  complete; only folders holding nothing but this command's files are ever deleted.

Local paths and Beam filesystems (`gs://`, `s3://`, ...) alike; see docs/reliability.md for what holds where.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from .manifest import SPLITS, STREAM_NAMES, ManifestError, parse_manifest

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"
WORK_FOLDER_NAME = "_work"
STAGING_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
# Every file an output holds: the manifest, the summary, and per split and stream an MDS index over
# `part-NNNNN/` folders of shards (`.mds.zstd`, plus the `.mds` that StreamingDataset decompresses next to them).
OUTPUT_FILE = re.compile(
    rf"{re.escape(MANIFEST_NAME)}|{re.escape(SUMMARY_NAME)}|({'|'.join(SPLITS)})/({'|'.join(STREAM_NAMES)})/"
    r"(index\.json|part-\d{5,}/(index\.json|shard\.\d{5,}\.mds(\.zstd)?))")
EXAMPLES_NAMED = 3
LOCK_ATTEMPTS = 3

logger = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output folder this run must not write to (the message says why and what to do)."""


class OutputLockedError(OutputError):
    """Another run holds the output's lock (the message names it)."""


def is_local(path: str) -> bool:
    """Whether `path` is on the local filesystem (no scheme), where a folder can be renamed atomically."""
    return FileSystems.get_scheme(path) is None


def normalize(out: str) -> str:
    """The absolute path of a local folder (so `.` or `x/` name a real sibling for staging), a URL as given."""
    return os.path.abspath(out) if is_local(out) else out.rstrip("/")


def staging_folder(out: str) -> str:
    """Where a run writes before its result is complete."""
    return out + STAGING_SUFFIX


def lock_path(out: str) -> str:
    return out + LOCK_SUFFIX


def check_output(out: str, overwrite: bool) -> None:
    """Refuse an `--out` that holds anything but an earlier output of this command, or a staging folder that
    holds anything but this command's files. An earlier output is replaced only with `overwrite`."""
    files = _files_under(out)
    if files:
        problem = _not_an_output(out, files)
        if problem:
            raise OutputError(f"--out {out} is not empty and is not an output of build_mixture ({problem}); "
                              f"nothing was written. Give a new or empty folder.")
        if not overwrite:
            raise OutputError(f"--out {out} already holds a mixture ({len(files)} files); "
                              f"pass --overwrite to replace it")
    _check_staging(staging_folder(out))


def _check_staging(staging: str) -> None:
    foreign = [name for name in _files_under(staging)
               if not (OUTPUT_FILE.fullmatch(name) or name.startswith(WORK_FOLDER_NAME + "/"))]
    if foreign:
        raise OutputError(f"{staging} holds files build_mixture does not write ({_examples(foreign)}); "
                          f"this command stages its output there, so move that folder away")


def _files_under(folder: str) -> list[str]:
    """Relative paths of every file (and link) under `folder`; an error if `folder` is something else."""
    if not is_local(folder):
        prefix = folder + "/"
        return sorted(metadata.path[len(prefix):]
                      for metadata in FileSystems.match([prefix + "**"])[0].metadata_list)
    if os.path.islink(folder):
        raise OutputError(f"{folder} is a symbolic link; give the folder it points to")
    if not os.path.lexists(folder):
        return []
    if not os.path.isdir(folder):
        raise OutputError(f"{folder} exists and is not a folder")
    files = []
    for root, folders, names in os.walk(folder):
        names += [name for name in folders if os.path.islink(os.path.join(root, name))]  # never followed
        files += [os.path.relpath(os.path.join(root, name), folder) for name in names]
    return sorted(files)


def _not_an_output(out: str, files: list[str]) -> str | None:
    foreign = [name for name in files if not OUTPUT_FILE.fullmatch(name)]
    if foreign:
        return f"it holds files this command does not write: {_examples(foreign)}"
    if MANIFEST_NAME not in files:
        return f"it has no {MANIFEST_NAME}"
    manifest = FileSystems.join(out, MANIFEST_NAME)
    try:
        parse_manifest(_read_text(manifest), manifest)
    except (ManifestError, UnicodeDecodeError) as error:
        return f"its manifest is not valid: {error}"
    return None


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:EXAMPLES_NAMED])
    return shown + (f" and {len(names) - EXAMPLES_NAMED} more" if len(names) > EXAMPLES_NAMED else "")


def prepare_staging(out: str) -> str:
    """The staging folder, emptied of what an interrupted earlier run left (only this command's files)."""
    staging = staging_folder(out)
    if _files_under(staging):
        _check_staging(staging)
        logger.info("removing %s, left by an interrupted run", staging)
        delete_folder(staging)
    return staging


def publish(staging: str, out: str, overwrite: bool) -> None:
    """Move the complete result from `staging` to `out`, replacing the earlier output there (if allowed)."""
    delete_folder(FileSystems.join(staging, WORK_FOLDER_NAME))
    try:
        check_output(out, overwrite)  # again: someone may have put files into `out` during the run
    except OutputError as error:
        raise OutputError(f"{error}. The new mixture is left in {staging}") from None
    if is_local(out):
        _replace_local_folder(staging, out)
    else:
        _replace_remote_folder(staging, out)


def _replace_local_folder(staging: str, out: str) -> None:
    previous = None
    if os.path.lexists(out):
        # A fresh, empty folder to rename the old output onto: no existing name is ever reused or deleted.
        previous = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.replaced-", dir=os.path.dirname(out))
        os.rename(out, previous)
    os.rename(staging, out)
    if previous:
        shutil.rmtree(previous)


def _replace_remote_folder(staging: str, out: str) -> None:
    # Object stores have no folder rename: copy every file, the manifest last, so that a reader waiting
    # for the manifest never sees a partial result.
    delete_folder(out)
    listed = FileSystems.match([FileSystems.join(staging, "**")])[0].metadata_list
    sources = sorted(metadata.path for metadata in listed)
    sources.sort(key=lambda path: path.endswith("/" + MANIFEST_NAME))
    prefix = staging.rstrip("/") + "/"
    for path in sources:
        FileSystems.copy([path], [FileSystems.join(out, path[len(prefix):])])
    delete_folder(staging)


def delete_folder(path: str) -> None:
    """Remove a folder and everything in it (if it exists), locally or on object storage (a name prefix)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list:
        FileSystems.delete([path.rstrip("/") + "/"])


def write_text(path: str, text: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode("utf-8"))


def _read_text(path: str) -> str:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read().decode("utf-8")


class OutputLock:
    """`with OutputLock(out):` holds `<out>.lock` for the run; raises `OutputLockedError` naming the holder.

    The lock file is created whole or not at all: written under a private name and hard-linked into place,
    which fails if the name exists (atomic on local disks and on NFS; where there are no hard links, an
    exclusive create). On object storage there is no such primitive: the lock is written only where none
    exists and read back, which keeps runs started seconds apart from colliding, not runs started at the
    same instant.
    """

    def __init__(self, out: str):
        self.path = lock_path(out)
        self._record = json.dumps(_holder_record(), sort_keys=True)

    def __enter__(self) -> OutputLock:
        for _ in range(LOCK_ATTEMPTS):
            if self._create():
                return self
            current = self._read()
            if current is None:
                continue  # released since we looked
            holder = _parse_holder(current)
            if holder is None or not _holder_is_gone(holder):
                raise OutputLockedError(self._locked_message(holder))
            logger.warning("taking over %s: its holder (%s) is no longer running", self.path, _describe(holder))
            self._remove_if(current)
        raise OutputLockedError(f"{self.path}: other runs keep taking this lock; try again")

    def __exit__(self, *exc_info) -> None:
        self._remove_if(self._record)

    def _locked_message(self, holder: dict | None) -> str:
        out = self.path[: -len(LOCK_SUFFIX)]
        who = _describe(holder) if holder else "its holder record is unreadable"
        return (f"--out {out} is in use by another build_mixture run ({who}); lock file {self.path}. "
                f"If that run is no longer running (for example killed on another machine), delete the lock file "
                f"and run again.")

    def _create(self) -> bool:
        if not is_local(self.path):
            if FileSystems.exists(self.path):
                return False
            write_text(self.path, self._record)
            return self._read() == self._record
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        private = f"{self.path}.{socket.gethostname()}.{os.getpid()}"
        with open(private, "w", encoding="utf-8") as handle:
            handle.write(self._record)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report a failure for a link that was made (a lost reply): the link count tells.
            if os.stat(private).st_nlink == 2:
                return True
            return self._create_exclusively()  # no hard links here (some FUSE and SMB mounts)
        finally:
            os.unlink(private)

    def _create_exclusively(self) -> bool:
        # Create-if-absent, then write: a run that looks in between finds an empty record and refuses.
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(self._record)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> str | None:
        """The lock file's text, or None when there is none."""
        if is_local(self.path):
            try:
                return Path(self.path).read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                return None
        return _read_text(self.path) if FileSystems.exists(self.path) else None

    def _remove_if(self, record: str) -> None:
        """Remove the lock if it still holds `record` (never another run's lock taken in the meantime)."""
        if not is_local(self.path):
            if self._read() == record:
                FileSystems.delete([self.path])
            return
        moved = f"{self.path}.removing.{socket.gethostname()}.{os.getpid()}"
        try:
            os.rename(self.path, moved)  # atomic: what we then read is what we took away
        except FileNotFoundError:
            return
        if Path(moved).read_text(encoding="utf-8", errors="replace") != record:
            try:
                os.link(moved, self.path)  # someone else's lock: put it back
            except FileExistsError:
                pass
        os.unlink(moved)


def _holder_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "machine": _machine_identity(), "pid": pid, "pid_start": _process_start(pid),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def _parse_holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(holder, dict) or not {"host", "pid", "started"} <= set(holder):
        return None
    return holder


def _describe(holder: dict) -> str:
    return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"


def _holder_is_gone(holder: dict) -> bool:
    """True only when the holder provably no longer runs: it ran on this machine and its process is gone.

    A machine is its host name, boot id and PID namespace (containers may share a host name); a process is
    its pid and start time (pids are reused).
    """
    machine = _machine_identity()
    pid = holder["pid"]
    if holder["host"] != socket.gethostname() or holder.get("machine") != machine:
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if machine is None:  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return _process_start(pid) != holder.get("pid_start")


def _machine_identity() -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """A running process's start time (clock ticks since boot), or None if there is none (a zombie is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]
