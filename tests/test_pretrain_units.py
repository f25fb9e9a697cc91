"""The pieces of pretraining that need no launcher: configs and overrides, parameter groups, the learning-rate
schedule, padding and masking, and the DeepSpeed config the run derives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pretrain_fixtures import mixture_128  # noqa: F401  (fixture)

from model import M2BertConfig, M2BertForMaskedLM
from train.config import ConfigError, HyenaGroupConfig, OptimizerConfig, load_config
from train.distributed import deepspeed_config
from train.mlm_data import DataConfig, MLMMasker, PaddingCollator, eval_samples
from train.mlm_task import PretrainConfig
from train.optim import linear_warmup_decay, parameter_groups

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*pretrain*.yaml"))
RECIPE = OptimizerConfig(hyena_filter=HyenaGroupConfig(1e-3, 0.1), hyena_positional=HyenaGroupConfig(1e-5, 0.0))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_pretrain_config_parses(path):
    config = load_config(PretrainConfig, path)
    assert config.optimizer.betas == (0.9, 0.98) and config.deepspeed["gradient_clipping"] == 1.0
    assert config.data.mlm_probability == 0.30 and config.data.eval_mlm_probability == 0.15
    assert config.optimizer.hyena_filter == HyenaGroupConfig(1e-3, 0.1)
    assert config.optimizer.hyena_positional == HyenaGroupConfig(1e-5, 0.0)


def test_overrides_are_typed_and_unknown_keys_are_named(tmp_path):
    tiny = REPO / "configs" / "pretrain_tiny.yaml"
    config = load_config(PretrainConfig, tiny, ["training.max_steps=7", "optimizer.lr=1e-4",
                                                "deepspeed.zero_optimization.stage=1"])
    assert config.training.max_steps == 7 and config.optimizer.lr == 1e-4
    assert config.deepspeed["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match=r"pretrain_tiny.yaml.*training\.max_stpes"):
        load_config(PretrainConfig, tiny, ["training.max_stpes=7"])
    with pytest.raises(ConfigError, match=r"training\.max_steps must be int"):
        load_config(PretrainConfig, tiny, ["training.max_steps=many"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(PretrainConfig, tiny, ["training.max_steps"])
    with pytest.raises(ConfigError, match="exactly one of model.preset and model.init_from"):
        load_config(PretrainConfig, tiny, ["model.init_from=somewhere"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(PretrainConfig, bad)


@pytest.mark.parametrize("override, message", [
    ("optimizer.hyena_filter.lr=-1e-3", r"optimizer\.hyena_filter: lr must be a positive finite number, got -0\.001"),
    ("optimizer.hyena_positional.lr=.nan", r"optimizer\.hyena_positional: lr must be a positive finite number"),
    ("optimizer.hyena_filter.weight_decay=-0.1", r"optimizer\.hyena_filter: weight_decay must be a finite number >= 0"),
    ("optimizer.lr=0", r"optimizer: lr must be a positive finite number, got 0"),
    ("optimizer.lr=.inf", r"optimizer: lr must be a positive finite number, got inf"),
    ("optimizer.weight_decay=-1e-5", r"optimizer: weight_decay must be a finite number >= 0"),
    ("optimizer.betas=[0.9,1.0]", r"optimizer: betas must be two numbers in \[0, 1\), got \[0\.9, 1\.0\]"),
    ("optimizer.betas=[-0.1,0.98]", r"optimizer: betas must be two numbers in \[0, 1\)"),
    ("optimizer.eps=0", r"optimizer: eps must be a positive finite number, got 0"),
])
def test_every_optimizer_group_setting_is_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=rf"pretrain_tiny\.yaml: {message}"):
        load_config(PretrainConfig, REPO / "configs" / "pretrain_tiny.yaml", [override])


def test_a_negative_hyena_learning_rate_fails_the_command_before_anything_is_built(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    config = REPO / "configs" / "pretrain_tiny.yaml"
    result = subprocess.run([sys.executable, "-m", "train.pretrain", "--config", str(config),
                             "optimizer.hyena_filter.lr=-1e-3", f"output.dir={out}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "optimizer.hyena_filter: lr must be a positive finite number, got -0.001" in result.stderr
    assert not out.exists()  # refused before the run folder (made before the model is built) exists


def test_keys_a_config_leaves_out_get_its_tasks_recipe(tmp_path):
    """The shared sections are one schema, but a fine-tuning file without an optimizer section trains at the
    fine-tuning recipe's lr 5e-6, not pretraining's 5e-4; what a file sets wins."""
    from train.retrieval_task import FinetuneConfig

    minimal = tmp_path / "finetune.yaml"
    minimal.write_text("model: {name_or_path: all-MiniLM-L6-v2}\noutput: {dir: runs/x}\noptimizer: {eps: 1.0e-8}\n")
    finetune = load_config(FinetuneConfig, minimal)
    assert (finetune.optimizer.lr, finetune.optimizer.weight_decay, finetune.optimizer.betas) == (5e-6, 0.01, (0.9, 0.999))
    assert finetune.optimizer.eps == 1e-8 and not finetune.optimizer.decay_biases_and_norms
    assert (finetune.training.global_batch_size, finetune.training.epochs, finetune.training.seed) == (32, 1, 0)
    pretrain = tmp_path / "pretrain.yaml"
    pretrain.write_text("model: {preset: tiny}\ndata: {manifest: m.json}\noutput: {dir: runs/y}\n"
                        "training: {max_steps: 10}\n")
    config = load_config(PretrainConfig, pretrain)
    assert (config.optimizer.lr, config.optimizer.betas, config.training.seed) == (5e-4, (0.9, 0.98), 17)


def test_global_batch_size_sets_accumulation_per_world_size():
    training = load_config(PretrainConfig, REPO / "configs" / "pretrain_80M_8k.yaml").training
    assert training.accumulation_steps(world_size=8) == 64 // (4 * 8)
    assert training.accumulation_steps(world_size=16) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        training.accumulation_steps(world_size=3)


def test_hyena_parameter_groups_follow_the_recipe():
    model = M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny", max_position_embeddings=64))
    groups = {g["name"]: g for g in parameter_groups(model, RECIPE)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {name: {names[id(p)] for p in g["params"]} for name, g in groups.items()}
    assert (groups["hyena_filter"]["lr"], groups["hyena_filter"]["weight_decay"]) == (1e-3, 0.1)
    assert (groups["hyena_positional"]["lr"], groups["hyena_positional"]["weight_decay"]) == (1e-5, 0.0)
    assert (groups["base"]["lr"], groups["base"]["weight_decay"]) == (5e-4, 1e-5)
    filters = [n for n in names.values() if ".long_conv." in n or ".residual_long_conv." in n]
    assert members["hyena_filter"] == {n for n in filters if ".forward_mlp." in n or n.endswith(".sin_freq")}
    assert members["hyena_positional"] == {n for n in filters if n.endswith(".z")}
    assert any(".reverse_mlp." in n for n in members["base"]) and any(n.endswith(".d_skip") for n in members["base"])
    # 2 layers x 2 filters, each with 3 forward-MLP Linear weights + 3 biases + out_proj weight + sin_freq
    assert len(members["hyena_filter"]) == 2 * 2 * 8 and len(members["hyena_positional"]) == 2 * 2
    assert sum(len(m) for m in members.values()) == len(names)  # every parameter exactly once


def test_learning_rate_warms_up_then_decays_linearly():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 1.0}, {"params": [], "lr": 0.5}])
    schedule = linear_warmup_decay(optimizer, total_steps=100, warmup_fraction=0.06, final_lr_fraction=0.02)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx([1 / 6, 0.5 / 6])  # the first update already moves
    assert lrs[5] == pytest.approx([1.0, 0.5])  # peak at the end of the 6-step warmup
    assert lrs[99] == pytest.approx([0.02, 0.01])  # alpha_f at the last step
    assert lrs[52][0] == pytest.approx(1 - 0.98 * (53 - 6) / 94)


def test_padding_collator_masks_padding_and_rejects_long_samples():
    collator = PaddingCollator(seq_len=6)
    batch = collator([{"input_ids": [101, 7, 8, 102], "kind": "natural"},
                      {"input_ids": [101, 5, 6, 7, 8, 102], "kind": "concat"}])
    assert batch["input_ids"].tolist() == [[101, 7, 8, 102, 0, 0], [101, 5, 6, 7, 8, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["kind"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"longer than seq_len=6 .*\(0, 7\)"):
        collator([{"input_ids": list(range(7)), "kind": "concat"}])


def test_masking_rates_specials_and_resumable_generator():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (64, 256), generator=generator)  # (B, L)
    ids[:, 0], ids[:, -1], ids[:8, 200:] = 101, 102, 0
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    masker = MLMMasker(0.30, seed=3)
    state = masker.generator_state()
    out = masker(batch)
    selected = out["labels"] != -100
    assert not selected[ids == 0].any() and not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(out["labels"][selected], ids[selected])
    eligible = (ids != 0).sum().item() - 2 * 64
    assert selected.sum().item() / eligible == pytest.approx(0.30, abs=0.01)
    became_mask = (out["input_ids"][selected] == 103).float().mean().item()
    kept = (out["input_ids"][selected] == ids[selected]).float().mean().item()
    assert became_mask == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)
    assert torch.equal(out["input_ids"][~selected], ids[~selected])
    masker.set_generator_state(state)
    again = masker(batch)
    assert torch.equal(again["input_ids"], out["input_ids"]) and torch.equal(again["labels"], out["labels"])


def test_deepspeed_config_derives_batch_and_precision():
    block = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    config = deepspeed_config(block, micro_batch_size=4, gradient_accumulation_steps=2, precision="bf16", world_size=8)
    assert config["train_batch_size"] == 64 and config["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(block, micro_batch_size=4, gradient_accumulation_steps=2,
                                          precision="fp32", world_size=1)
    autocast = deepspeed_config(block, micro_batch_size=1, gradient_accumulation_steps=1, precision="amp_bf16",
                                world_size=1)
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config({**block, "train_micro_batch_size_per_gpu": 3}, micro_batch_size=4,
                         gradient_accumulation_steps=1, precision="fp32", world_size=1)
    with pytest.raises(ValueError, match="training.precision"):
        deepspeed_config({**block, "bf16": {"enabled": True}}, micro_batch_size=4, gradient_accumulation_steps=1,
                         precision="fp32", world_size=1)


def test_remote_streams_are_fetched_into_the_local_cache(mixture_128, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    remote = DataConfig(manifest=str(mixture_128), remote=str(mixture_128.parent), local_cache=str(cache))
    fetched = eval_samples(remote, num_samples=8, batch_size=4)
    local = eval_samples(DataConfig(manifest=str(mixture_128)), num_samples=8, batch_size=4)
    assert [s["input_ids"].tolist() for s in fetched] == [s["input_ids"].tolist() for s in local]
    assert list(cache.rglob("shard.*.mds*")), "no shard was copied into the local cache"
    with pytest.raises(ValueError, match="local_cache"):
        DataConfig(manifest=str(mixture_128), remote="s3://bucket/mixture")
