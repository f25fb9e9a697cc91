"""Loading a model folder runs no code of the folder's, refuses bad configs and tensors before building the
model, and gives the same model every time. Each test builds the hostile folder itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import M2BertConfig, M2BertForMaskedLM, M2BertModel
from model.encoders import load_encoder, minilm_path

TEXTS = ["the committee agreed on the budget", "a long meeting about the remote control design"]
EVIL_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from sentence_transformers.models import Normalize as Evil
'''


def minilm_copy(directory: Path) -> Path:
    """all-MiniLM-L6-v2 as a folder of our own (the weights linked, not copied)."""
    source = minilm_path()
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    (directory / "model.safetensors").symlink_to(source / "model.safetensors")
    return directory


def with_custom_module(directory: Path, marker: Path) -> Path:
    """A sentence-transformers folder whose modules.json names a module file shipped beside it."""
    (directory / "modeling_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "3_Evil", "type": "modeling_evil.Evil"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "3_Evil").mkdir()
    return directory


def test_a_sentence_transformers_folder_naming_its_own_module_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    folder = with_custom_module(minilm_copy(tmp_path / "evil"), marker)
    with pytest.raises(PermissionError, match=r"evil: modules.json names module\(s\) \['modeling_evil.Evil'\]"):
        load_encoder(str(folder))
    assert not marker.exists()


def test_a_folder_shipping_python_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "marker"
    folder = minilm_copy(tmp_path / "hf-with-code")
    (folder / "custom_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(PermissionError, match=r"hf-with-code: the folder ships Python code \['custom_tokenizer.py'\]"):
        load_encoder(str(folder))
    assert not marker.exists()
    # Asked for, the same folder loads (so the refusal above is the check, not a broken folder).
    encoder = load_encoder(str(folder), trust_remote_code=True)
    assert encoder.encode(TEXTS).shape == (2, 384)


def test_trust_remote_code_lets_the_named_module_run(tmp_path):
    marker = tmp_path / "marker"
    folder = with_custom_module(minilm_copy(tmp_path / "trusted"), marker)
    load_encoder(str(folder), trust_remote_code=True)
    assert marker.read_text() == "the folder's code ran"


@pytest.fixture()
def tiny_export(tmp_path) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "tiny"
    M2BertModel(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(directory)
    return directory


def edit_config(directory: Path, **values) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(values)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 65536, r"hidden_size=65536 is out of range \[1, 16384\]"),
    ("num_hidden_layers", 10**6, r"num_hidden_layers=1000000 is out of range"),
    ("max_position_embeddings", -512, r"max_position_embeddings=-512 is out of range"),
    ("intermediate_size", "3072", r"intermediate_size must be an integer, got '3072'"),
    ("hidden_dropout_prob", 1.5, r"hidden_dropout_prob=1.5 is out of range"),
    ("bidirectional", "yes", r"bidirectional must be true or false"),
    ("pad_token_id", 40000, r"pad_token_id=40000 must be an integer in \[0, vocab_size=30528\)"),
])
def test_config_values_are_checked_before_anything_is_built(tiny_export, key, value, message):
    edit_config(tiny_export, **{key: value})
    with pytest.raises(ValueError, match=rf"{tiny_export / 'config.json'}: M2BertConfig: {message}"):
        M2BertModel.from_pretrained(tiny_export)


def test_a_model_too_large_for_memory_is_refused_before_allocation(tiny_export):
    edit_config(tiny_export, hidden_size=16384, num_hidden_layers=256, intermediate_size=65536,
                max_position_embeddings=65536, long_conv_l_max=65536)
    with pytest.raises(ValueError, match=r"config.json: the model this config describes needs \d+\.\d GiB"):
        M2BertModel.from_pretrained(tiny_export)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_tensor_of_a_non_floating_dtype_is_refused_by_name(tiny_export, dtype):
    weights = tiny_export / "model.safetensors"
    state = load_file(str(weights))
    state["pooler.dense.bias"] = torch.ones_like(state["pooler.dense.bias"], dtype=dtype)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"non-floating dtype: \['pooler.dense.bias \({dtype}\)'\]"):
        M2BertModel.from_pretrained(tiny_export)


def test_non_finite_weights_are_refused_by_name(tiny_export):
    weights = tiny_export / "model.safetensors"
    state = load_file(str(weights))
    state["layers.1.state_mixer.out_proj.weight"][0, 0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"NaN or infinity: \['layers.1.state_mixer.out_proj.weight'\]"):
        M2BertModel.from_pretrained(tiny_export)


def test_a_pretraining_export_loads_as_the_same_encoder_every_time(tmp_path):
    """Its pooler is not in the checkpoint: it is initialised from the checkpoint's content, not the global
    random state, so two loads (in any process, after any other random draws) embed identically."""
    torch.manual_seed(0)
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(tmp_path / "mlm")
    torch.manual_seed(1)
    first = M2BertModel.from_pretrained(tmp_path / "mlm").encode(TEXTS)
    torch.manual_seed(2)
    torch.rand(100)
    second = M2BertModel.from_pretrained(tmp_path / "mlm").encode(TEXTS)
    np.testing.assert_array_equal(first, second)
    torch.manual_seed(3)
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(tmp_path / "other")
    assert not np.allclose(M2BertModel.from_pretrained(tmp_path / "other").encode(TEXTS), first, atol=1e-3)
