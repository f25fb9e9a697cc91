"""Masked-LM pretraining under real DeepSpeed: two CPU processes (gloo), ZeRO stages 1 and 2, on the mixture
that `dataprep` builds from the bundled sample. Per stage: one uninterrupted run (torchrun), and one run
stopped after step 12 (under the `deepspeed` launcher) then resumed with `--resume` (torchrun)."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_fixtures import deepspeed_pretrain, mixture_128, read_summary, torchrun_pretrain  # noqa: F401  (fixture)

from train.checkpointing import CheckpointManager
from train.logging_utils import read_metrics

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
    output = torchrun_pretrain(*common, f"output.dir={resumed}", "--resume")
    return {"stage": stage, "full": full, "resumed": resumed, "stopped": stopped, "resume_output": output}


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
    assert read_summary(runs["resumed"])["resumed_from"] == STOP_AFTER
    full = read_metrics(runs["full"], "train")
    resumed = read_metrics(runs["resumed"], "train")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    mismatches = [(a["step"], a["loss"], b["loss"]) for a, b in zip(full, resumed)
                  if (a["loss"], a["accuracy"]) != (b["loss"], b["accuracy"])]
    assert not mismatches, f"(step, uninterrupted loss, resumed loss) differ: {mismatches}"
    assert read_metrics(runs["full"], "eval")[-1]["loss"] == read_metrics(runs["resumed"], "eval")[-1]["loss"]


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
