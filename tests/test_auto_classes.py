"""transformers' Auto classes load our M2-BERT exports (registered by `import model`), no remote code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

import model
from model import M2BertConfig, M2BertForMaskedLM, M2BertModel
from model.encoders import load_encoder

TEXTS = ["a short note", "a longer note about the budget of the remote control design team"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    encoder_dir, mlm_dir = tmp_path_factory.mktemp("encoder"), tmp_path_factory.mktemp("mlm")
    M2BertModel(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(encoder_dir)
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(mlm_dir)
    return encoder_dir, mlm_dir


def test_exports_name_their_type_and_class(export):
    encoder_dir, mlm_dir = export
    config = json.loads((encoder_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["padding_mode"]) == ("m2_bert", ["M2BertModel"], "masked")
    assert "auto_map" not in config  # nothing for trust_remote_code to run
    assert json.loads((mlm_dir / "config.json").read_text())["architectures"] == ["M2BertForMaskedLM"]


def test_auto_model_gives_our_classes_and_the_same_embeddings(export):
    encoder_dir, mlm_dir = export
    assert type(AutoConfig.from_pretrained(encoder_dir)) is M2BertConfig
    auto = AutoModel.from_pretrained(encoder_dir)
    assert type(auto) is M2BertModel and auto.config.padding_mode == "masked"
    direct = model.from_pretrained(encoder_dir)
    np.testing.assert_array_equal(auto.encode(TEXTS), direct.encode(TEXTS))
    np.testing.assert_array_equal(auto.encode(TEXTS), load_encoder(str(encoder_dir)).encode(TEXTS))
    # Config overrides go through AutoConfig, as for any transformers model.
    assert AutoModel.from_pretrained(encoder_dir, padding_mode="reference").config.padding_mode == "reference"

    masked_lm = AutoModelForMaskedLM.from_pretrained(mlm_dir)
    assert type(masked_lm) is M2BertForMaskedLM
    ids = torch.tensor([[101, 2023, 103, 2742, 102]])
    torch.testing.assert_close(masked_lm(ids).logits, M2BertForMaskedLM.from_pretrained(mlm_dir)(ids).logits)


def test_authors_bert_configs_keep_loading_through_model_from_pretrained(export, tmp_path):
    encoder_dir, _ = export
    config = json.loads((encoder_dir / "config.json").read_text())
    for key in ("padding_mode", "architectures"):
        config.pop(key)
    config["model_type"] = "bert"  # as in the authors' released config.json files
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((encoder_dir / "model.safetensors").read_bytes())
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "BertConfig"  # not ours: no silent takeover
    loaded = model.from_pretrained(tmp_path)
    assert type(loaded) is M2BertModel and loaded.config.padding_mode == "reference"
