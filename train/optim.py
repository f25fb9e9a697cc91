"""Optimiser parameter groups and learning-rate schedules.

M2-BERT pretraining (reference §3.2) trains the Hyena implicit filters with their own settings: the
forward implicit-filter MLPs and the shared Sin frequency at lr 1e-3 / weight decay 0.1, the positional
features `z` at lr 1e-5 without decay; everything else (the reverse MLPs and D terms included) is in the
base group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Our parameter names (model/modeling_m2_bert.py): `...sequence_mixer.{long_conv,residual_long_conv}.X`.
HYENA_FILTER_PATTERN = re.compile(r"(^|\.)(long_conv|residual_long_conv)\.(forward_mlp\.|sin_freq$)")
HYENA_POSITIONAL_PATTERN = re.compile(r"(^|\.)(long_conv|residual_long_conv)\.z$")


@dataclass
class HyenaGroupConfig:
    """Learning rate and weight decay of one group of Hyena filter parameters."""

    lr: float
    weight_decay: float


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and linear decay (the M2-BERT long-context recipe by default).

    `weight_decay` follows `torch.optim.AdamW` (decay multiplied by the current lr); the authors' Composer
    DecoupledAdamW multiplies by lr / peak lr instead (see docs/pretraining.md).
    """

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.06
    final_lr_fraction: float = 0.0
    hyena_filter: HyenaGroupConfig | None = None
    hyena_positional: HyenaGroupConfig | None = None

    def __post_init__(self):
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must have two values, got {self.betas}")


def hyena_param_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """AdamW parameter groups: `base`, `hyena_filter` and `hyena_positional` (each named by a `name` key).

    A group whose config is None joins the base group; empty groups are left out. Parameters are
    listed once (tied weights appear under their first name).
    """
    groups = {"base": [], "hyena_filter": [], "hyena_positional": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if config.hyena_filter is not None and HYENA_FILTER_PATTERN.search(name):
            groups["hyena_filter"].append(param)
        elif config.hyena_positional is not None and HYENA_POSITIONAL_PATTERN.search(name):
            groups["hyena_positional"].append(param)
        else:
            groups["base"].append(param)
    settings = {
        "base": (config.lr, config.weight_decay),
        "hyena_filter": (config.hyena_filter.lr, config.hyena_filter.weight_decay) if config.hyena_filter else None,
        "hyena_positional": ((config.hyena_positional.lr, config.hyena_positional.weight_decay)
                             if config.hyena_positional else None),
    }
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def build_adamw(model: torch.nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW over `hyena_param_groups` (fused kernels on CUDA)."""
    return torch.optim.AdamW(hyena_param_groups(model, config), lr=config.lr, betas=tuple(config.betas),
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
