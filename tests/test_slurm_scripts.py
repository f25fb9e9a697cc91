"""The Slurm job scripts: shellcheck, their #SBATCH headers, and their launch logic run for real on this
machine as a one-node, two-process CPU job (pretrain 8k -> warm start and pretrain 32k -> fine-tune ->
LoCo evaluation, each on tiny settings).

This machine has no Slurm, so the test puts stand-ins for its two client tools first on PATH: `srun`
runs its command once as node 0 of a one-node allocation, and `scontrol show hostnames` prints the node
list's host names. Everything else (the scripts, torchrun, DeepSpeed, the training and evaluation code)
is real; the SLURM_* variables are what a one-node, two-GPU allocation would set.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from pretrain_fixtures import REPO, VENV_BIN, cpu_env, mixture_128, run_checked  # noqa: F401  (fixture)

SCRIPTS = ("pretrain_8k.sh", "pretrain_32k.sh", "finetune.sh", "eval_loco.sh")
pytestmark = pytest.mark.timeout(900)

SRUN_STAND_IN = """#!/usr/bin/env bash
# srun on a one-node allocation: drop srun's own options, run the task as node 0.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""
SCONTROL_STAND_IN = """#!/usr/bin/env bash
# `scontrol show hostnames LIST` for a comma-separated list of plain host names.
[[ $1 == show && $2 == hostnames ]] || { echo "scontrol stand-in: unsupported: $*" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    tools = tmp_path_factory.mktemp("slurm-tools")
    for name, text in (("srun", SRUN_STAND_IN), ("scontrol", SCONTROL_STAND_IN)):
        path = tools / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = cpu_env(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
                  SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO), PYTHON=str(VENV_BIN / "python"))
    env["PATH"] = f"{tools}:{env['PATH']}"
    return env


def sbatch_script(name: str, env: dict[str, str], *args: str, **variables: str) -> str:
    """Run slurm/NAME as Slurm would run the batch script (from a copy, in the submission directory)."""
    output = run_checked(["bash", str(REPO / "slurm" / name), *args], env={**env, **variables})
    assert "1 node(s) x 2 process(es), rendezvous localhost:24242" in output  # geometry from SLURM_*
    return output


def tiny_pretrain_args(manifest: Path, out: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"output.dir={out}", "training.max_steps=2", "data.eval_samples=8"]


def test_shellcheck_passes():
    run_checked([str(VENV_BIN / "shellcheck"), "-x", *(f"slurm/{name}" for name in (*SCRIPTS, "launch.sh"))])


@pytest.mark.parametrize("name", SCRIPTS)
def test_headers_and_no_hard_coded_paths(name):
    text = (REPO / "slurm" / name).read_text()
    headers = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
    assert {"nodes", "ntasks-per-node", "gpus-per-node", "time", "job-name"} <= set(headers)
    assert headers["ntasks-per-node"] == "1"  # one launcher per node; torchrun starts the GPU processes
    assert not re.search(r"(?<![\w.$])/(home|work|scratch|data|gpfs|lustre|tmp)\b", text)


@pytest.fixture(scope="module")
def pretrain_8k(slurm_env, mixture_128, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("slurm-runs") / "pretrain-8k"
    sbatch_script("pretrain_8k.sh", slurm_env, *tiny_pretrain_args(mixture_128, out), CONFIG="configs/pretrain_tiny.yaml")
    return out


def test_pretrain_8k_script_trains_on_two_processes(pretrain_8k):
    summary = json.loads((pretrain_8k / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert (pretrain_8k / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def pretrain_32k(slurm_env, mixture_128, pretrain_8k):  # noqa: F811
    out, warm = pretrain_8k.parent / "pretrain-32k", pretrain_8k.parent / "warm-start"
    output = sbatch_script("pretrain_32k.sh", slurm_env, "model.preset=null", "model.overrides={}",
                           *tiny_pretrain_args(mixture_128, out), CONFIG="configs/pretrain_tiny.yaml",
                           FROM_8K=str(pretrain_8k / "final"), WARM_DIR=str(warm), LENGTH="512")
    return out, warm, output


def test_pretrain_32k_script_warm_starts_then_trains(pretrain_32k):
    out, warm, output = pretrain_32k
    record = json.loads((warm / "warm_start.json").read_text())
    assert (record["source_length"], record["length"]) == (128, 512)
    assert "warm-started 128 -> 512 positions" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert json.loads((out / "final" / "config.json").read_text())["max_position_embeddings"] == 512


@pytest.fixture(scope="module")
def finetuned(slurm_env, pretrain_32k):
    out = pretrain_32k[0].parent / "finetune"
    sbatch_script("finetune.sh", slurm_env, f"model.name_or_path={pretrain_32k[0] / 'final'}", "data.max_queries=4",
                  "data.heldout_queries=2", "data.max_documents=8", "negatives.per_positive=1",
                  "negatives.heldout_per_query=1", "training.global_batch_size=4", "training.max_steps=2",
                  f"output.dir={out}", CONFIG="configs/finetune_minilm_qmsum_opl.yaml")
    return out


def test_finetune_script_trains_the_pretrained_model(finetuned):
    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert (finetuned / "final").is_dir()


def test_eval_loco_script_shards_embedding_over_processes(slurm_env, finetuned):
    out = finetuned.parent / "loco"
    output = sbatch_script("eval_loco.sh", slurm_env, "--model", str(finetuned / "final"), "--max-queries", "4",
                           "--max-documents", "8", "--cache-dir", str(out / "cache"), "--output-dir",
                           str(out / "results"), "--quiet")
    assert sorted(p.name for p in (out / "cache").glob("shard-*")) == [
        "shard-00000-of-00002.sqlite", "shard-00001-of-00002.sqlite"]
    results = json.loads((out / "results" / "results.json").read_text())
    assert results and "nDCG@10" in output


def test_eval_loco_script_without_arguments_explains_usage(slurm_env):
    import subprocess

    result = subprocess.run(["bash", str(REPO / "slurm" / "eval_loco.sh")], env=slurm_env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage: sbatch slurm/eval_loco.sh" in result.stderr
