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

import numpy as np
import pytest
import torch
import yaml
from pretrain_fixtures import REPO, VENV_BIN, cpu_env, mixture_128, run_checked  # noqa: F401  (fixture)
from safetensors.torch import load_file

from train.checkpointing import CheckpointManager
from train.logging_utils import read_metrics

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
    """The 8k script preempted after step 1 (`--stop-after-steps`, passed through), then requeued: the job
    runs the same script again, which resumes."""
    out = tmp_path_factory.mktemp("slurm-runs") / "pretrain-8k"
    for extra in (["--stop-after-steps", "1"], []):
        sbatch_script("pretrain_8k.sh", slurm_env, *tiny_pretrain_args(mixture_128, out), *extra,
                      CONFIG="configs/pretrain_tiny.yaml")
    return out


def test_pretrain_8k_script_trains_on_two_processes_and_resumes_when_requeued(pretrain_8k):
    summary = json.loads((pretrain_8k / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"] and summary["step"] == summary["total_steps"] == 2
    assert summary["resumed_from"] == 1 and summary["zero_stage"] == 2 and summary["global_batch_size"] == 16
    assert [r["step"] for r in read_metrics(pretrain_8k, "train")] == [1, 2]
    assert [r["step"] for r in read_metrics(pretrain_8k, "eval")] == [2]
    assert CheckpointManager(pretrain_8k / "checkpoints", keep_last=2).tags() == ["step00000001", "step00000002"]
    exported = load_file(pretrain_8k / "final" / "model.safetensors")
    assert exported["m2_bert.embeddings.position_embeddings.weight"].shape == (128, 64)


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
    assert summary["world_size"] == 2 and summary["finished"] and summary["step"] == 2
    assert summary["resumed_from"] is None and summary["seq_len"] == 128  # the 128-token test mixture
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init_from"] == str(warm)
    assert json.loads((out / "final" / "config.json").read_text())["max_position_embeddings"] == 512
    trained, initial = load_file(out / "final" / "model.safetensors"), load_file(warm / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in trained)
    assert not torch.equal(trained["m2_bert.embeddings.word_embeddings.weight"],
                           initial["m2_bert.embeddings.word_embeddings.weight"])  # trained from the warm start


@pytest.fixture(scope="module")
def finetuned(slurm_env, pretrain_32k):
    out = pretrain_32k[0].parent / "finetune"
    sbatch_script("finetune.sh", slurm_env, f"model.name_or_path={pretrain_32k[0] / 'final'}", "data.max_queries=4",
                  "data.heldout_queries=2", "data.max_documents=8", "negatives.per_positive=1",
                  "negatives.heldout_per_query=1", "training.global_batch_size=4", "training.max_steps=2",
                  "training.eval_every=1000", f"output.dir={out}", CONFIG="configs/finetune_minilm_qmsum_opl.yaml")
    return out


def test_finetune_script_trains_the_pretrained_model(finetuned, pretrain_32k):
    from model.encoders import M2Encoder, load_encoder

    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"] and summary["step"] == summary["total_steps"] == 2
    assert summary["loss"] == "opl" and summary["global_batch_size"] == 4 and summary["accumulation_steps"] == 2
    assert [r["step"] for r in read_metrics(finetuned, "train")] == [1, 2]
    assert [r["step"] for r in read_metrics(finetuned, "eval")] == [0, 2]  # before training and at the end
    start = str(pretrain_32k[0] / "final")
    assert yaml.safe_load((finetuned / "config.yaml").read_text())["model"]["name_or_path"] == start
    encoder = load_encoder(str(finetuned / "final"))
    assert isinstance(encoder, M2Encoder) and encoder.max_length == 512
    texts = ["who proposed the budget?", "the committee discussed the budget of the remote control"]
    assert not np.allclose(encoder.encode(texts), load_encoder(start).encode(texts), atol=1e-4)


def test_eval_loco_script_shards_embedding_over_processes(slurm_env, finetuned):
    out = finetuned.parent / "loco"
    output = sbatch_script("eval_loco.sh", slurm_env, "--model", str(finetuned / "final"), "--max-queries", "4",
                           "--max-documents", "8", "--cache-dir", str(out / "cache"), "--output-dir",
                           str(out / "results"), "--quiet")
    assert sorted(p.name for p in (out / "cache").glob("shard-*")) == [
        "shard-00000-of-00002.sqlite", "shard-00001-of-00002.sqlite"]
    (sharded,) = json.loads((out / "results" / "results.json").read_text())["results"]
    assert (sharded["n_queries"], sharded["n_documents"]) == (4, 8) and "nDCG@10" in output
    # The same scores as one process embedding everything itself.
    run_checked([str(VENV_BIN / "python"), "-m", "eval.loco", "--model", str(finetuned / "final"), "--max-queries",
                 "4", "--max-documents", "8", "--no-cache", "--quiet", "--output-dir", str(out / "one-process")])
    (single,) = json.loads((out / "one-process" / "results.json").read_text())["results"]
    assert single["metrics"] == pytest.approx(sharded["metrics"], abs=1e-12)


def test_eval_loco_script_without_arguments_explains_usage(slurm_env):
    import subprocess

    result = subprocess.run(["bash", str(REPO / "slurm" / "eval_loco.sh")], env=slurm_env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage: sbatch slurm/eval_loco.sh" in result.stderr
