"""Masked-LM pretraining under real DeepSpeed: two CPU processes (gloo), ZeRO stages 1 and 2, on the mixture
that `dataprep` builds from the bundled sample. Per stage: one uninterrupted run (torchrun), and one run
stopped after step 12 (under the `deepspeed` launcher) then resumed with `--resume` (torchrun). Under ZeRO-2
the stopped run's last checkpoint is first turned into what a kill while publishing it leaves, so that the
run resumes from step 6 and trains steps 7-12 again."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch
from pretrain_fixtures import (LAUNCH_TIMEOUT_S, REPO, TINY_CONFIG, VENV_BIN, cpu_env, deepspeed_pretrain,  # noqa: F401
                               killed_while_publishing, match_manifest, mixture_128, read_summary, torchrun_pretrain,
                               write_payload)

from train.checkpointing import CheckpointManager
from train.distributed import free_port
from train.logging_utils import METRICS_FILE, read_metrics

STEPS = 24
STOP_AFTER = 12
pytestmark = pytest.mark.timeout(900)


# ZeRO-1 with activation checkpointing; ZeRO-2 with gradient accumulation (2 micro-batches of 4 per step).
VARIANTS = {1: ["model.activation_checkpointing=true"],
            2: ["training.micro_batch_size=4", "training.gradient_accumulation_steps=2"]}


@pytest.fixture(scope="module", params=sorted(VARIANTS), ids=["zero1", "zero2"])
def runs(request, mixture_128, tmp_path_factory):  # noqa: F811
    stage = request.param
    root = tmp_path_factory.mktemp(f"pretrain-zero{stage}")
    common = [f"data.manifest={mixture_128}", f"deepspeed.zero_optimization.stage={stage}",
              f"training.max_steps={STEPS}", "training.checkpoint_every=6", "training.keep_last=2",
              "training.eval_every=12", "training.log_every=1", "data.eval_samples=16", *VARIANTS[stage]]
    full, resumed = root / "full", root / "resumed"
    torchrun_pretrain(*common, f"output.dir={full}")
    # The interrupted run starts under the `deepspeed` launcher and resumes under torchrun.
    deepspeed_pretrain(*common, f"output.dir={resumed}", "--stop-after-steps", str(STOP_AFTER))
    stopped = {"summary": read_summary(resumed), "tags": CheckpointManager(resumed / "checkpoints", 2).tags(),
               "exported": (resumed / "final").exists()}
    resumes_from = STOP_AFTER
    if stage == 2:
        killed_while_publishing(resumed / "checkpoints", STOP_AFTER, previous=6)
        resumes_from = 6
    output = torchrun_pretrain(*common, f"output.dir={resumed}", "--resume")
    return {"stage": stage, "full": full, "resumed": resumed, "stopped": stopped, "resume_output": output,
            "resumes_from": resumes_from, "common": common}


def test_loss_falls(runs):
    train = read_metrics(runs["full"], "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in train)
    first, last = (sum(r["loss"] for r in part) / 4 for part in (train[:4], train[-4:]))
    assert last < first - 1.0, f"train loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    evaluation = read_metrics(runs["full"], "eval")
    assert [r["step"] for r in evaluation] == [12, 24]
    assert evaluation[1]["loss"] < evaluation[0]["loss"]
    summary = read_summary(runs["full"])
    assert summary["zero_stage"] == runs["stage"] and summary["world_size"] == 2 and summary["precision"] == "fp32"
    assert summary["global_batch_size"] == 16  # 2 processes x 8 samples per optimizer step in both variants
    assert summary["train"]["tokens_per_second"] > 0 and summary["train"]["memory_gb"] > 0


def test_checkpoints_written_and_pruned(runs):
    checkpoints = CheckpointManager(runs["full"] / "checkpoints", keep_last=2)
    assert checkpoints.tags() == ["step00000018", "step00000024"]  # 6 and 12 pruned (keep_last=2)
    assert checkpoints.latest() == "step00000024"
    newest = checkpoints.directory / "step00000024"
    assert {"rng_rank0.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt"} <= {p.name for p in newest.iterdir()}
    assert len(list(newest.glob("*optim_states.pt"))) == 2  # one ZeRO optimizer partition per rank
    for name in ("curves.png", "metrics.jsonl", "config.yaml", "summary.json"):
        assert (runs["full"] / name).is_file(), name
    assert list((runs["full"] / "tensorboard").glob("events.out.tfevents.*"))


def test_resumed_run_repeats_the_uninterrupted_losses(runs):
    stopped = runs["stopped"]
    assert stopped["summary"]["step"] == STOP_AFTER and not stopped["summary"]["finished"]
    assert stopped["tags"][-1] == f"step{STOP_AFTER:08d}" and not stopped["exported"]
    assert read_summary(runs["resumed"])["resumed_from"] == runs["resumes_from"]
    full = read_metrics(runs["full"], "train")
    resumed = read_metrics(runs["resumed"], "train")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    mismatches = [(a["step"], a["loss"], b["loss"]) for a, b in zip(full, resumed)
                  if (a["loss"], a["accuracy"]) != (b["loss"], b["accuracy"])]
    assert not mismatches, f"(step, uninterrupted loss, resumed loss) differ: {mismatches}"
    assert read_metrics(runs["full"], "eval")[-1]["loss"] == read_metrics(runs["resumed"], "eval")[-1]["loss"]


def test_resumed_run_logs_each_step_once(runs):
    """In metrics.jsonl itself and in TensorBoard: what the stopped run logged after the checkpoint it is
    resumed from (steps 7-12 under ZeRO-2) is dropped, not repeated."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (runs["resumed"] / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["split"] == "eval"] == [12, 24]
    events = EventAccumulator(str(runs["resumed"] / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    checkpoints = CheckpointManager(runs["resumed"] / "checkpoints", keep_last=2)
    assert checkpoints.tags() == ["step00000018", "step00000024"] and checkpoints.latest() == "step00000024"
    assert not list(checkpoints.directory.glob(".*partial"))  # the killed attempt's staging folder is gone


# The file of the finished run's last checkpoint that gets a crafted pickle, per ZeRO stage.
CRAFTED = {1: "mp_rank_00_model_states.pt", 2: "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def test_resume_refuses_a_checkpoint_file_that_would_run_code(runs, tmp_path):
    """A crafted pickle in the model states (ZeRO-1) or rank 1's optimizer partition (ZeRO-2), the manifest
    edited to match: `--resume` under the `deepspeed` launcher refuses, naming the file, before anything is
    loaded from the checkpoint or written."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs["full"], run)
    partition = run / "checkpoints" / "step00000024" / CRAFTED[runs["stage"]]
    write_payload(partition, marker)
    match_manifest(partition.parent)
    before = {name: (run / name).read_bytes() for name in (METRICS_FILE, "summary.json")}
    common = [o for o in runs["common"] if not o.startswith("output.dir=")]
    result = subprocess.run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                             str(REPO / "train" / "pretrain.py"), "--config", str(TINY_CONFIG), *common,
                             f"output.dir={run}", "--resume"], cwd=REPO, env=cpu_env(OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"{partition}: refused: loading it would run ['builtins.exec']" in output, output[-3000:]
    assert not marker.exists()
    assert before == {name: (run / name).read_bytes() for name in before}
    assert CheckpointManager(run / "checkpoints", keep_last=2).tags() == ["step00000018", "step00000024"]


def test_export_loads_with_from_pretrained_and_matches_the_checkpoint(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model import M2BertForMaskedLM

    model = M2BertForMaskedLM.from_pretrained(runs["full"] / "final")
    assert model.config.max_position_embeddings == 128 and model.config.padding_mode == "masked"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(runs["full"] / "checkpoints"), tag="step00000024")
    for name, param in model.named_parameters():
        assert torch.equal(param, consolidated[name]), name
    resumed = M2BertForMaskedLM.from_pretrained(runs["resumed"] / "final")
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: resumed run ends with different weights"
    input_ids = torch.tensor([[101, 2023, 103, 1037, 3231, 102, 0, 0]])
    labels = torch.full_like(input_ids, -100)
    labels[0, 2] = 2003
    output = model(input_ids, attention_mask=(input_ids != 0).long(), labels=labels)
    assert output.logits.shape == (1, model.config.vocab_size) and torch.isfinite(output.loss)
