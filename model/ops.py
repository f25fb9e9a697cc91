"""Functional building blocks of the Monarch Mixer layer, in plain PyTorch.

These functions are the reference semantics: the CUDA kernels in `csrc/` (see `model.kernels`) must
reproduce `monarch_mixer_core` exactly, and tests compare against it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def fast_fft_size(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n: sizes pocketfft and cuFFT transform fastest."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fft_long_conv(u: torch.Tensor, kernel_spectrum: torch.Tensor, d_skip: torch.Tensor, fft_size: int) -> torch.Tensor:
    """Long convolution of each channel with its filter, plus the D skip term.

    u: (B, H, L); kernel_spectrum: (H, fft_size // 2 + 1) complex, the rfft of the circular kernel built
    by `HyenaFilter.circular_kernel`; d_skip: (H,). Returns (B, H, L) in u's dtype, computed in fp32
    (FFTs in bf16 lose too much at 32k positions).
    """
    length = u.shape[-1]
    u32 = u.float()
    u_f = torch.fft.rfft(u32, n=fft_size)  # (B, H, F)
    y = torch.fft.irfft(u_f * kernel_spectrum, n=fft_size)[..., :length]  # (B, H, L)
    return (y + u32 * d_skip.float()[:, None]).to(u.dtype)


def causal_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv of width 3: out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + b. x: (B, C, L)."""
    length = x.shape[-1]
    return F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :length]


def monarch_mixer_core(
    projected: torch.Tensor,
    layer_input: torch.Tensor,
    short_conv_weight: torch.Tensor,
    short_conv_bias: torch.Tensor,
    long_conv_spectrum: torch.Tensor,
    long_conv_d: torch.Tensor,
    residual_conv_spectrum: torch.Tensor | None,
    residual_conv_d: torch.Tensor | None,
    fft_size: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sequence mixer between its input and output projections.

    projected: (B, 3H, L) output of the input projection (channels-first); layer_input: (B, H, L) the
    layer input u; keep: optional (B, 1, L) 0/1 mask (`masked` padding mode) applied to the inputs of
    both long convolutions so that positions beyond each text cannot influence the others.
    Returns (B, H, L), the tensor that goes into the output projection.
    """
    hidden = layer_input.shape[1]
    x = causal_short_conv(projected, short_conv_weight, short_conv_bias)  # (B, 3H, L)
    x1, x2, v = x.split(hidden, dim=1)  # each (B, H, L)
    v = v * x1  # pre-gate
    if keep is not None:
        v = v * keep
    y = fft_long_conv(v, long_conv_spectrum, long_conv_d, fft_size) * x2  # post-gate
    if residual_conv_spectrum is not None:
        u = layer_input if keep is None else layer_input * keep
        y = y + fft_long_conv(u, residual_conv_spectrum, residual_conv_d, fft_size)
    return y


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = blockdiag(W_0, ..., W_{n-1}) x + b with weight (n, out/n, in/n): one batched GEMM, no loop."""
    nblocks, out_per_block, in_per_block = weight.shape
    xb = x.reshape(*x.shape[:-1], nblocks, in_per_block)  # (..., n, in/n)
    y = torch.einsum("...ni,noi->...no", xb, weight).reshape(*x.shape[:-1], nblocks * out_per_block)
    return y if bias is None else y + bias
