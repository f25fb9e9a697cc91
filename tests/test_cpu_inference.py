"""CPU inference: the `model.cpu_ops` path against the PyTorch reference, the filter-spectrum cache across
lengths, precisions on real text, the encode loop (batching, bad inputs) and the ONNX export."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import M2BertConfig, M2BertModel, cpu_ops, kernels
from model.batching import padded_length
from model.encoders import load_encoder
from model.ops import fast_fft_size, monarch_mixer_core

from test_kernels import mixer_case  # the random mixer-core cases the kernel tests use

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO.parent / "shared" / "conformance" / "m2-bert"
needs_conformance = pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="../shared/conformance not present")
QMSUM = REPO / "eval" / "data" / "qmsum"


def qmsum_texts(documents: int = 4, queries: int = 8) -> list[str]:
    """Real text: the first meeting transcripts and queries of the bundled QMSum task."""
    def read(name, field, count):
        with gzip.open(QMSUM / name, "rt", encoding="utf-8") as f:
            return [json.loads(line)[field] for _, line in zip(range(count), f)]

    return read("documents.jsonl.gz", "passage", documents) + read("queries.jsonl.gz", "query", queries)


def tiny(padding_mode: str = "masked", kernel_implementation: str = "auto", **overrides) -> M2BertModel:
    torch.manual_seed(0)
    config = M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0, padding_mode=padding_mode,
                                      kernel_implementation=kernel_implementation, **overrides)
    return M2BertModel(config).eval()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# --- the CPU path computes the reference's function ---------------------------------------------------

@pytest.mark.parametrize("batch,hidden,length,padding_mode,residual", [
    (1, 8, 40, "reference", True), (3, 16, 33, "masked", True), (2, 8, 50, "masked", False)])
def test_cpu_mixer_core_matches_the_reference(batch, hidden, length, padding_mode, residual):
    case = mixer_case(batch, hidden, length, torch.float32, padding_mode, residual=residual)
    expected = monarch_mixer_core(*case)
    with torch.no_grad():
        got = cpu_ops.monarch_mixer_core(case[0].contiguous(), *case[1:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_glu_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 37, 64, generator=generator)
    gate_value, out = torch.randn(4, 64, 16, generator=generator), torch.randn(4, 16, 32, generator=generator) / 4
    bias = torch.randn(64, generator=generator)
    expected = kernels.torch_block_diagonal_glu(a, gate_value, out, bias)
    torch.testing.assert_close(cpu_ops.block_diagonal_glu(a, gate_value, out, bias), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_mode", ["masked", "reference"])
def test_cpu_path_model_matches_the_reference_path(padding_mode):
    model = tiny(padding_mode)
    ids = torch.randint(1000, 2000, (3, 100))
    mask = torch.ones_like(ids)
    mask[1, 60:], mask[2, 7:] = 0, 0
    with torch.no_grad():
        model.config.kernel_implementation = "torch"
        expected = model(ids, mask)
        model.config.kernel_implementation = "cpu"
        got = model(ids, mask)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)


@needs_conformance
def test_cpu_path_reproduces_the_authors_outputs():
    model = M2BertModel.from_pretrained(CONFORMANCE / "retrieval", kernel_implementation="cpu")
    expected = np.load(CONFORMANCE / "retrieval" / "expected.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(expected["input_ids"]), torch.from_numpy(expected["attention_mask"]))
        short = model(torch.from_numpy(expected["short_input_ids"]))
        model.config.kernel_implementation = "torch"
        reference = model(torch.from_numpy(expected["input_ids"]))
    np.testing.assert_allclose(out.pooler_output.numpy(), expected["sentence_embedding"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(short.last_hidden_state.numpy(), expected["short_last_hidden_state"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=0)


def test_auto_takes_the_cpu_path_for_inference_only(monkeypatch):
    monkeypatch.delenv(kernels.MODE_VARIABLE, raising=False)
    kernels.environment_override.cache_clear()
    x = torch.zeros(2)
    try:
        assert not kernels.uses_cpu_path("auto", x)  # autograd recording: the reference
        assert not kernels.uses_cpu_path("torch", x)
        with torch.no_grad():
            assert kernels.uses_cpu_path("auto", x)
            assert kernels.uses_cpu_path("cpu", x)
            assert not kernels.uses_cpu_path("torch", x)
        with pytest.raises(kernels.KernelsUnavailable, match="is cpu but the CPU path cannot run: autograd"):
            kernels.uses_cpu_path("cpu", x)
    finally:
        kernels.environment_override.cache_clear()


def test_training_on_cpu_still_takes_the_reference_and_learns():
    model = tiny().train()
    ids = torch.randint(1000, 2000, (2, 24))
    model(ids, torch.ones_like(ids)).pooler_output.sum().backward()
    assert model.layers[0].state_mixer.gate_value_proj.weight.grad.abs().sum() > 0


# --- the filter-spectrum cache ----------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["masked", "reference"])
def test_spectrum_cache_gives_the_same_outputs_across_lengths(padding_mode):
    """A model whose cache was filled by other lengths (longer and shorter, sharing an FFT size or not)
    embeds each input as a model with an empty cache does."""
    model = tiny(padding_mode)
    lengths = [37, 512, 100, 36, 300, 37]
    inputs = [torch.randint(1000, 2000, (2, n)) for n in lengths]
    with torch.no_grad():
        warm = [model(ids, torch.ones_like(ids)).last_hidden_state for ids in inputs]
        cold = []
        for ids in inputs:
            model.clear_spectrum_caches()
            cold.append(model(ids, torch.ones_like(ids)).last_hidden_state)
    for n, w, c in zip(lengths, warm, cold):
        torch.testing.assert_close(w, c, atol=1e-6, rtol=0, msg=f"length {n}")
    filters = model.layers[0].sequence_mixer.long_conv
    assert filters._spectrum_cache["kernels"][0].shape[-1] <= 512  # one kernel per filter, grown by powers of 2


def test_lengths_sharing_an_fft_size_share_one_spectrum():
    model = tiny()
    assert fast_fft_size(2 * 98) == fast_fft_size(2 * 100)
    filters = model.layers[0].sequence_mixer.long_conv
    with torch.no_grad():
        for n in (100, 98):
            ids = torch.randint(1000, 2000, (1, n))
            model(ids, torch.ones_like(ids))
    assert list(filters._spectrum_cache["spectra"]) == [fast_fft_size(200)]


# --- precisions on real text ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-MiniLM-L6-v2")


def test_bf16_keeps_minilm_embeddings_of_real_text(minilm):
    texts = qmsum_texts()
    fp32, bf16 = minilm.encode(texts), minilm.encode(texts, precision="bf16")
    assert cosine(bf16, fp32).min() >= 0.999
    assert not np.array_equal(bf16, fp32)  # the bf16 GEMMs did run


@needs_conformance
def test_bf16_keeps_m2_embeddings_of_real_text():
    model = M2BertModel.from_pretrained(CONFORMANCE / "retrieval", padding_mode="masked")
    texts = qmsum_texts()
    fp32, bf16 = model.encode(texts, batch_size=4), model.encode(texts, batch_size=4, precision="bf16")
    assert cosine(bf16, fp32).min() >= 0.999
    assert not np.array_equal(bf16, fp32)


def test_int8_is_measured_but_not_offered(minilm):
    model = tiny()
    for encoder in (model, minilm):
        with pytest.raises(ValueError, match="'int8' is not offered.*cosine"):
            encoder.encode(["a text"], precision="int8")
    with torch.no_grad():  # the CPU path still computes it, for bench/encode.py
        ids = torch.randint(1000, 2000, (1, 40))
        assert model(ids, torch.ones_like(ids), precision="int8").pooler_output.shape == (1, 64)


def test_low_precision_gemms_need_the_cpu_inference_path():
    model = tiny(kernel_implementation="torch")
    ids = torch.randint(1000, 2000, (1, 40))
    with torch.no_grad(), pytest.raises(ValueError, match="bf16.*CPU inference path"):
        model(ids, precision="bf16")


def test_prepared_weights_follow_in_place_updates():
    layer = torch.nn.Linear(16, 8)
    prepared = cpu_ops.PreparedWeights()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = cpu_ops.linear(x, layer.weight, layer.bias, "bf16", prepared)
        torch.testing.assert_close(before, layer(x), atol=5e-2, rtol=2e-2)
        layer.weight.mul_(2)
        after = cpu_ops.linear(x, layer.weight, layer.bias, "bf16", prepared)
    torch.testing.assert_close(after, layer(x).detach(), atol=5e-2, rtol=2e-2)


# --- the encode loop ----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bucketed_encoding_equals_one_by_one(precision):
    model = tiny()
    texts = qmsum_texts(documents=3, queries=5) + ["x", "a short query"]
    together = model.encode(texts, batch_size=3, precision=precision, max_length=300)
    alone = np.stack([model.encode([t], precision=precision, max_length=300)[0] for t in texts])
    if precision == "fp32":
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    else:  # bf16 GEMMs of other shapes round differently
        assert cosine(together, alone).min() >= 0.9999


def test_padding_is_no_wider_than_needed():
    assert [padded_length(n, 8192) for n in (1, 8, 32, 33, 200, 1000, 8000)] == [8, 8, 32, 40, 200, 1024, 8192]
    assert padded_length(600, 512) == 512
    widths = {padded_length(n, 1 << 15) for n in range(1, 1 << 15)}
    assert len(widths) < 16 * 15 + 8  # about 16 widths per octave: plans and GEMM kernels are reused


def test_encode_checks_its_inputs_before_any_work(minilm):
    model = tiny()
    for encoder, width in ((model, 64), (minilm, 384)):
        calls = []
        handle = encoder.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            assert encoder.encode([]).shape == (0, width)
            with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, not str"):
                encoder.encode(["fine", None])
            with pytest.raises(TypeError, match=r"texts\[0\] is int"):
                encoder.encode([3])
        finally:
            handle.remove()
        assert not calls


def test_encode_reports_texts_and_tokens_per_second(caplog):
    model = tiny()
    with caplog.at_level("INFO", logger="model.batching"):
        model.encode(["one text", "and another one"])
    assert "2 texts" in caplog.text and "tokens/s" in caplog.text


# --- ONNX -------------------------------------------------------------------------------------------------

def test_onnx_export_reproduces_the_pytorch_embeddings(tmp_path):
    pytest.importorskip("onnxruntime")
    from model import export_onnx

    model = tiny()
    path = export_onnx.export(model, tmp_path / "tiny.onnx")
    session = export_onnx.session(path, threads=1)
    assert export_onnx.check(session, model, [17, 64, 200], batch=3) <= 1e-4  # dynamic batch and length


def test_loco_model_spec_takes_a_precision():
    from eval.models import ModelSpec

    spec = ModelSpec.from_config({"model": "all-MiniLM-L6-v2", "precision": "bf16"}, "config.yaml")
    assert spec.precision == "bf16" and "bf16" in spec.display_name
    with pytest.raises(ValueError, match="'int8' is not offered"):
        ModelSpec.from_config({"model": "all-MiniLM-L6-v2", "precision": "int8"}, "config.yaml")
    with pytest.raises(ValueError, match="bm25 takes no .*precision"):
        ModelSpec("bm25", precision="bf16")
