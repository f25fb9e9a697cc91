"""The warm start of a longer M2-BERT from a shorter one (128 -> 512 here, as 8k -> 32k in the recipe)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from pretrain_fixtures import REPO, mixture_128  # noqa: F401  (fixture)

from model import M2BertConfig, M2BertForMaskedLM
from train.evaluate_mlm import validation_mlm_metrics
from train.warm_start import warm_start

SHORT, LONG = 128, 512


@pytest.fixture(scope="module")
def source() -> M2BertForMaskedLM:
    """A tiny 128-position model whose z is no longer the initial features (as after training)."""
    torch.manual_seed(0)
    model = M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny", max_position_embeddings=SHORT))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".z"):
                param.add_(0.01 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("z_mode", ["interpolate", "tile"])
def test_warm_start_shapes_and_copies(source, z_mode):
    target = warm_start(source, LONG, z_mode)
    assert target.config.max_position_embeddings == LONG and target.config.long_conv_l_max == LONG
    assert target.config.padding_mode == source.config.padding_mode
    old, new = source.state_dict(), target.state_dict()
    assert set(old) == set(new)
    positions = "m2_bert.embeddings.position_embeddings.weight"
    assert new[positions].shape == (LONG, source.config.hidden_size)
    assert torch.equal(new[positions], old[positions].repeat(LONG // SHORT, 1))  # row n = old row n mod 128
    z_names = [n for n in new if n.endswith(".z")]
    assert len(z_names) == 2 * source.config.num_hidden_layers
    for name in z_names:
        z_old, z_new = old[name][0].numpy(), new[name][0].numpy()  # (L, 5)
        assert z_new.shape == (LONG, source.config.hyena_emb_dim)
        if z_mode == "tile":
            expected = np.concatenate([z_old] * (LONG // SHORT))
        else:  # linear interpolation on a grid stretched from [0, 127] to [0, 511]
            grid = np.linspace(0, SHORT - 1, LONG)
            expected = np.stack([np.interp(grid, np.arange(SHORT), z_old[:, e]) for e in range(z_old.shape[1])], 1)
        np.testing.assert_allclose(z_new, expected, atol=1e-6)
    for name in (n for n in new if n.endswith(".t")):
        assert torch.equal(new[name][0, :, 0], torch.linspace(0, 1, LONG))
    copied = [n for n in new if not n.endswith((".z", ".t", "position_embeddings.weight"))]
    assert copied and all(torch.equal(new[n], old[n]) for n in copied)


def test_warm_start_refuses_a_shorter_length(source):
    with pytest.raises(ValueError, match="shorter than the source"):
        warm_start(source, 64)


def test_cli_writes_a_loadable_model_that_evaluates_on_both_lengths(source, mixture_128, tmp_path):  # noqa: F811
    source_dir, out = tmp_path / "short", tmp_path / "long"
    source.save_pretrained(source_dir)
    result = subprocess.run([sys.executable, "-m", "train.warm_start", "--from", str(source_dir), "--length", str(LONG),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "warm_start.json").read_text())
    assert (record["source_length"], record["length"], record["z_mode"]) == (SHORT, LONG, "tile")
    model = M2BertForMaskedLM.from_pretrained(out)
    assert model.m2_bert.embeddings.position_embeddings.weight.shape == (LONG, source.config.hidden_size)

    before = validation_mlm_metrics(source, mixture_128, num_samples=8, batch_size=4)
    after = validation_mlm_metrics(model, mixture_128, num_samples=8, batch_size=4)
    assert before["masked_tokens"] == after["masked_tokens"] > 0  # the same samples and masks for both models
    assert math.isfinite(before["loss"]) and math.isfinite(after["loss"])

    input_ids = torch.randint(1000, 2000, (1, LONG))
    labels = torch.full_like(input_ids, -100)
    labels[0, ::7] = input_ids[0, ::7]
    output = model(input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    assert output.logits.shape == (len(range(0, LONG, 7)), model.config.vocab_size)
    assert torch.isfinite(output.loss)


def folder_contents(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where, message", [
    ("same", "is the --from model itself"),
    ("inside", "is inside the --from model"),
    ("around", "contains the --from model"),
    ("foreign", "is a non-empty folder that is not an earlier warm start"),
    ("file", "is a file"),
])
def test_cli_refuses_an_output_that_would_overwrite_what_it_was_not_given(source, tmp_path, capsys, where, message):
    from train.warm_start import main

    parent = tmp_path / "runs"
    source_dir = parent / "short"
    source.save_pretrained(source_dir)
    (parent / "notes").mkdir()
    (parent / "notes" / "results.txt").write_text("a user's file")
    (parent / "log.txt").write_text("a user's file")
    out = {"same": source_dir, "inside": source_dir / "long", "around": parent, "foreign": parent / "notes",
           "file": parent / "log.txt"}[where]
    before = folder_contents(parent)
    with pytest.raises(SystemExit) as exit_info:
        main(["--from", str(source_dir), "--length", str(LONG), "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert folder_contents(parent) == before  # nothing written, nothing replaced
    assert sorted(p.name for p in parent.iterdir()) == ["log.txt", "notes", "short"]


def test_cli_replaces_an_earlier_warm_start_whole(source, tmp_path):
    from train.warm_start import main

    source_dir, out = tmp_path / "short", tmp_path / "long"
    source.save_pretrained(source_dir)
    source_files = folder_contents(source_dir)
    assert main(["--from", str(source_dir), "--length", str(LONG), "--out", str(out)]) == 0
    assert main(["--from", str(source_dir), "--length", str(2 * LONG), "--z-mode", "interpolate", "--out", str(out)]) == 0
    assert json.loads((out / "warm_start.json").read_text())["length"] == 2 * LONG
    assert M2BertForMaskedLM.from_pretrained(out).config.max_position_embeddings == 2 * LONG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long", "short"]  # no staging or replaced folder left
    assert folder_contents(source_dir) == source_files
