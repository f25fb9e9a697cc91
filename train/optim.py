"""The optimiser of every training run: AdamW over one rule of parameter groups, and its learning-rate schedule.

M2-BERT pretraining (reference §3.2) trains the Hyena implicit filters with their own settings: the
forward implicit-filter MLPs and the shared Sin frequency at lr 1e-3 / weight decay 0.1, the positional
features `z` at lr 1e-5 without decay; everything else (the reverse MLPs and D terms included) is in the
base group. The authors' fine-tuning exempts biases and LayerNorm weights from weight decay instead
(M2's Hyena `d_skip` is their `bias`); `OptimizerConfig.decay_biases_and_norms` chooses.
"""

from __future__ import annotations

import math
import re

import torch

from train.config import OptimizerConfig

# Our parameter names (model/modeling_m2_bert.py): `...sequence_mixer.{long_conv,residual_long_conv}.X`.
HYENA_FILTER_PATTERN = re.compile(r"(^|\.)(long_conv|residual_long_conv)\.(forward_mlp\.|sin_freq$)")
HYENA_POSITIONAL_PATTERN = re.compile(r"(^|\.)(long_conv|residual_long_conv)\.z$")
# Biases and LayerNorm weights (the authors' `bias` / `LayerNorm` rule, in our names and Hugging Face's).
NO_WEIGHT_DECAY_PATTERN = re.compile(r"(bias|LayerNorm\.weight|layer_norm\.weight|d_skip)$")


def parameter_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """AdamW parameter groups, each named by a `name` key, in this order:
      * `base`: the base lr and weight decay;
      * `no_decay`: biases, LayerNorm weights and Hyena `d_skip`, at the base lr without decay (only when
        `decay_biases_and_norms` is false);
      * `hyena_filter`, `hyena_positional`: the recipe's Hyena settings (when set; they take precedence).
    Empty groups are left out. Parameters are listed once (tied weights under their first name).
    """
    members = {"base": [], "no_decay": [], "hyena_filter": [], "hyena_positional": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if config.hyena_filter is not None and HYENA_FILTER_PATTERN.search(name):
            members["hyena_filter"].append(param)
        elif config.hyena_positional is not None and HYENA_POSITIONAL_PATTERN.search(name):
            members["hyena_positional"].append(param)
        elif not config.decay_biases_and_norms and NO_WEIGHT_DECAY_PATTERN.search(name):
            members["no_decay"].append(param)
        else:
            members["base"].append(param)
    settings = {"base": (config.lr, config.weight_decay), "no_decay": (config.lr, 0.0)}
    for name in ("hyena_filter", "hyena_positional"):
        group = getattr(config, name)
        if group is not None:
            settings[name] = (group.lr, group.weight_decay)
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in members.items() if params]


def build_adamw(model: torch.nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW over `parameter_groups` (fused kernels on CUDA)."""
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, betas=tuple(config.betas),
                             eps=config.eps, weight_decay=config.weight_decay, fused=device.type == "cuda")


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return int(math.ceil(warmup_fraction * total_steps))


def linear_warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                        final_lr_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr rises linearly from 0 over the warmup, then falls linearly to
    `final_lr_fraction` of its peak at `total_steps` (Composer's `linear_decay_with_warmup`, alpha_f).

    The multiplier for optimizer step s (1-based, as the scheduler is stepped after each update) is
    s / warmup during warmup, so the first update already uses a non-zero lr.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = warmup_steps(total_steps, warmup_fraction)

    def multiplier(step: int) -> float:
        step += 1  # LambdaLR passes the number of completed steps; this is the step about to run
        if step <= warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - (1.0 - final_lr_fraction) * progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
