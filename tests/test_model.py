"""M2-BERT: agreement with the authors' code, full-size layout, padding modes, checkpoint I/O, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model import M2BertConfig, M2BertForMaskedLM, M2BertModel
from model.loading import authors_to_ours

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "m2-bert"
needs_conformance = pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="../shared/conformance not present")


def tiny_config(**overrides) -> M2BertConfig:
    return M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0, **overrides)


# --- agreement with the authors' code (fp32, CPU, 1e-4 absolute) ---------------------------------

@needs_conformance
def test_retrieval_checkpoint_reproduces_authors_outputs():
    model = M2BertModel.from_pretrained(CONFORMANCE / "retrieval")
    assert model.config.padding_mode == "reference"  # released checkpoints have no padding_mode key
    expected = np.load(CONFORMANCE / "retrieval" / "expected.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(expected["input_ids"]), torch.from_numpy(expected["attention_mask"]))
        short = model(torch.from_numpy(expected["short_input_ids"]))
    np.testing.assert_allclose(out.pooler_output.numpy(), expected["sentence_embedding"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state.numpy(), expected["last_hidden_state"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(short.last_hidden_state.numpy(), expected["short_last_hidden_state"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(short.pooler_output.numpy(), expected["short_pooled"], atol=1e-4, rtol=0)


@needs_conformance
def test_mlm_checkpoint_reproduces_authors_logits():
    model = M2BertForMaskedLM.from_pretrained(CONFORMANCE / "mlm")
    expected = np.load(CONFORMANCE / "mlm" / "expected.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(expected["input_ids"]))
    logits = out.logits[:, torch.from_numpy(expected["positions"])].numpy()
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.hidden_states[0].numpy(), expected["last_hidden_state"], atol=1e-4, rtol=0)


@needs_conformance
def test_mlm_checkpoint_as_encoder_gets_fresh_pooler_and_same_hidden_states():
    encoder = M2BertModel.from_pretrained(CONFORMANCE / "mlm")
    expected = np.load(CONFORMANCE / "mlm" / "expected.npz")
    with torch.no_grad():
        out = encoder(torch.from_numpy(expected["input_ids"]))
    np.testing.assert_allclose(out.last_hidden_state.numpy(), expected["last_hidden_state"], atol=1e-4, rtol=0)
    assert out.pooler_output.shape == (3, 64)


# --- the full-size architecture ----------------------------------------------------------------

@needs_conformance
@pytest.mark.parametrize("preset,length", [("m2-bert-80M-2k", 2048), ("m2-bert-80M-8k", 8192),
                                           ("m2-bert-80M-32k", 32768)])
def test_full_size_model_has_the_authors_tensors(preset, length):
    with torch.device("meta"):
        model = M2BertModel(M2BertConfig.from_preset(preset))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    covered = set()
    for line in (CONFORMANCE / "full-size-keys" / f"{preset}.tsv").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.startswith("classifier.") or name == "bert.embeddings.position_ids":
            continue  # unused head; position ids are regenerated
        target = authors_to_ours(name)
        assert target in ours, f"{name} -> {target} missing"
        assert ours[target] == tuple(json.loads(shape.replace("(", "[").replace(",)", "]").replace(")", "]"))), name
        covered.add(target)
    assert covered == set(ours), f"tensors the authors do not have: {sorted(set(ours) - covered)}"
    assert model.num_parameters(exclude_position_tables=True) == 80_121_600
    assert model.embeddings.position_embeddings.weight.shape == (length, 768)


def test_80m_parameter_total_matches_the_reference():
    with torch.device("meta"):
        model = M2BertModel(M2BertConfig.from_preset("32k"))
    assert model.num_parameters() == 109_219_584


# --- padding modes ---------------------------------------------------------------------------

def test_masked_mode_embedding_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = M2BertModel(tiny_config(padding_mode="masked")).eval()
    text = torch.randint(1000, 2000, (1, 37))
    embeddings = []
    for width in (37, 100, 512):
        ids = torch.zeros((1, width), dtype=torch.long)
        ids[:, :37] = text
        mask = (ids != 0).long()
        with torch.no_grad():
            embeddings.append(model(ids, mask).pooler_output)
    for other in embeddings[1:]:
        torch.testing.assert_close(other, embeddings[0], atol=1e-5, rtol=0)


def test_reference_mode_embedding_depends_on_padding_as_the_released_models():
    torch.manual_seed(0)
    model = M2BertModel(tiny_config(padding_mode="reference")).eval()
    ids = torch.randint(1000, 2000, (1, 37))
    padded = torch.nn.functional.pad(ids, (0, 63))
    with torch.no_grad():
        a = model(ids).pooler_output
        b = model(padded, (padded != 0).long()).pooler_output
    assert (a - b).abs().max() > 1e-3


def test_encode_is_batch_invariant_in_masked_mode():
    torch.manual_seed(0)
    model = M2BertModel(tiny_config()).eval()
    texts = ["a short query", "a much longer document about meetings " * 20, "x"]
    together = model.encode(texts, batch_size=3)
    alone = np.stack([model.encode([t])[0] for t in texts])
    assert together.shape == (3, 64) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


# --- training-time behaviour ---------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = M2BertForMaskedLM(tiny_config()).train()
    ids = torch.randint(1000, 2000, (2, 64))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, torch.ones_like(ids), labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], msg=name)
    # every parameter learns, the shared Sin frequency and z included
    assert all(g.abs().sum() > 0 for g in plain_grads.values())
    assert "m2_bert.layers.0.sequence_mixer.long_conv.z" in plain_grads


def test_cached_filter_spectrum_follows_parameter_updates():
    torch.manual_seed(0)
    model = M2BertModel(tiny_config()).eval()
    ids = torch.randint(1000, 2000, (1, 32))
    with torch.no_grad():
        before = model(ids).pooler_output
        again = model(ids).pooler_output
        model.layers[0].sequence_mixer.long_conv.sin_freq.add_(1.0)
        after = model(ids).pooler_output
    torch.testing.assert_close(before, again, atol=0, rtol=0)
    assert (before - after).abs().max() > 1e-4


# --- checkpoint I/O --------------------------------------------------------------------------

def test_save_pretrained_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = M2BertForMaskedLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = M2BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config.padding_mode == "masked"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.mlm_head.decoder.weight is loaded.m2_bert.embeddings.word_embeddings.weight
    ids = torch.randint(1000, 2000, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _authors_layout(tmp_path: Path, state: dict, name: str = "pytorch_model.bin") -> Path:
    shutil.copy(CONFORMANCE / "retrieval" / "config.json", tmp_path / "config.json")
    torch.save(state, tmp_path / name)
    return tmp_path


def _reference_embedding():
    return np.load(CONFORMANCE / "retrieval" / "expected.npz")


def _embed(model) -> np.ndarray:
    expected = _reference_embedding()
    with torch.no_grad():
        return model(torch.from_numpy(expected["input_ids"])).pooler_output.numpy()


@needs_conformance
@pytest.mark.parametrize("layout", ["composer", "module-prefix", "flashfft-and-classifier", "freq-once",
                                    "safetensors"])
def test_authors_layouts_load(tmp_path, layout):
    state = torch.load(CONFORMANCE / "retrieval" / "pytorch_model.bin", weights_only=True)
    name = "pytorch_model.bin"
    if layout == "composer":
        state = {"state": {"model": {f"model.{k}": v for k, v in state.items()}}}
        name = "model.pt"
    elif layout == "module-prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "flashfft-and-classifier":
        state["bert.encoder.flashfft.f"] = torch.zeros(8, dtype=torch.bfloat16)
        state["bert.encoder.layer.0.attention.filter_fn.flashfft.twiddle"] = torch.zeros(4, dtype=torch.bfloat16)
        state["classifier.weight"] = torch.zeros(10, 64)
        state["classifier.bias"] = torch.zeros(10)
    elif layout == "freq-once":
        state = {k: v for k, v in state.items() if not k.endswith(("3.freq", "5.freq")) and "_rev.1.freq" not in k}
    if layout == "safetensors":
        from safetensors.torch import save_file

        shutil.copy(CONFORMANCE / "retrieval" / "config.json", tmp_path / "config.json")
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
        directory = tmp_path
    else:
        directory = _authors_layout(tmp_path, state, name)
    model = M2BertModel.from_pretrained(directory)
    np.testing.assert_allclose(_embed(model), _reference_embedding()["sentence_embedding"], atol=1e-4, rtol=0)


@needs_conformance
def test_config_with_model_type_bert_and_no_m2_switches_loads(tmp_path):
    config = json.loads((CONFORMANCE / "retrieval" / "config.json").read_text())
    config["model_type"] = "bert"
    config.pop("monarch_mixer_sequence_mixing", None)
    config.pop("use_flash_fft", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(CONFORMANCE / "retrieval" / "pytorch_model.bin", tmp_path)
    model = M2BertModel.from_pretrained(tmp_path)
    np.testing.assert_allclose(_embed(model), _reference_embedding()["sentence_embedding"], atol=1e-4, rtol=0)


@needs_conformance
def test_the_authors_recipe_keys_are_not_kept_as_model_settings(tmp_path):
    """hyena_wd, hyena_lr_pos_emb, long_conv_kernel_learning_rate and use_flash_fft are the authors' training
    recipe and implementation switch: nothing in the model reads them, so loading drops them."""
    config = json.loads((CONFORMANCE / "retrieval" / "config.json").read_text())
    config["use_flash_fft"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(CONFORMANCE / "retrieval" / "pytorch_model.bin", tmp_path)
    model = M2BertModel.from_pretrained(tmp_path)
    for key in ("hyena_wd", "hyena_lr_pos_emb", "long_conv_kernel_learning_rate", "use_flash_fft"):
        assert not hasattr(model.config, key), key
    model.save_pretrained(tmp_path / "ours")
    assert "hyena_wd" not in (tmp_path / "ours" / "config.json").read_text()


def test_an_activation_other_than_gelu_is_rejected():
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        M2BertConfig.from_preset("m2-bert-tiny", hidden_act="relu")


# --- bad inputs: each error names the problem ----------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        M2BertModel.from_pretrained(tmp_path / "does-not-exist")


def test_config_without_required_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match=r"missing required key.*num_hidden_layers"):
        M2BertModel.from_pretrained(tmp_path)


@needs_conformance
def test_truncated_weights_file(tmp_path):
    data = (CONFORMANCE / "retrieval" / "pytorch_model.bin").read_bytes()
    shutil.copy(CONFORMANCE / "retrieval" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*truncated"):
        M2BertModel.from_pretrained(tmp_path)


@needs_conformance
@pytest.mark.parametrize("key, tensor, message", [
    ("bert.encoder.layer.1.mlp.wo.bias", None, r"missing key.*layers\.1\.state_mixer\.out_proj\.bias"),
    ("bert.encoder.layer.0.mlp.gated_layers.weight", torch.zeros(4, 32, 16),
     r"wrong shape.*layers\.0\.state_mixer\.gate_value_proj\.weight"),
    ("bert.encoder.layer.0.attention.Wqkv.weight", torch.zeros(3, 3), r"Wqkv"),
    ("bert.encoder.layer.0.attention.filter_fn.implicit_filter.3.freq", torch.zeros(1, 32),
     r"implicit_filter\.3\.freq.*same shared tensor"),
], ids=["missing", "mis-shaped", "unexpected", "diverging-shared-freq"])
def test_bad_tensor_in_the_authors_checkpoint_is_named(tmp_path, key, tensor, message):
    """The authors' checkpoint with one tensor deleted (None) or replaced: the error names it."""
    state = torch.load(CONFORMANCE / "retrieval" / "pytorch_model.bin", weights_only=True)
    if tensor is None:
        del state[key]
    else:
        state[key] = tensor
    with pytest.raises(ValueError, match=message):
        M2BertModel.from_pretrained(_authors_layout(tmp_path, state))


def test_input_longer_than_the_model():
    model = M2BertModel(tiny_config())
    with pytest.raises(ValueError, match="513 tokens.*maximum length is 512"):
        model(torch.ones((1, 513), dtype=torch.long))


def test_unsupported_config_switch_is_named():
    with pytest.raises(ValueError, match="use_glu_mlp"):
        M2BertConfig(use_glu_mlp=False)
    with pytest.raises(KeyError, match="unknown M2-BERT preset"):
        M2BertConfig.from_preset("m2-bert-1T")


def test_bundled_tokenizer_loads_offline():
    from model import load_tokenizer

    tokenizer = load_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 101, 102, 103)
    assert len(tokenizer) == 30522
    assert tokenizer("Hello World")["input_ids"] == [101, 7592, 2088, 102]


def test_spectrum_cache_is_emptied_by_mode_switches_even_when_weights_change_behind_autograd():
    torch.manual_seed(0)
    model = M2BertModel(tiny_config()).eval()
    ids = torch.randint(1000, 2000, (1, 32))
    with torch.no_grad():
        before = model(ids).pooler_output
        # As a ZeRO optimizer step does: new values through another tensor sharing the storage,
        # leaving the parameter's version counter untouched.
        freq = model.layers[0].sequence_mixer.long_conv.sin_freq
        alias = torch.empty(0).set_(freq.untyped_storage(), freq.storage_offset(), freq.shape, freq.stride())
        version = freq._version
        alias.add_(1.0)
        assert freq._version == version
        model.train()
        model.eval()
        after = model(ids).pooler_output
    assert (before - after).abs().max() > 1e-4
