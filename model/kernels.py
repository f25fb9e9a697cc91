"""Dispatch for the Monarch Mixer hot paths: the fused CUDA kernels of `csrc/` when built and usable for
the input, the CPU inference path of `model.cpu_ops` for CPU tensors that autograd does not record, the
PyTorch reference in `model.ops` otherwise. Two entry points: `monarch_mixer_core` (the
sequence mixer between its projections) and `block_diagonal_glu` (the GLU MLP's two block-diagonal
layers and GELU gate).

The model chooses the path from its config, as Hugging Face models choose their attention implementation:
`M2BertConfig.kernel_implementation` is `auto` (default: the kernels for CUDA tensors of a supported shape
and dtype once the extension is built or loads; the CPU path for CPU inference), `cuda` (the kernels, or an
error that says why they cannot run), `cpu` (the CPU path, or an error) or `torch` (always the reference). The environment variable `M2_KERNELS` overrides it for every model
of the process; it is read once, on first use. Importing this module, or running the model on CPU tensors,
never compiles anything: the extension is built (or loaded from its cache) on the first call that would use
it. See docs/kernels.md for the algorithms and the ahead-of-time build.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

from . import cpu_ops
from .configuration_m2_bert import KERNEL_IMPLEMENTATIONS
from .ops import block_diagonal_linear
from .ops import monarch_mixer_core as torch_monarch_mixer_core

logger = logging.getLogger(__name__)

MODES = KERNEL_IMPLEMENTATIONS
MODE_VARIABLE = "M2_KERNELS"
EXTENSION_NAME = "m2_mixer_kernels"
EMULATED_EXTENSION_NAME = "m2_mixer_kernels_emulated"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
MAX_LENGTH = 32768
MIN_TRANSFORM_LENGTH = 64  # shortest transform: n = 128, sub-problems of 16 points
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


class KernelsUnavailable(RuntimeError):
    """The fused kernels cannot run here (no CUDA, no compiler, a failed build, or an unsupported input)."""


@functools.cache
def environment_override() -> str | None:
    """The path `M2_KERNELS` asks for (`auto`, `torch` or `cuda`), or None when it is unset; read once per
    process (`environment_override.cache_clear()` makes the next call read it again)."""
    mode = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if not mode:
        return None
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={mode!r}; expected one of {MODES}")
    return mode


def resolve_mode(configured: str) -> str:
    """The path a model with `kernel_implementation=configured` takes: `M2_KERNELS` when set, else its own."""
    mode = environment_override() or configured
    if mode not in MODES:
        raise ValueError(f"kernel implementation {mode!r}; expected one of {MODES}")
    return mode


def _cpu_unsupported_reason(tensor: torch.Tensor) -> str | None:
    if tensor.device.type != "cpu":
        return f"the tensors are on {tensor.device}"
    if torch.is_grad_enabled():
        return "autograd is recording (the CPU path is for inference: run under torch.no_grad())"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on (the CPU path has its own precision: encode(..., precision=...))"
    return None


def _in_autocast_dtype(tensors: tuple, like: torch.Tensor) -> tuple:
    """`tensors` with the floating ones in `like`'s dtype when autocast runs on its device in that dtype, else
    unchanged. Under autocast the projections come out in bfloat16 while the residual stream and the weights
    stay float32; the kernels take one dtype, so the others join it, as autocast does for a matmul's inputs."""
    device_type = like.device.type
    if not torch.is_autocast_enabled(device_type) or like.dtype != torch.get_autocast_dtype(device_type):
        return tensors
    return tuple(t.to(like.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def uses_cpu_path(implementation: str, tensor: torch.Tensor) -> bool:
    """Whether a forward pass on `tensor` with `kernel_implementation=implementation` (which `M2_KERNELS`
    overrides) runs through `model.cpu_ops`: in `cpu` mode always (or an error that says why it cannot), in
    `auto` mode for CPU tensors while autograd is not recording and autocast is off."""
    mode = resolve_mode(implementation)
    if mode not in ("auto", "cpu"):
        return False
    reason = _cpu_unsupported_reason(tensor)
    if mode == "cpu" and reason is not None:
        raise KernelsUnavailable(f"kernel_implementation (or {MODE_VARIABLE}) is cpu but the CPU path cannot run: "
                                 f"{reason}")
    return reason is None


def _build_flags(host_emulation: bool) -> dict:
    common = ["-O3"]  # torch adds the C++ standard it needs
    if host_emulation:
        return dict(extra_cflags=common + ["-DM2_HOST_EMULATION"], with_cuda=False)
    # No --use_fast_math: the FFTs need IEEE division and denormals to match the reference to ~1e-6.
    return dict(extra_cflags=common, extra_cuda_cflags=common, with_cuda=True)


def build_extension(host_emulation: bool = False, build_directory: str | os.PathLike | None = None,
                    verbose: bool = False):
    """Compile (or load from torch's extension cache) the kernels with `torch.utils.cpp_extension.load`.

    `host_emulation=True` builds the CPU version that runs the same kernel bodies on CPU tensors (for the
    tests, see csrc/host_emulation.cpp); it needs only a C++ compiler. `build_directory` defaults to
    torch's cache (`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions).
    """
    from torch.utils import cpp_extension

    if not CSRC.is_dir():
        raise KernelsUnavailable(f"kernel sources not found at {CSRC} (install from a source checkout, "
                                 "or build them ahead of time: see docs/kernels.md)")
    if host_emulation:
        name, sources = EMULATED_EXTENSION_NAME, [CSRC / "binding.cpp", CSRC / "host_emulation.cpp"]
    else:
        if cpp_extension.CUDA_HOME is None:
            raise KernelsUnavailable("no CUDA toolkit found to compile the kernels (set CUDA_HOME)")
        name, sources = EXTENSION_NAME, [CSRC / "binding.cpp", CSRC / "kernels.cu"]
    logger.info("loading the %s extension (compiled on first use and cached; this can take minutes)", name)
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
        build_directory = str(build_directory)
    return cpp_extension.load(name=name, sources=[str(s) for s in sources], verbose=verbose,
                              build_directory=build_directory, extra_include_paths=[str(CSRC)],
                              **_build_flags(host_emulation))


_cuda_extension: list = []  # [module] or [KernelsUnavailable] once the first attempt has decided


def cuda_extension():
    """The CUDA extension: the ahead-of-time build if installed (`pip install ./csrc`), else the JIT build.

    Raises KernelsUnavailable when neither works. The outcome, failure included, is kept for the process,
    so that a failed build is not retried on every call.
    """
    if not _cuda_extension:
        _cuda_extension.append(_load_cuda_extension())
    if isinstance(_cuda_extension[0], KernelsUnavailable):
        raise _cuda_extension[0]
    return _cuda_extension[0]


def _load_cuda_extension():
    if not torch.cuda.is_available():
        return KernelsUnavailable("CUDA is not available")
    try:
        import m2_mixer_kernels  # the ahead-of-time build

        return m2_mixer_kernels
    except ImportError:
        pass
    try:
        return build_extension()
    except KernelsUnavailable as error:
        return error
    except Exception as error:  # a compiler or linker failure: report it, then use the reference
        logger.warning("building the Monarch Mixer kernels failed: %s", error)
        return KernelsUnavailable(f"building the kernels failed: {error}")


def _unsupported_reason(projected: torch.Tensor, layer_input: torch.Tensor, long_conv_spectrum: torch.Tensor,
                        residual_conv_spectrum: torch.Tensor | None, keep: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take this input, or None."""
    tensors = [projected, layer_input, long_conv_spectrum]
    tensors += [t for t in (residual_conv_spectrum, keep) if t is not None]
    if not all(t.is_cuda for t in tensors):
        return "the tensors are not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "the tensors are on different devices"
    if projected.dtype not in SUPPORTED_DTYPES or layer_input.dtype != projected.dtype:
        return f"activations of dtype {projected.dtype} (the kernels take float32 or bfloat16)"
    if long_conv_spectrum.dtype != torch.complex64:
        return f"spectrum of dtype {long_conv_spectrum.dtype} (the kernels take complex64)"
    batch, _, length = projected.shape
    if length > MAX_LENGTH:
        return f"length {length} (the kernels go up to {MAX_LENGTH})"
    if batch > 65535:
        return f"batch {batch} (the kernels go up to 65535)"
    return None


def transform_size(length: int) -> int:
    """The kernels' FFT size for a length: twice the next power of two (at least 128)."""
    return 2 * max(MIN_TRANSFORM_LENGTH, 1 << max(length - 1, 0).bit_length())


@functools.cache
def _twiddles_cpu(n: int) -> torch.Tensor:
    angle = torch.arange(n, dtype=torch.float64) * (-2 * math.pi / n)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)  # exp(-2 pi i k / n), rounded once


_twiddle_tables: dict[tuple[int, torch.device], torch.Tensor] = {}


def twiddles(n: int, device: torch.device) -> torch.Tensor:
    """exp(-2 pi i k / n) for k < n, complex64, one table per (n, device)."""
    key = (n, torch.device(device))
    if key not in _twiddle_tables:
        _twiddle_tables[key] = _twiddles_cpu(n).to(device)
    return _twiddle_tables[key]


def resample_spectrum(spectrum: torch.Tensor, fft_size: int, length: int, n: int) -> torch.Tensor:
    """The spectrum (H, n/2 + 1) of the same bidirectional kernel on a circle of n points.

    `spectrum` is the rfft of a circular kernel of fft_size >= 2 * length points: its first `length` taps
    are the forward kernel and its last `length - 1` taps the reversed backward kernel; the taps between
    never touch outputs [0, length). Differentiable, so gradients reach the original spectrum.
    """
    kernel = torch.fft.irfft(spectrum, n=fft_size)  # (H, fft_size)
    gap = kernel.new_zeros(kernel.shape[0], n - 2 * length + 1)
    circular = torch.cat([kernel[:, :length], gap, kernel[:, fft_size - length + 1:]], dim=1)  # (H, n)
    return torch.fft.rfft(circular, n=n)


class _ResampledSpectra:
    """Resampled spectra of the last few filter spectra seen without gradients (inference), keyed by the
    source tensor, which is held so that its memory cannot be reused by another tensor while cached."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def get(self, spectrum: torch.Tensor, fft_size: int, length: int, n: int) -> torch.Tensor:
        if spectrum.requires_grad and torch.is_grad_enabled():
            return resample_spectrum(spectrum, fft_size, length, n)
        key = (id(spectrum), spectrum._version, fft_size, length, n)
        entry = self.entries.get(key)
        if entry is not None and entry[0] is spectrum:
            self.entries.move_to_end(key)
            return entry[1]
        with torch.no_grad():
            resampled = resample_spectrum(spectrum, fft_size, length, n)
        self.entries[key] = (spectrum, resampled)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return resampled


_resampled_spectra = _ResampledSpectra()


def _kernel_spectrum(spectrum: torch.Tensor, fft_size: int, length: int, n: int) -> torch.Tensor:
    if fft_size == n:
        return spectrum.resolve_conj().contiguous()
    return _resampled_spectra.get(spectrum, fft_size, length, n).contiguous()


class _MixerCoreFunction(torch.autograd.Function):
    """`monarch_mixer_core` through the extension's mixer_forward / mixer_backward."""

    @staticmethod
    def forward(ctx, extension, log2_p, projected, layer_input, weight, bias, spectrum, d_skip,
                residual_spectrum, residual_d_skip, keep, twiddle_table):
        y, conv_output = extension.mixer_forward(projected, layer_input, weight, bias, spectrum, d_skip,
                                                 residual_spectrum, residual_d_skip, keep, twiddle_table, log2_p)
        ctx.extension, ctx.log2_p = extension, log2_p
        ctx.save_for_backward(projected, layer_input, weight, bias, spectrum, d_skip, residual_spectrum,
                              residual_d_skip, keep, twiddle_table, conv_output)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        grads = ctx.extension.mixer_backward(grad_y, *ctx.saved_tensors, ctx.log2_p)
        return (None, None, *grads, None, None)


def fused_monarch_mixer_core(projected, layer_input, short_conv_weight, short_conv_bias, long_conv_spectrum,
                             long_conv_d, residual_conv_spectrum, residual_conv_d, fft_size, keep=None, *,
                             extension=None, log2_p: int = 0) -> torch.Tensor:
    """`model.ops.monarch_mixer_core` through the fused kernels, differentiable in every input but `keep`.

    `extension` defaults to the CUDA build; the tests pass the host emulation build with CPU tensors.
    `log2_p` fixes the convolution's sub-problem size 2^log2_p (0: the largest that fits the device).
    """
    extension = cuda_extension() if extension is None else extension
    batch, channels, length = projected.shape
    hidden = channels // 3
    n = transform_size(length)
    residual = residual_conv_spectrum is not None
    if keep is not None:
        keep = keep.reshape(batch, length).detach().float().contiguous()
    return _MixerCoreFunction.apply(
        extension,
        log2_p,
        projected,
        layer_input if residual else None,
        short_conv_weight.reshape(3 * hidden, 3).float().contiguous(),
        short_conv_bias.float().contiguous(),
        _kernel_spectrum(long_conv_spectrum, fft_size, length, n),
        long_conv_d.float().contiguous(),
        _kernel_spectrum(residual_conv_spectrum, fft_size, length, n) if residual else None,
        residual_conv_d.float().contiguous() if residual else None,
        keep,
        twiddles(n, projected.device),
    )


class _GeluGateFunction(torch.autograd.Function):
    """GELU(gate) * value through the extension's gelu_gate_forward / gelu_gate_backward."""

    @staticmethod
    def forward(ctx, extension, gate_value):
        ctx.extension = extension
        ctx.save_for_backward(gate_value)
        return extension.gelu_gate_forward(gate_value)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hidden):
        (gate_value,) = ctx.saved_tensors
        return None, ctx.extension.gelu_gate_backward(gate_value, grad_hidden.contiguous())


def torch_block_diagonal_glu(a: torch.Tensor, gate_value_weight: torch.Tensor, out_weight: torch.Tensor,
                             out_bias: torch.Tensor | None) -> torch.Tensor:
    """The reference: out(GELU(gate) * value) with [gate, value] = gate_value(a), both block-diagonal."""
    gate, value = block_diagonal_linear(a, gate_value_weight).chunk(2, dim=-1)
    return block_diagonal_linear(torch.nn.functional.gelu(gate) * value, out_weight, out_bias)


def fused_block_diagonal_glu(a: torch.Tensor, gate_value_weight: torch.Tensor, out_weight: torch.Tensor,
                             out_bias: torch.Tensor | None, *, extension=None) -> torch.Tensor:
    """`torch_block_diagonal_glu` as two batched GEMMs over strided views of the block layout with the
    fused GELU gate between them, so that the wide (…, 2I) and (…, I) tensors are each written and read
    once instead of being permuted into and out of the GEMMs' layout."""
    extension = cuda_extension() if extension is None else extension
    nblocks, _, in_per_block = gate_value_weight.shape
    rows = a.shape[:-1].numel()
    x = a.reshape(rows, nblocks, in_per_block).transpose(0, 1)  # (n, R, H/n), a view
    gate_value = torch.bmm(x, gate_value_weight.transpose(1, 2))  # (n, R, 2I/n)
    hidden = _GeluGateFunction.apply(extension, gate_value)  # (n, R, I/n)
    out_t = out_weight.transpose(1, 2)  # (n, I/n, H/n)
    if out_bias is None:
        out = torch.bmm(hidden, out_t)
    else:
        out = torch.baddbmm(out_bias.view(nblocks, 1, -1), hidden, out_t)  # (n, R, H/n)
    return out.transpose(0, 1).reshape(*a.shape[:-1], -1)


def _glu_unsupported_reason(a: torch.Tensor, gate_value_weight: torch.Tensor, out_weight: torch.Tensor,
                            out_bias: torch.Tensor | None) -> str | None:
    tensors = [a, gate_value_weight, out_weight] + ([out_bias] if out_bias is not None else [])
    if not all(t.is_cuda for t in tensors):
        return "the tensors are not all on a CUDA device"
    if a.dtype not in SUPPORTED_DTYPES or any(t.dtype != a.dtype for t in tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        return f"GLU tensors of dtypes {dtypes} (the kernels take all float32 or all bfloat16)"
    if gate_value_weight.shape[0] % 2 or gate_value_weight.shape[0] != out_weight.shape[0]:
        return "a block layout the GELU gate does not cover (it needs an even number of blocks)"
    return None


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logger.info("Monarch Mixer kernels not used (%s); using the PyTorch path", reason)


# --- the first-call agreement check --------------------------------------------------------------------
# A GPU, driver or toolkit the kernels were never run on can misbuild or misrun them, and wrong numbers in
# training are silent. So the first call of each kind in a process (entry point, dtype, device, transform
# size and, for the mixer, residual convolution and mask) first runs the kernel path and the PyTorch path
# on a small random input of that kind and compares the output and every gradient, as the GPU tests do. A
# disagreement beyond AGREEMENT_TOLERANCE, or an error raised by the kernels, turns that entry point off for
# the process: `auto` falls back to the PyTorch path with one warning, `cuda` raises KernelsUnavailable.
# Cost: one small forward and backward through each path per kind (a few per process).

AGREEMENT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
"""Largest ||kernel - reference|| / ||reference|| over the output and the gradients that the first-call check
accepts (the GPU tests' tolerances). bfloat16 inputs are compared against the PyTorch path run in float32 on
the same bf16-rounded values: the kernels compute in fp32 and round once."""
AGREEMENT_SEED = 20240207
_agreement: dict[tuple, str | None] = {}  # check key -> None (agreed) or why not
_disabled: dict[str, str] = {}  # entry point -> why its kernels are off for this process


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in double precision; inf when `actual` is not finite."""
    high = torch.complex128 if expected.is_complex() else torch.float64
    actual, expected = actual.to(high), expected.to(high)
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _output_and_grads(function, inputs: list, names: list[str], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"output": function(*inputs), name: d<output, grad_output>/d input} for the tensor inputs named in
    `names` (the differentiable ones, in order; the rest are passed as they are)."""
    leaves = [t.detach().clone().requires_grad_() if i < len(names) and isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    out = function(*leaves)
    out.backward(grad_output.to(out.dtype))
    grads = {name: leaf.grad for name, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)}
    return {"output": out.detach(), **grads}


def _disagreement(kernel_function, reference_function, inputs: list, reference_inputs: list, names: list[str],
                  grad_output: torch.Tensor) -> str | None:
    """None when `kernel_function` agrees with `reference_function` (output and every gradient) within the
    tolerance of the inputs' dtype, else why not."""
    dtype = inputs[0].dtype
    try:
        actual = _output_and_grads(kernel_function, inputs, names, grad_output)
    except Exception as error:  # a launch failure, a configuration this GPU cannot run, ...
        return f"the kernels raised {type(error).__name__}: {error}"
    expected = _output_and_grads(reference_function, reference_inputs, names, grad_output)
    if actual.keys() != expected.keys() or any(actual[k] is None for k in expected):
        return f"the kernels returned gradients for {sorted(actual)}, the PyTorch path for {sorted(expected)}"
    errors = {name: _relative_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    tolerance = AGREEMENT_TOLERANCE[dtype]
    if errors[worst] <= tolerance:
        return None
    what = "output" if worst == "output" else f"gradient of {worst}"
    return (f"on a {str(dtype).removeprefix('torch.')} check input the {what} differs from the PyTorch path's by "
            f"{errors[worst]:.2e} (relative; tolerance {tolerance:.0e})")


def _check_inputs(shapes: list, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor | None]:
    """Random tensors of the given (shape, scale) pairs (None stays None) from a fixed seed, drawn on the CPU
    so that the check consumes none of the caller's random streams."""
    generator = torch.Generator().manual_seed(AGREEMENT_SEED)
    return [None if entry is None else (torch.randn(*entry[0], generator=generator) * entry[1]).to(device, dtype)
            for entry in shapes]


def _upcast(inputs: list) -> list:
    return [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]


MIXER_GRADIENTS = ["projected", "layer_input", "short_conv_weight", "short_conv_bias", "long_conv_spectrum",
                   "long_conv_d", "residual_conv_spectrum", "residual_conv_d"]


def _mixer_agreement(dtype: torch.dtype, device: torch.device, length: int, residual: bool, masked: bool) -> str | None:
    """The first-call check of `monarch_mixer_core`: batch 2, 48 channels (a full 32-channel tile and a
    partial one), channels-last views as the model passes them, and the call's length (so the kernels run
    with the call's transform size), residual convolution and mask."""
    batch, hidden = 2, 48
    n = transform_size(length)
    projected, layer_input, weight, bias, d_skip, residual_d, grad_y = _check_inputs(
        [((batch, length, 3 * hidden), 1.0), ((batch, length, hidden), 1.0), ((3 * hidden, 1, 3), 0.5),
         ((3 * hidden,), 0.1), ((hidden,), 1.0), ((hidden,), 1.0) if residual else None,
         ((batch, hidden, length), 1.0)], dtype, device)
    # Decaying random filters on the circle (forward taps at the head, backward at the tail), as Hyena's are.
    generator = torch.Generator().manual_seed(AGREEMENT_SEED + 1)
    decay = torch.exp(-torch.arange(n) / max(length / 4, 1.0))
    spectra = [torch.fft.rfft(torch.randn(hidden, n, generator=generator) * length ** -0.5 * (decay + decay.flip(0)))
               .to(device) for _ in range(2)]
    keep = None
    if masked:
        keep = torch.ones(batch, 1, length, dtype=dtype, device=device)  # (B, 1, L); the second text ends halfway
        keep[1, :, (length + 1) // 2:] = 0
    inputs = [projected.transpose(1, 2), layer_input.transpose(1, 2), weight, bias, spectra[0], d_skip,
              spectra[1] if residual else None, residual_d, n, keep]
    return _disagreement(fused_monarch_mixer_core, torch_monarch_mixer_core, inputs, _upcast(inputs),
                         MIXER_GRADIENTS, grad_y)


def _glu_agreement(dtype: torch.dtype, device: torch.device, gate_value_shape: tuple, out_shape: tuple,
                   bias: bool) -> str | None:
    """The first-call check of `block_diagonal_glu`: 2 x 37 rows through random weights of the call's shapes."""
    nblocks, _, in_per_block = gate_value_shape
    hidden_out = out_shape[0] * out_shape[1]
    a, gate_value_weight, out_weight, out_bias, grad = _check_inputs(
        [((2, 37, nblocks * in_per_block), 1.0), (gate_value_shape, in_per_block ** -0.5),
         (out_shape, out_shape[2] ** -0.5), ((hidden_out,), 0.1) if bias else None, ((2, 37, hidden_out), 1.0)],
        dtype, device)
    inputs = [a, gate_value_weight, out_weight, out_bias]
    return _disagreement(fused_block_diagonal_glu, torch_block_diagonal_glu, inputs, _upcast(inputs),
                         ["a", "gate_value_weight", "out_weight", "out_bias"], grad)


def _run_check(check) -> str | None:
    """check() isolated from the caller's context: gradients on whatever the caller's mode (no_grad,
    inference_mode), no autocast, and plain saved tensors even inside activation checkpointing (whose
    saved-tensor hooks would otherwise try to recompute the caller's layer for the check's backward)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return check()


def _agreement_failure(entry: str, key: tuple, check) -> str | None:
    """None when entry point `entry` has passed (or now passes) its first-call check for `key`, else why its
    kernels are off for this process. Warns once per entry point."""
    if entry in _disabled:
        return _disabled[entry]
    if (entry, *key) not in _agreement:
        failure = _run_check(check)
        _agreement[(entry, *key)] = failure
        if failure is not None:
            _disabled[entry] = f"{entry} failed its first-call check: {failure}"
            logger.warning("Monarch Mixer kernels (%s) failed their first-call check on %s and are off for this "
                           "process: %s. Please report it with this GPU, driver and build (docs/kernels.md).",
                           entry, _device_name(key[1]), failure)
        else:
            logger.info("Monarch Mixer kernels (%s) in use for %s: they agree with the PyTorch path on a check input",
                        entry, ", ".join(map(str, key)))
    return _disabled.get(entry)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return str(device)


def _use_kernels(mode: str, reason: str | None, entry: str, key: tuple, check) -> bool:
    """Whether to take the kernel path of `entry` in `mode` (`auto` or `cuda`) given why the input does not
    suit it (None: it does) and, once the extension is there, the first-call check `check` for `key`."""
    if reason is None:
        try:
            cuda_extension()
        except KernelsUnavailable as error:
            reason = str(error)
    if reason is None:
        reason = _agreement_failure(entry, key, check)
    if reason is None:
        return True
    if mode == "cuda":
        raise KernelsUnavailable(f"kernel_implementation (or {MODE_VARIABLE}) is cuda but the kernels cannot run: "
                                 f"{reason}")
    _log_fallback_once(reason)
    return False


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
    *,
    implementation: str = "auto",
    cpu_path: bool | None = None,
) -> torch.Tensor:
    """The sequence mixer between its projections (see `model.ops.monarch_mixer_core` for the contract),
    through the fused kernels, the CPU path or the PyTorch reference as `implementation` (a
    `kernel_implementation`, which `M2_KERNELS` overrides) and the input allow. `cpu_path` is a forward
    pass's own decision about the CPU path (`ForwardPlan.cpu_inference`); None decides from the input."""
    args = (projected, layer_input, short_conv_weight, short_conv_bias, long_conv_spectrum, long_conv_d,
            residual_conv_spectrum, residual_conv_d, fft_size, keep)
    if uses_cpu_path(implementation, projected) if cpu_path is None else cpu_path:
        return cpu_ops.monarch_mixer_core(*args)
    mode = resolve_mode(implementation)
    if mode != "torch":
        length = projected.shape[-1]
        residual, masked = residual_conv_spectrum is not None, keep is not None
        key = (projected.dtype, projected.device, transform_size(length), residual, masked)
        (kernel_layer_input,) = _in_autocast_dtype((layer_input,), projected)
        reason = _unsupported_reason(projected, kernel_layer_input, long_conv_spectrum, residual_conv_spectrum, keep)
        if _use_kernels(mode, reason, "monarch_mixer_core", key,
                        lambda: _mixer_agreement(projected.dtype, projected.device, length, residual, masked)):
            return fused_monarch_mixer_core(projected, kernel_layer_input, *args[2:])
    return torch_monarch_mixer_core(*args)


def block_diagonal_glu(a: torch.Tensor, gate_value_weight: torch.Tensor, out_weight: torch.Tensor,
                       out_bias: torch.Tensor | None, *, implementation: str = "auto",
                       cpu_path: bool | None = None) -> torch.Tensor:
    """The GLU MLP before its dropout and LayerNorm: out(GELU(gate) * value), [gate, value] = gate_value(a).

    a: (..., H); gate_value_weight: (n, 2I/n, H/n) and out_weight: (n, H/n, I/n), block-diagonal as in
    `model.ops.block_diagonal_linear`; out_bias: (H,) or None. Through the GEMM-layout path with the fused
    GELU gate, the CPU path or the PyTorch reference, as `implementation` (which `M2_KERNELS` overrides) and
    the input allow; `cpu_path` as in `monarch_mixer_core`.
    """
    if uses_cpu_path(implementation, a) if cpu_path is None else cpu_path:
        return cpu_ops.block_diagonal_glu(a, gate_value_weight, out_weight, out_bias)
    mode = resolve_mode(implementation)
    if mode != "torch":
        bias = out_bias is not None
        key = (a.dtype, a.device, tuple(gate_value_weight.shape), tuple(out_weight.shape), bias)
        weights = _in_autocast_dtype((gate_value_weight, out_weight, out_bias), a)
        reason = _glu_unsupported_reason(a, *weights)
        if _use_kernels(mode, reason, "block_diagonal_glu", key,
                        lambda: _glu_agreement(a.dtype, a.device, key[2], key[3], bias)):
            return fused_block_diagonal_glu(a, *weights)
    return torch_block_diagonal_glu(a, gate_value_weight, out_weight, out_bias)
