"""The Monarch Mixer hot paths for inference on CPU: `model.ops` without its wasted work, and its GEMMs in
float32, bfloat16 or int8.

The same contracts as the reference (`model.ops.monarch_mixer_core`, `model.kernels.torch_block_diagonal_glu`),
tested against it to 1e-5 in float32; for tensors that autograd does not record (`model.kernels` routes CPU
inference here). What differs from the reference:
  * the input projection writes channels-first (B, 3H, L) directly, so the short convolution is three
    shifted multiply-adds along contiguous rows, with no transposed copy for `conv1d`;
  * both long convolutions share one zero-padded buffer, one rfft and one irfft; the spectrum products,
    D skip terms and gates are done in place;
  * the GLU stays in the batched-GEMM block layout from its first GEMM to its second, the GELU gate in
    place between them, as the CUDA path does.
Elementwise work runs on contiguous rows; layouts change only by `copy_`, whose transposition is blocked
(an elementwise op that writes a transposed view runs several times slower).

Precisions (`PRECISIONS`): `fp32`; `bf16`, GEMMs in bfloat16 (oneDNN, AMX or AVX-512 BF16 where the CPU has
them) with float32 FFTs, convolutions and normalisation; `int8`, GEMMs on int8 inputs with int32
accumulation (`torch._int_mm`): weights quantised per output channel once, activations per row (token) on
every call. The converted weights are made once per weight version (`PreparedWeights`). int8 is measured
(bench/encode.py) but not offered by `encode()`: it misses the fidelity bound (docs/serving.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16", "int8")
INT8_MAX = 127.0


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    return precision


# --- low-precision weights and GEMMs ---------------------------------------------------------------

def quantize(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of x with one float32 scale per slice along `dim` (a row of a weight, a
    token of an activation): (q int8 like x, scale with `dim` of size 1)."""
    low, high = torch.aminmax(x, dim=dim, keepdim=True)  # one pass (an inf-norm is several times slower)
    scale = torch.maximum(low.neg_(), high).float().clamp_(min=1e-12).div_(INT8_MAX)
    return torch.div(x, scale).round_().to(torch.int8), scale


class PreparedWeights:
    """A module's weights in bfloat16, or in int8 with per-output-channel scales, made once per weight
    version. Its owner clears it when switching between training and evaluation (see `HyenaFilter`)."""

    def __init__(self):
        self.entries: dict = {}

    def clear(self) -> None:
        self.entries.clear()

    def get(self, weight: torch.Tensor, precision: str):
        """bf16: the weight in bfloat16. int8: (q, scale), q (..., out, in) int8 and scale (..., out, 1)."""
        key = (id(weight), precision)
        version = (weight.data_ptr(), weight._version)
        entry = self.entries.get(key)
        if entry is None or entry[0] != version:
            with torch.no_grad():
                w = weight.detach()
                prepared = w.to(torch.bfloat16) if precision == "bf16" else quantize(w.float())
            self.entries[key] = entry = (version, prepared)
        return entry[1]


def int8_matmul(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float @ weight (N, K)^T, both quantised to int8 and accumulated in int32: (M, N) float32."""
    x_q, x_scale = quantize(x)
    out = torch.mul(torch._int_mm(x_q, weight_q.t()), x_scale, out=out)  # (M, N)
    return out.mul_(weight_scale.reshape(1, -1))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: str,
           prepared: PreparedWeights) -> torch.Tensor:
    """F.linear(x, weight, bias) with its GEMM in `precision`: x (..., K) -> (..., N) float32."""
    if precision == "fp32":
        return F.linear(x, weight, bias)
    if precision == "bf16":
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), prepared.get(weight, "bf16"), b).float()
    weight_q, weight_scale = prepared.get(weight, "int8")
    out = int8_matmul(x.reshape(-1, x.shape[-1]), weight_q, weight_scale)
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], -1)


class LowPrecisionLinear(nn.Module):
    """An `nn.Linear` for inference whose GEMM runs in `precision` (see `linear`)."""

    def __init__(self, layer: nn.Linear, precision: str):
        super().__init__()
        self.weight, self.bias, self.precision = layer.weight, layer.bias, check_precision(precision)
        self.prepared = PreparedWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.precision, self.prepared)


def with_low_precision_linears(module: nn.Module, precision: str) -> nn.Module:
    """`module` with every `nn.Linear` replaced, in place, by a `LowPrecisionLinear` in `precision`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, LowPrecisionLinear(child, precision))
        else:
            with_low_precision_linears(child, precision)
    return module


def linear_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str,
                          prepared: PreparedWeights) -> torch.Tensor:
    """The input projection written channels-first: F.linear(x, weight, bias).transpose(1, 2) as a
    contiguous (B, N, L) tensor, x (B, L, K); bfloat16 for bf16, else float32."""
    batch, length, _ = x.shape
    if precision == "int8":
        weight_q, weight_scale = prepared.get(weight, "int8")
        x_q, x_scale = quantize(x)  # (B, L, K), (B, L, 1): one scale per token
        out = torch.empty((batch, weight.shape[0], length), dtype=torch.float32)
        for b in range(batch):
            torch.mul(torch._int_mm(weight_q, x_q[b].t()), weight_scale, out=out[b])  # (N, L)
        return out.mul_(x_scale.transpose(1, 2)).add_(bias[:, None])
    if precision == "bf16":
        x, weight, bias = x.to(torch.bfloat16), prepared.get(weight, "bf16"), bias.to(torch.bfloat16)
    out = torch.empty((batch, weight.shape[0], length), dtype=x.dtype)
    for b in range(batch):
        torch.addmm(bias[:, None], weight, x[b].t(), out=out[b])  # (N, L)
    return out


def linear_from_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str,
                               prepared: PreparedWeights) -> torch.Tensor:
    """The output projection read channels-first: F.linear(x.transpose(1, 2), weight, bias) for x (B, K, L)
    with unit stride along L, without transposing x: (B, L, N); bfloat16 for bf16, else float32."""
    batch, _, length = x.shape
    out_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = torch.empty((batch, length, weight.shape[0]), dtype=out_dtype)
    if precision == "int8":
        weight_q, weight_scale = prepared.get(weight, "int8")
        x_q, x_scale = quantize(x, dim=1)  # (B, K, L), (B, 1, L): one scale per token
        for b in range(batch):
            torch.mul(torch._int_mm(x_q[b].t(), weight_q.t()), x_scale[b].t(), out=out[b])  # (L, N)
        return out.mul_(weight_scale.reshape(-1)).add_(bias)
    if precision == "bf16":
        x, weight, bias = x.to(torch.bfloat16), prepared.get(weight, "bf16"), bias.to(torch.bfloat16)
    for b in range(batch):
        torch.addmm(bias, x[b].t(), weight.t(), out=out[b])  # (L, N)
    return out


# --- the sequence mixer ------------------------------------------------------------------------------

def causal_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`model.ops.causal_short_conv` as three shifted multiply-adds along the contiguous sequence axis:
    out[t] = w0 x[t-2] + w1 x[t-1] + w2 x[t] + b, in float32 whatever x's dtype. x: (B, C, L);
    weight: (C, 1, 3); bias: (C,)."""
    x = x.float()  # once: a mixed-dtype op would convert x on each of the three reads
    w = weight.reshape(-1, 3, 1).float()  # (C, 3, 1)
    out = torch.addcmul(bias.float()[:, None], x, w[:, 2])  # (B, C, L)
    out[..., 1:].addcmul_(x[..., :-1], w[:, 1])
    out[..., 2:].addcmul_(x[..., :-2], w[:, 0])
    return out


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
    """`model.ops.monarch_mixer_core` in float32 (projected may be bfloat16; it is read fastest when
    contiguous, as `linear_channels_first` writes it). Returns (B, H, L) float32 with unit stride along L."""
    hidden = layer_input.shape[1]
    batch, _, length = projected.shape
    x1, x2, v = causal_short_conv(projected, short_conv_weight, short_conv_bias).split(hidden, dim=1)  # (B, H, L)
    residual = residual_conv_spectrum is not None
    signals = torch.empty((batch, 1 + residual, hidden, fft_size), dtype=torch.float32)  # (B, S, H, N)
    signals[..., length:].zero_()
    heads = signals[..., :length]  # (B, S, H, L): the long convolutions' inputs
    torch.mul(v, x1, out=heads[:, 0])  # pre-gate
    if residual:
        heads[:, 1].copy_(layer_input)
    if keep is not None:
        heads.mul_(keep[:, None])
    spectra = torch.fft.rfft(signals)  # (B, S, H, F)
    spectra[:, 0].mul_(long_conv_spectrum)
    if residual:
        spectra[:, 1].mul_(residual_conv_spectrum)
    y = torch.fft.irfft(spectra, n=fft_size)[..., :length]  # (B, S, H, L)
    out = y[:, 0].addcmul_(heads[:, 0], long_conv_d.float()[:, None]).mul_(x2)  # post-gate
    if residual:
        out.add_(y[:, 1]).addcmul_(heads[:, 1], residual_conv_d.float()[:, None])
    return out


# --- the GLU MLP -------------------------------------------------------------------------------------

def gelu_gate_blocks(gate_value: torch.Tensor) -> torch.Tensor:
    """GELU(gate) * value in the block layout: gate_value (n, R, 2I/n), whose first n/2 blocks are the gate
    and last n/2 the value of the (R, 2I) product, -> hidden (n, R, I/n), the blocks the second
    block-diagonal layer reads (hidden block 2b+s is half s of gate block b). Overwrites the gate."""
    nblocks, rows, width = gate_value.shape
    half = width // 2
    gate = gate_value[: nblocks // 2].view(nblocks // 2, rows, 2, half)
    value = gate_value[nblocks // 2:].view(nblocks // 2, rows, 2, half)
    hidden = gate_value.new_empty((nblocks // 2, 2, rows, half))
    torch.mul(torch.ops.aten.gelu_(gate), value, out=hidden.permute(0, 2, 1, 3))
    return hidden.view(nblocks, rows, half)


def _block_matmul(x: torch.Tensor, weight: torch.Tensor, precision: str, prepared: PreparedWeights) -> torch.Tensor:
    """x (n, R, in/n) @ weight (n, out/n, in/n)^T per block: (n, R, out/n); bfloat16 for bf16, else float32."""
    if precision == "int8":
        weight_q, weight_scale = prepared.get(weight, "int8")
        out = torch.empty((x.shape[0], x.shape[1], weight.shape[1]), dtype=torch.float32)
        for k in range(x.shape[0]):
            int8_matmul(x[k], weight_q[k], weight_scale[k], out=out[k])
        return out
    if precision == "bf16":
        x, weight = x.to(torch.bfloat16), prepared.get(weight, "bf16")
    return torch.bmm(x.to(weight.dtype), weight.transpose(1, 2))


def block_diagonal_glu(a: torch.Tensor, gate_value_weight: torch.Tensor, out_weight: torch.Tensor,
                       out_bias: torch.Tensor | None, precision: str = "fp32",
                       prepared: PreparedWeights | None = None) -> torch.Tensor:
    """`model.kernels.torch_block_diagonal_glu` as two batched GEMMs over the block layout with the GELU gate
    in place between them: a (..., H) -> (..., H) float32."""
    nblocks, _, in_per_block = gate_value_weight.shape
    rows = a.shape[:-1].numel()
    x = a.reshape(rows, nblocks, in_per_block).transpose(0, 1)  # (n, R, H/n), a view
    hidden = gelu_gate_blocks(_block_matmul(x, gate_value_weight, precision, prepared))  # (n, R, I/n)
    if precision == "fp32" and out_bias is not None:
        out = torch.baddbmm(out_bias.view(nblocks, 1, -1), hidden, out_weight.transpose(1, 2))  # (n, R, H/n)
    else:
        out = _block_matmul(hidden, out_weight, precision, prepared)
        if out_bias is not None:
            out = out.float().add_(out_bias.view(nblocks, 1, -1))
    return out.transpose(0, 1).reshape(*a.shape[:-1], -1).float()
