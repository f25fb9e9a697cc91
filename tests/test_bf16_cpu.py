"""bfloat16 on the CPU: the dtype paths a GPU run takes (`training.precision=bf16`, bf16 benchmarks), checked
here so that a dtype mistake costs no GPU time.

- the model in bf16: every module's output stays bf16 (but the Hyena filter MLPs', fp32 by design), the loss
  is fp32, gradients are bf16 and finite;
- its agreement with the fp32 model: under autocast with fp32 parameters (`training.precision=amp_bf16`, the
  GPU default) the filters are exact and the model tracks fp32 to bf16's resolution; cast wholesale to bf16
  the rounded filter parameters keep it off (xfail below);
- a DeepSpeed bf16 run of `train.pretrain` through its command line (one gloo process): bf16 weights in the
  checkpoint, an fp32 export, and a stopped-and-resumed run that repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from pretrain_fixtures import TINY_CONFIG, mixture_128, read_summary, run_checked  # noqa: F401  (fixture)

from model import M2BertConfig, M2BertForMaskedLM, M2BertModel
from model.modeling_m2_bert import HyenaFilter


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def tiny(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(M2BertConfig.from_preset("m2-bert-tiny", kernel_implementation="torch", **overrides))


def texts(batch: int = 2, length: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length * 2 // 3:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("padding_mode", ["masked", "reference"])
def test_bfloat16_model_keeps_bfloat16_activations_and_finite_gradients(padding_mode):
    model = tiny(M2BertForMaskedLM, padding_mode=padding_mode).to(torch.bfloat16).train()
    output_dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                output_dtypes[name] = output.dtype
        return hook

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(record(name))
    input_ids, attention_mask = texts()
    labels = torch.full_like(input_ids, -100)
    labels[:, 5:60:4] = input_ids[:, 5:60:4]
    out = model(input_ids, attention_mask, labels=labels)

    filter_mlps = {name for name in output_dtypes if name.endswith(("forward_mlp", "reverse_mlp"))}
    assert filter_mlps and {output_dtypes[name] for name in filter_mlps} == {torch.float32}  # fp32 by design
    upcast = {name: dtype for name, dtype in output_dtypes.items()
              if dtype != torch.bfloat16 and name not in filter_mlps}
    assert not upcast, f"modules whose output left bfloat16: {upcast}"
    assert len(output_dtypes) > 20  # the hooks saw the layers' modules
    assert out.logits.dtype == torch.bfloat16 and out.hidden_states[0].dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())  # cross-entropy on fp32 logits
    length = input_ids.shape[1]
    plan = model.m2_bert.forward_plan(input_ids, attention_mask)
    spectrum = model.m2_bert.layers[0].sequence_mixer.long_conv.spectrum(length, plan.fft_size)
    assert spectrum.dtype == torch.complex64  # the long convolutions run in fp32 (bf16 FFTs lose too much)

    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads.values()), \
        {n: None if g is None else g.dtype for n, g in grads.items() if g is None or g.dtype != torch.bfloat16}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) >= 0.9 * len(grads)


def bfloat16_copy(model: M2BertModel, float32_filters: bool) -> M2BertModel:
    """The model cast to bf16, optionally with its Hyena filters (parameters and computation) left in fp32."""
    copied = copy.deepcopy(model).to(torch.bfloat16)
    if float32_filters:
        for layer, original in zip(copied.layers, model.layers):
            layer.sequence_mixer.long_conv = copy.deepcopy(original.sequence_mixer.long_conv)
            layer.sequence_mixer.residual_long_conv = copy.deepcopy(original.sequence_mixer.residual_long_conv)
        assert {m.d_skip.dtype for m in copied.modules() if isinstance(m, HyenaFilter)} == {torch.float32}
    return copied


def test_bfloat16_model_with_float32_hyena_filters_tracks_the_float32_model():
    """Everything but the filters (projections, gates, long convolutions, GLU, LayerNorms) loses only about
    bf16's resolution: ~1% after 2 layers."""
    model = tiny(M2BertModel, hidden_dropout_prob=0.0).eval()
    input_ids, attention_mask = texts(length=512)
    with torch.no_grad():
        expected = model(input_ids, attention_mask).last_hidden_state
        actual = bfloat16_copy(model, float32_filters=True)(input_ids, attention_mask).last_hidden_state
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) < 3e-2


def test_under_autocast_the_filters_are_exact_and_the_model_tracks_float32():
    """fp32 parameters with bf16 autocast (`training.precision=amp_bf16`): the Hyena filters run outside
    autocast, so their spectra equal the fp32 model's bit for bit, and the model loses only bf16's resolution
    in its matmuls."""
    model = tiny(M2BertModel, hidden_dropout_prob=0.0).eval()
    input_ids, attention_mask = texts(length=512)
    plan = model.forward_plan(input_ids, attention_mask)
    hyena = model.layers[0].sequence_mixer.long_conv
    with torch.no_grad():
        expected = model(input_ids, attention_mask).last_hidden_state
        expected_spectrum = hyena.spectrum(plan.length, plan.fft_size).clone()
        hyena.clear_spectrum_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spectrum = hyena.spectrum(plan.length, plan.fft_size)
            actual = model(input_ids, attention_mask).last_hidden_state
    assert torch.equal(spectrum, expected_spectrum)
    assert relative_error(actual, expected) < 3e-2


@pytest.mark.xfail(strict=True, reason="with parameters stored in bfloat16 the Hyena filters are ~13% off: sin() of "
                   "arguments up to ~15 rad from rounded weights (docs/kernels.md, Precision)")
def test_bfloat16_model_tracks_the_float32_model():
    model = tiny(M2BertModel, hidden_dropout_prob=0.0).eval()
    input_ids, attention_mask = texts(length=512)
    with torch.no_grad():
        expected = model(input_ids, attention_mask).last_hidden_state
        actual = bfloat16_copy(model, float32_filters=False)(input_ids, attention_mask).last_hidden_state
    assert relative_error(actual, expected) < 3e-2


# --- DeepSpeed bf16 through the command line ----------------------------------------------------------------

STEPS, STOP_AFTER = 4, 2


@pytest.fixture(scope="module", params=["bf16", "amp_bf16"])
def bf16_runs(request, mixture_128, tmp_path_factory):  # noqa: F811
    """Full, stopped and resumed runs in DeepSpeed's bf16 mode (bf16 weights) and in `amp_bf16` (fp32 weights,
    bf16 autocast: the GPU default)."""
    root = tmp_path_factory.mktemp(request.param)
    common = [sys.executable, "-m", "train.pretrain", "--config", str(TINY_CONFIG), f"data.manifest={mixture_128}",
              f"training.precision={request.param}", "training.device=cpu", f"training.max_steps={STEPS}", "training.log_every=1",
              f"training.eval_every={STEPS}", f"training.checkpoint_every={STEPS}", "data.eval_samples=8",
              "output.tensorboard=false"]
    run_checked([*common, f"output.dir={root / 'full'}"])
    run_checked([*common, f"output.dir={root / 'resumed'}", "--stop-after-steps", str(STOP_AFTER)])
    run_checked([*common, f"output.dir={root / 'resumed'}", "--resume"])
    return root


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_deepspeed_bf16_trains_in_bfloat16_and_exports_float32(bf16_runs):
    summary = read_summary(bf16_runs / "full")
    precision = summary["precision"]
    assert summary["finished"] and precision in ("bf16", "amp_bf16")
    assert all(math.isfinite(loss) for loss in train_losses(bf16_runs / "full").values())
    (states,) = (bf16_runs / "full" / "checkpoints").glob("*/*model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=True)
    buffers = set(saved["buffer_names"])
    parameter_dtypes = {tensor.dtype for name, tensor in saved["module"].items() if name not in buffers}
    # bf16: DeepSpeed's bf16 weights (the fp32 master copy is in the optimizer); amp_bf16: fp32 weights.
    assert parameter_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    from safetensors.torch import load_file

    exported = load_file(str(bf16_runs / "full" / "final" / "model.safetensors"))
    assert {tensor.dtype for tensor in exported.values()} == {torch.float32}


def test_deepspeed_bf16_resume_repeats_the_uninterrupted_losses(bf16_runs):
    assert read_summary(bf16_runs / "resumed")["resumed_from"] == STOP_AFTER
    full, resumed = train_losses(bf16_runs / "full"), train_losses(bf16_runs / "resumed")
    assert sorted(resumed) == sorted(full) == list(range(1, STEPS + 1))
    assert resumed == full  # one CPU process: bitwise the same steps
