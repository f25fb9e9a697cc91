"""Shared by the training tests: the mixture `dataprep` builds from the bundled sample (built once per test
session), helpers to launch real 2-process CPU DeepSpeed runs, and the damage the checkpoint tests do to a run
folder (a crafted pickle, an edited manifest, what a kill while publishing leaves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpointing import LATEST_FILE, MANIFEST_FILE, step_tag
from train.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TINY_CONFIG = REPO / "configs" / "pretrain_tiny.yaml"
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def mixture_128(tmp_path_factory) -> Path:
    """manifest.json of `python -m dataprep.build_mixture --seq-len 128` on the bundled sample.

    Several test modules import this fixture; the folder is keyed by the session's base temp dir, so the
    Beam pipeline runs once per session.
    """
    out = tmp_path_factory.getbasetemp() / "mixture-128"
    manifest = out / "manifest.json"
    if not manifest.is_file():
        result = subprocess.run([sys.executable, "-m", "dataprep.build_mixture", "--out", str(out), "--seq-len", "128"],
                                cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        assert result.returncode == 0, f"dataprep.build_mixture failed:\n{result.stdout}\n{result.stderr}"
    return manifest


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for launched runs: the venv's tools first on PATH, no GPU, no inherited launcher state."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_checked(command: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    """Run `command`; fail the test with its output when it exits non-zero. Returns stdout + stderr."""
    result = subprocess.run(command, cwd=cwd, env=env or cpu_env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output[-6000:]}"
    return output


def torchrun_pretrain(*args: str, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node N train/pretrain.py ARGS` with the tiny config (gloo on CPU)."""
    return run_checked([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
                        str(REPO / "train" / "pretrain.py"), "--config", str(TINY_CONFIG), *args])


def deepspeed_pretrain(*args: str, nproc: int = 2) -> str:
    """`deepspeed --num_gpus N train/pretrain.py ARGS` with the tiny config: DeepSpeed's own launcher, which
    on CPU starts N gloo processes (one OpenMP thread each, as torchrun does, for the same numerics)."""
    return run_checked([str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                        str(REPO / "train" / "pretrain.py"), "--config", str(TINY_CONFIG), *args],
                       env=cpu_env(OMP_NUM_THREADS="1"))


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


class RunsCode:
    """Pickles as a call of `exec` that writes `marker`: what a crafted checkpoint file would do when loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from a checkpoint ran')",)


def write_payload(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a torch.save archive shaped like one, whose pickle runs code when loaded."""
    torch.save({"module": {"weight": torch.zeros(2)}, "optimizer": RunsCode(marker)}, path)


def match_manifest(folder: Path) -> None:
    """Rewrite a checkpoint's manifest to its files' current sizes, as someone editing the run folder could."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"] = {name: (folder / name).stat().st_size for name in manifest["files"]}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def killed_while_publishing(checkpoints: Path, step: int, previous: int) -> None:
    """Leave what a kill while the checkpoint of `step` was being published leaves: its parts in the staging
    folder, without rank 1's file or the manifest, and `latest` naming the checkpoint of step `previous`."""
    staging = checkpoints / f".{step_tag(step)}.checkpoint-partial"
    (checkpoints / step_tag(step)).rename(staging)
    (staging / MANIFEST_FILE).unlink()
    (staging / "rng_rank1.pt").unlink()
    (checkpoints / LATEST_FILE).write_text(step_tag(previous))
