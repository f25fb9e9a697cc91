"""Pretraining on a GPU: DeepSpeed's bf16 mode and torch autocast (amp_bf16), NCCL, fp32 export."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from pretrain_fixtures import REPO, TINY_CONFIG, mixture_128, run_checked  # noqa: F401  (fixture)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_tiny_pretraining_on_one_gpu(precision, mixture_128, tmp_path):  # noqa: F811
    out = tmp_path / precision
    output = run_checked([sys.executable, "-m", "train.pretrain", "--config", str(TINY_CONFIG),
                          f"data.manifest={mixture_128}", f"output.dir={out}", "training.device=cuda",
                          f"training.precision={precision}", "training.max_steps=20", "data.eval_samples=16"],
                         env=dict(os.environ), cwd=REPO)
    # bf16 runs the model in one dtype, so the kernels take it (after their first-call check); autocast's
    # mixed dtypes take the PyTorch path.
    if precision == "bf16":
        assert "Monarch Mixer kernels (monarch_mixer_core) in use" in output
    else:
        assert "Monarch Mixer kernels not used" in output
    assert "first-call check on" not in output  # no disagreement warning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["precision"] == precision
    assert math.isfinite(summary["train"]["loss"]) and summary["train"]["loss"] < 10.0
    from safetensors.torch import load_file

    assert {tensor.dtype for tensor in load_file(str(out / "final" / "model.safetensors")).values()} == {torch.float32}
