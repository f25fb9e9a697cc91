"""Monarch Mixer kernels, CPU side: path selection, the kernels' own code run by the host emulation
against the PyTorch reference, and the CUDA sources building with nvcc. The GPU runs are in
test_kernels_cuda.py, which reuses the helpers at the top of this file."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import M2BertConfig, M2BertModel, kernels
from model.ops import fast_fft_size, monarch_mixer_core

REPO = Path(__file__).resolve().parents[1]
GRAD_NAMES = ("projected", "layer_input", "short_conv_weight", "short_conv_bias", "long_conv_spectrum",
              "long_conv_d", "residual_conv_spectrum", "residual_conv_d")


# --- helpers shared with test_kernels_cuda.py ----------------------------------------------------------

def mixer_case(batch: int, hidden: int, length: int, dtype: torch.dtype, padding_mode: str, residual: bool = True,
               channels_last: bool = True, device: str = "cpu", seed: int = 0) -> list:
    """Random arguments of `monarch_mixer_core` shaped as the model passes them: channels-last views of
    the projections, the model's FFT size for the padding mode, a keep mask of random text lengths."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    fft_size = 2 * length if padding_mode == "reference" else fast_fft_size(2 * length)
    if channels_last:
        projected = randn(batch, length, 3 * hidden).to(dtype).transpose(1, 2)
        layer_input = randn(batch, length, hidden).to(dtype).transpose(1, 2)
    else:
        projected = randn(batch, 3 * hidden, length).to(dtype)
        layer_input = randn(batch, hidden, length).to(dtype)
    weight = randn(3 * hidden, 1, 3, scale=0.5).to(dtype)
    bias = randn(3 * hidden, scale=0.1).to(dtype)
    # A decaying random kernel on the circle, as the Hyena filters are: forward taps at the head,
    # backward taps at the tail.
    decay = torch.exp(-torch.arange(fft_size, dtype=torch.float32) / max(length / 4, 1)).to(device)

    def spectrum():
        taps = randn(hidden, fft_size, scale=length ** -0.5) * (decay + decay.flip(0))
        return torch.fft.rfft(taps, n=fft_size)

    keep = None
    if padding_mode == "masked":
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        lengths[0] = length
        keep = (torch.arange(length)[None] < lengths[:, None]).to(dtype)[:, None, :].to(device)
    return [projected, layer_input, weight, bias, spectrum(), randn(hidden).to(dtype),
            spectrum() if residual else None, randn(hidden).to(dtype) if residual else None, fft_size, keep]


def run_with_grads(core, case: list, grad_y: torch.Tensor) -> tuple[torch.Tensor, list]:
    """core(*case) and the gradients of <y, grad_y> for the differentiable arguments (None where absent)."""
    leaves = [arg.detach().clone().requires_grad_() if isinstance(arg, torch.Tensor) else arg for arg in case[:8]]
    y = core(*leaves, *case[8:])
    y.backward(grad_y)
    return y.detach(), [leaf.grad if isinstance(leaf, torch.Tensor) else None for leaf in leaves]


def upcast(case: list) -> list:
    """The same case in float32 (complex64 spectra stay), to compute a reference for bfloat16 inputs."""
    return [arg.float() if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in case]


def glu_case(rows_shape: tuple, hidden: int, intermediate: int, nblocks: int, dtype: torch.dtype, bias: bool = True,
             device: str = "cpu", seed: int = 0) -> list:
    """Random arguments of `block_diagonal_glu` with the model's block layout."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    return [randn(*rows_shape, hidden), randn(nblocks, 2 * intermediate // nblocks, hidden // nblocks, scale=0.2),
            randn(nblocks, hidden // nblocks, intermediate // nblocks, scale=0.2), randn(hidden) if bias else None]


def assert_glu_matches(glu, case: list, tolerance: float, reference_case: list | None = None) -> None:
    """Output and gradients of `glu` against `kernels.torch_block_diagonal_glu`, within `tolerance`."""
    reference_case = case if reference_case is None else reference_case
    grad = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(1)).to(case[0])

    def run(function, arguments):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in arguments]
        out = function(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves if leaf is not None]

    names = ["out", "a", "gate_value_weight", "out_weight", "out_bias"]
    errors = {name: relative_error(x, y) for name, x, y in
              zip(names, run(glu, case), run(kernels.torch_block_diagonal_glu, reference_case))}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.2e} > {tolerance:.0e}; all: {errors}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN anywhere gives inf."""
    actual = actual.to(torch.complex128 if actual.is_complex() else torch.float64)
    expected = expected.to(actual.dtype)
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_matches(core, case: list, tolerance: float, reference_case: list | None = None, seed: int = 1) -> None:
    """Forward output and every gradient of `core` against the PyTorch reference, within `tolerance`."""
    batch, _, length = case[0].shape
    hidden = case[1].shape[1]
    grad_y = torch.randn(batch, hidden, length, generator=torch.Generator().manual_seed(seed)).to(case[0])
    y, grads = run_with_grads(core, case, grad_y)
    reference_case = case if reference_case is None else reference_case
    y_ref, grads_ref = run_with_grads(monarch_mixer_core, reference_case, grad_y.to(reference_case[0].dtype))
    errors = {"y": relative_error(y, y_ref)}
    for name, grad, grad_ref in zip(GRAD_NAMES, grads, grads_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert grad.dtype == grad_ref.dtype or reference_case is not case, name
            errors[name] = relative_error(grad, grad_ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{worst}: relative error {errors[worst]:.2e} > {tolerance:.0e}; all: {errors}"


# --- path selection --------------------------------------------------------------------------------------

@pytest.fixture
def fresh_override(monkeypatch):
    """`M2_KERNELS` unset and read afresh by the next call (it is read once per process)."""
    monkeypatch.delenv(kernels.MODE_VARIABLE, raising=False)
    kernels.environment_override.cache_clear()
    yield monkeypatch
    kernels.environment_override.cache_clear()


def test_auto_mode_uses_the_reference_for_cpu_tensors_without_loading_the_extension(fresh_override):
    case = mixer_case(2, 8, 50, torch.float32, "masked")
    assert torch.equal(kernels.monarch_mixer_core(*case, implementation="auto"), monarch_mixer_core(*case))
    assert kernels._cuda_extension == []  # never even tried to load or build


def test_torch_mode_is_the_reference(fresh_override):
    case = mixer_case(1, 8, 40, torch.float32, "reference")
    assert torch.equal(kernels.monarch_mixer_core(*case, implementation="torch"), monarch_mixer_core(*case))


def test_cuda_mode_says_why_the_kernels_cannot_run(fresh_override):
    with pytest.raises(kernels.KernelsUnavailable, match="is cuda but the kernels cannot run: .*not all on a CUDA device"):
        kernels.monarch_mixer_core(*mixer_case(1, 8, 40, torch.float32, "reference"), implementation="cuda")


def test_the_model_config_chooses_the_path_and_exports_do_not_store_it(fresh_override, tmp_path):
    config = M2BertConfig.from_preset("m2-bert-tiny", kernel_implementation="cuda")
    model = M2BertModel(config).eval()
    input_ids = torch.randint(1000, 2000, (1, 40))
    with pytest.raises(kernels.KernelsUnavailable, match="is cuda"):
        model(input_ids)
    model.config.kernel_implementation = "torch"
    model(input_ids)
    model.save_pretrained(tmp_path / "export")
    assert "kernel_implementation" not in (tmp_path / "export" / "config.json").read_text()
    assert M2BertModel.from_pretrained(tmp_path / "export").config.kernel_implementation == "auto"
    with pytest.raises(ValueError, match="kernel_implementation='fast'"):
        M2BertConfig.from_preset("m2-bert-tiny", kernel_implementation="fast")


def test_the_environment_overrides_every_model_and_is_read_once(fresh_override):
    fresh_override.setenv(kernels.MODE_VARIABLE, "cuda")
    model = M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", kernel_implementation="torch")).eval()
    with pytest.raises(kernels.KernelsUnavailable, match="M2_KERNELS"):
        model(torch.randint(1000, 2000, (1, 40)))
    fresh_override.setenv(kernels.MODE_VARIABLE, "torch")  # not read again: the process keeps its first reading
    assert kernels.resolve_mode("auto") == "cuda"


def test_unknown_mode_is_rejected(fresh_override):
    fresh_override.setenv(kernels.MODE_VARIABLE, "fast")
    with pytest.raises(ValueError, match="M2_KERNELS='fast'"):
        kernels.monarch_mixer_core(*mixer_case(1, 8, 40, torch.float32, "reference"))


def test_importing_and_running_the_model_compiles_nothing(tmp_path):
    extensions_dir = tmp_path / "torch_extensions"
    script = (
        "import sys, torch\n"
        "from model import M2BertConfig, M2BertModel\n"
        "model = M2BertModel(M2BertConfig.from_preset('m2-bert-tiny')).eval()\n"
        "with torch.no_grad():\n"
        "    model(torch.randint(1000, 2000, (2, 40)), torch.ones(2, 40, dtype=torch.long))\n"
        "print('cpp_extension imported:', 'torch.utils.cpp_extension' in sys.modules)\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), M2_KERNELS="auto")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cpp_extension imported: False" in result.stdout
    assert not extensions_dir.exists()


def test_transform_size_is_twice_the_next_power_of_two():
    assert [kernels.transform_size(n) for n in (1, 64, 65, 100, 128, 1000, 2048, 32768)] == \
        [128, 128, 256, 256, 256, 2048, 4096, 65536]


def test_resampled_spectrum_gives_the_same_convolution_and_gradient():
    length, fft_size = 100, fast_fft_size(200)  # 200 points, not a power of two
    n = kernels.transform_size(length)
    x = torch.randn(2, 3, length, dtype=torch.float64)
    spectrum = torch.fft.rfft(torch.randn(3, fft_size, dtype=torch.float64), n=fft_size).requires_grad_()
    grad_y = torch.randn(2, 3, length, dtype=torch.float64)

    def conv(spec, size):
        return torch.fft.irfft(torch.fft.rfft(x, n=size) * spec, n=size)[..., :length]

    y = conv(spectrum, fft_size)
    (grad,) = torch.autograd.grad(y, spectrum, grad_y)
    y_resampled = conv(kernels.resample_spectrum(spectrum, fft_size, length, n), n)
    (grad_resampled,) = torch.autograd.grad(y_resampled, spectrum, grad_y)
    assert relative_error(y_resampled, y) < 1e-12
    assert relative_error(grad_resampled, grad) < 1e-12


# --- the kernels' code, run by the host emulation -----------------------------------------------------------

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The extension built for the CPU: binding.cpp with host_emulation.cpp running the kernel bodies."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the host emulation")
    extension = kernels.build_extension(host_emulation=True, build_directory=tmp_path_factory.mktemp("emulated"))
    assert extension.host_emulation
    yield extension
    extension.set_thread_order(0)


@pytest.mark.parametrize("batch, channels, length, log2_p", [
    (2, 3, 64, 4),     # smallest transform (n = 128), 8 sub-problems of 16 points
    (1, 2, 100, 7),    # n = 256: two sub-problems, the cyclic and the negacyclic half
    (2, 2, 300, 6),    # n = 1024: 16 sub-problems; length not a power of two
    (1, 1, 2048, 9),   # n = 4096
    (1, 2, 32768, 0),  # the longest rows, n = 65536, with the sub-problem size the kernels choose on an H100
])
def test_emulated_long_convolution_matches_a_float64_fft(emulated, batch, channels, length, log2_p):
    n = kernels.transform_size(length)
    x = torch.randn(batch, channels, length)
    spectrum = torch.fft.rfft(torch.randn(channels, n) * n ** -0.5, n=n)
    grad_y = torch.randn(batch, channels, length)
    x64 = x.double().requires_grad_()
    spectrum64 = spectrum.to(torch.complex128).requires_grad_()
    y64 = torch.fft.irfft(torch.fft.rfft(x64, n=n) * spectrum64, n=n)[..., :length]
    y64.backward(grad_y.double())

    table = kernels.twiddles(n, "cpu")
    y = emulated.conv_forward(x, spectrum, table, log2_p)
    grad_x, grad_spectrum = emulated.conv_backward(x, grad_y, spectrum, table, log2_p)
    assert relative_error(y, y64) < 1e-5
    assert relative_error(grad_x, x64.grad) < 1e-5
    assert relative_error(grad_spectrum, spectrum64.grad) < 1e-5


@pytest.mark.parametrize("batch, hidden, length, padding_mode, residual, channels_last", [
    (2, 40, 128, "reference", True, True),   # spectrum used as given (n = 2L)
    (2, 33, 100, "masked", True, True),      # resampled spectrum; hidden and length off the 32-tiles
    (1, 8, 70, "masked", False, False),      # no residual convolution; channels-first inputs
    (1, 3, 2100, "reference", True, True),   # several chunks per row; n = 8192
])
def test_emulated_mixer_core_matches_the_reference_in_float32(emulated, batch, hidden, length, padding_mode,
                                                              residual, channels_last):
    case = mixer_case(batch, hidden, length, torch.float32, padding_mode, residual, channels_last)
    assert_matches(lambda *a: kernels.fused_monarch_mixer_core(*a, extension=emulated), case, tolerance=1e-5)


def test_emulated_mixer_core_in_bfloat16_is_as_close_as_bfloat16_allows(emulated):
    case = mixer_case(2, 16, 200, torch.bfloat16, "masked")
    # Against the float32 reference on the same (bf16-rounded) inputs: the kernels compute in fp32 and
    # round once at the output, so the error is about bfloat16's resolution (2^-8).
    assert_matches(lambda *a: kernels.fused_monarch_mixer_core(*a, extension=emulated), case, tolerance=1e-2,
                   reference_case=upcast(case))


@pytest.mark.parametrize("order", [1, 2], ids=["reverse", "shuffled"])
def test_emulated_kernels_do_not_depend_on_thread_order(emulated, order):
    emulated.set_thread_order(order)
    try:
        case = mixer_case(2, 12, 150, torch.float32, "masked", seed=order)
        assert_matches(lambda *a: kernels.fused_monarch_mixer_core(*a, extension=emulated, log2_p=5), case,
                       tolerance=1e-5)
    finally:
        emulated.set_thread_order(0)


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)])
def test_emulated_glu_matches_the_reference(emulated, dtype, bias):
    case = glu_case((2, 37), 64, 128, 4, dtype, bias)
    glu = lambda *a: kernels.fused_block_diagonal_glu(*a, extension=emulated)  # noqa: E731
    if dtype == torch.float32:
        assert_glu_matches(glu, case, tolerance=1e-5)
    else:
        assert_glu_matches(glu, case, tolerance=1e-2, reference_case=upcast(case))


def test_emulated_model_matches_the_pytorch_path(emulated, monkeypatch):
    torch.manual_seed(0)
    model = M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0)).eval()
    input_ids = torch.randint(1000, 2000, (2, 90))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 60:] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask).last_hidden_state
        monkeypatch.setattr(kernels, "monarch_mixer_core",
                            lambda *a, **options: kernels.fused_monarch_mixer_core(*a, extension=emulated))
        actual = model(input_ids, attention_mask).last_hidden_state
    assert relative_error(actual, expected) < 1e-5


# --- the first-call check, with the emulated kernels standing in for a GPU build --------------------------

class WrongExtension:
    """The emulated extension with one of its functions made wrong (scaled by `factor`), as a miscompiled
    or misrunning build would be; counts the launches of each function (`calls`)."""

    def __init__(self, extension, wrong: str | None = None, factor: float = 1.05):
        self.extension, self.wrong, self.factor = extension, wrong, factor
        self.calls = collections.Counter()

    @property
    def mixer_forwards(self) -> int:
        return self.calls["mixer_forward"]

    def __getattr__(self, name):
        function = getattr(self.extension, name)

        def counted(*args):
            self.calls[name] += 1
            return self._maybe_wrong(name, function(*args))
        return counted

    def _maybe_wrong(self, name, result):
        if name != self.wrong:
            return result
        first, *rest = result if isinstance(result, (tuple, list)) else (result,)
        first = first * self.factor
        return (first, *rest) if rest else first


@pytest.fixture
def kernels_on_cpu(emulated, fresh_override, monkeypatch):
    """Dispatch as on a GPU, with CPU tensors and the extension the test installs (`install(wrong=...)`);
    the first-call check's memory starts empty."""
    monkeypatch.setattr(kernels, "_unsupported_reason", lambda *args: None)
    monkeypatch.setattr(kernels, "_glu_unsupported_reason", lambda *args: None)
    monkeypatch.setattr(kernels, "_cpu_unsupported_reason", lambda *args: "tensors taken as CUDA ones by the test")
    monkeypatch.setattr(kernels, "_agreement", {})
    monkeypatch.setattr(kernels, "_disabled", {})
    kernels._log_fallback_once.cache_clear()

    def install(wrong: str | None = None) -> WrongExtension:
        extension = WrongExtension(emulated, wrong)
        monkeypatch.setattr(kernels, "cuda_extension", lambda: extension)
        return extension

    yield install
    kernels._log_fallback_once.cache_clear()


def guard_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "first-call check" in r.getMessage()]


def test_first_call_check_passes_for_good_kernels_and_runs_once_per_kind(kernels_on_cpu, caplog):
    extension = kernels_on_cpu()
    case = mixer_case(2, 16, 100, torch.float32, "masked")
    with torch.no_grad():
        first = kernels.monarch_mixer_core(*case)
        assert extension.mixer_forwards == 2  # the check's kernel run, then the call itself
        assert torch.equal(kernels.monarch_mixer_core(*case), first)
        assert extension.mixer_forwards == 3  # checked once for this kind
        assert torch.equal(first, kernels.fused_monarch_mixer_core(*case, extension=extension))  # the kernel path
        kernels.monarch_mixer_core(*mixer_case(1, 16, 1000, torch.float32, "masked"))  # another transform size
    assert extension.mixer_forwards == 4 + 2
    assert not guard_warnings(caplog)


def test_under_autocast_the_kernels_take_the_bfloat16_projections(kernels_on_cpu):
    """Autocast (`training.precision=amp_bf16`) makes the projections bf16 while the layer input and the GLU
    weights stay fp32: the dispatch joins them to bf16, so the kernel path runs (and agrees with PyTorch's)."""
    extension = kernels_on_cpu()
    torch.manual_seed(0)
    model = M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0)).train()
    input_ids = torch.randint(1000, 2000, (2, 90))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 60:] = 0

    def hidden(implementation):
        model.config.kernel_implementation = implementation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids, attention_mask).last_hidden_state.float()

    reference = hidden("torch")
    assert not extension.calls
    actual = hidden("auto")
    assert extension.calls["mixer_forward"] > 0 and extension.calls["gelu_gate_forward"] > 0
    assert relative_error(actual, reference) < 2e-2


@pytest.mark.parametrize("wrong, what", [("mixer_forward", "output"), ("mixer_backward", "gradient of projected")])
def test_wrong_mixer_kernels_fall_back_in_auto_mode_with_one_warning(kernels_on_cpu, caplog, wrong, what):
    kernels_on_cpu(wrong=wrong)
    case = mixer_case(2, 16, 100, torch.float32, "masked")
    reference = monarch_mixer_core(*case)
    assert torch.equal(kernels.monarch_mixer_core(*case, implementation="auto"), reference)
    (warning,) = guard_warnings(caplog)
    assert f"the {what} differs from the PyTorch path's" in warning and "monarch_mixer_core" in warning
    # Off for the whole process: other kinds take the PyTorch path without checking or warning again.
    other = mixer_case(1, 16, 300, torch.float32, "reference")
    assert torch.equal(kernels.monarch_mixer_core(*other), monarch_mixer_core(*other))
    assert len(guard_warnings(caplog)) == 1


def test_wrong_kernels_raise_in_cuda_mode(kernels_on_cpu):
    kernels_on_cpu(wrong="mixer_forward")
    with pytest.raises(kernels.KernelsUnavailable, match="is cuda but .*first-call check: on a float32 check input"):
        kernels.monarch_mixer_core(*mixer_case(1, 16, 100, torch.float32, "masked"), implementation="cuda")


def test_the_bfloat16_check_accepts_the_kernels_and_rejects_a_one_percent_error(kernels_on_cpu, caplog):
    kernels_on_cpu()
    case = mixer_case(2, 16, 200, torch.bfloat16, "masked")
    assert not torch.equal(kernels.monarch_mixer_core(*case), monarch_mixer_core(*case))  # kernel path
    assert not guard_warnings(caplog)
    extension = kernels_on_cpu(wrong="mixer_forward")
    extension.factor = 1.02  # twice the bf16 tolerance
    kernels._agreement.clear()
    assert torch.equal(kernels.monarch_mixer_core(*case), monarch_mixer_core(*case))
    assert "bfloat16 check input" in guard_warnings(caplog)[0]


def test_wrong_glu_kernel_falls_back_and_leaves_the_mixer_on(kernels_on_cpu, caplog):
    extension = kernels_on_cpu(wrong="gelu_gate_backward")
    case = glu_case((2, 37), 64, 128, 4, torch.float32)
    assert torch.equal(kernels.block_diagonal_glu(*case), kernels.torch_block_diagonal_glu(*case))
    (warning,) = guard_warnings(caplog)
    assert "block_diagonal_glu" in warning and "gradient of a " in warning
    kernels.monarch_mixer_core(*mixer_case(1, 16, 100, torch.float32, "masked"))
    assert extension.mixer_forwards == 2  # the mixer was checked and used


def test_first_call_check_inside_activation_checkpointing_and_inference_mode(kernels_on_cpu, caplog):
    """The check runs its own backward wherever the first call happens: inside a checkpointed layer during
    training (whose saved-tensor hooks must not apply to it) or under inference_mode."""
    extension = kernels_on_cpu()
    torch.manual_seed(0)
    model = M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0))
    model.gradient_checkpointing_enable()
    input_ids = torch.randint(1000, 2000, (2, 70))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 50:] = 0
    model.train()

    def gradients(implementation):
        model.config.kernel_implementation = implementation
        model.zero_grad()
        model(input_ids, attention_mask).pooler_output.sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    through_kernels = gradients("auto")
    assert extension.mixer_forwards == 1 + 2 + 2  # the check, 2 layers, 2 layers recomputed in backward
    reference = gradients("torch")
    assert through_kernels.keys() == reference.keys()
    assert max(relative_error(through_kernels[k], reference[k]) for k in reference) < 1e-4
    kernels._agreement.clear()
    model.eval()
    with torch.inference_mode():
        model(input_ids, attention_mask)
    assert not guard_warnings(caplog)


# --- the CUDA build ----------------------------------------------------------------------------------------

def cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and the runtime library, or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists() and any(Path(home).glob("lib*/libcudart.so*")):
            return home
    return None


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is not a CUDA build")
@pytest.mark.skipif(cuda_home() is None, reason="no CUDA toolkit (nvcc and libcudart) found")
def test_cuda_extension_builds_with_nvcc_for_sm80_and_sm90(tmp_path):
    """Compiles binding.cpp and kernels.cu for sm_80 and sm_90 and links the extension; imports it but
    runs nothing, so it needs no GPU."""
    script = (
        "import sys\n"
        "from model.kernels import build_extension\n"
        "extension = build_extension(build_directory=sys.argv[1])\n"
        "print('built', extension.__name__, 'emulated' if extension.host_emulation else 'cuda')\n"
    )
    env = dict(os.environ, CUDA_HOME=cuda_home(), TORCH_CUDA_ARCH_LIST="8.0;9.0")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "build")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "built m2_mixer_kernels cuda" in result.stdout
    ninja = (tmp_path / "build" / "build.ninja").read_text()
    assert "code=sm_80" in ninja and "code=sm_90" in ninja
