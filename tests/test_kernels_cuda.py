"""Monarch Mixer kernels on a GPU: the CUDA path against the PyTorch path (forward output and every
gradient), the whole model through both paths, and compute-sanitizer on a small case. Skipped without CUDA.

    python -m pytest -m cuda tests/test_kernels_cuda.py

Tolerances, as ||kernel - reference|| / ||reference|| over each output and gradient:
- float32: 1e-4 against the PyTorch path (both compute the FFTs in fp32; typical differences are ~1e-6);
- bfloat16: 1e-2 against the PyTorch path run in float32 on the same bf16-rounded inputs (the kernels
  compute in fp32 and round once), and 3e-2 against the PyTorch path in bfloat16, which rounds to bf16
  after every elementwise step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from model import M2BertConfig, M2BertModel, kernels
from model.ops import monarch_mixer_core
from test_kernels import REPO, assert_glu_matches, assert_matches, glu_case, mixer_case, relative_error, upcast

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [128, 1000, 2048, 8192, 32768]
HIDDEN = 768  # the 80M model's width


@pytest.fixture(scope="module")
def extension():
    return kernels.cuda_extension()


def fused(extension):
    return lambda *args: kernels.fused_monarch_mixer_core(*args, extension=extension)


@pytest.mark.parametrize("padding_mode", ["reference", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("length", LENGTHS)
def test_kernel_path_matches_the_pytorch_path(extension, length, batch, dtype, padding_mode):
    case = mixer_case(batch, HIDDEN, length, dtype, padding_mode, device="cuda", seed=length * 16 + batch)
    if dtype == torch.float32:
        assert_matches(fused(extension), case, tolerance=1e-4)
    else:
        assert_matches(fused(extension), case, tolerance=1e-2, reference_case=upcast(case))
        assert_matches(fused(extension), case, tolerance=3e-2)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [(1, 1000), (8, 8192)])
def test_glu_kernel_path_matches_the_pytorch_path(extension, rows, dtype):
    case = glu_case(rows, HIDDEN, 3072, 4, dtype, device="cuda")
    glu = lambda *a: kernels.fused_block_diagonal_glu(*a, extension=extension)  # noqa: E731
    if dtype == torch.float32:
        # cuBLAS may use TF32 for fp32 GEMMs in either path; both run the same GEMMs, so they agree closely.
        assert_glu_matches(glu, case, tolerance=1e-4)
    else:
        assert_glu_matches(glu, case, tolerance=1e-2, reference_case=upcast(case))
        assert_glu_matches(glu, case, tolerance=3e-2)


@pytest.mark.parametrize("length", [64, 1000, 32768])
def test_long_convolution_matches_a_float64_fft(extension, length):
    n = kernels.transform_size(length)
    x = torch.randn(2, 6, length, device="cuda")
    spectrum = torch.fft.rfft(torch.randn(6, n, device="cuda") * n ** -0.5, n=n)
    grad_y = torch.randn(2, 6, length, device="cuda")
    x64 = x.double().requires_grad_()
    spectrum64 = spectrum.to(torch.complex128).requires_grad_()
    y64 = torch.fft.irfft(torch.fft.rfft(x64, n=n) * spectrum64, n=n)[..., :length]
    y64.backward(grad_y.double())
    table = kernels.twiddles(n, x.device)
    assert relative_error(extension.conv_forward(x, spectrum, table, 0), y64.detach()) < 1e-5
    grad_x, grad_spectrum = extension.conv_backward(x, grad_y, spectrum, table, 0)
    assert relative_error(grad_x, x64.grad) < 1e-5
    assert relative_error(grad_spectrum, spectrum64.grad) < 1e-5


def test_auto_mode_takes_the_kernels_for_cuda_tensors(extension):
    case = mixer_case(2, HIDDEN, 2048, torch.bfloat16, "masked", device="cuda")
    with torch.no_grad():
        dispatched = kernels.monarch_mixer_core(*case)
        assert torch.equal(dispatched, kernels.fused_monarch_mixer_core(*case, extension=extension))  # deterministic
        assert not torch.equal(dispatched, monarch_mixer_core(*case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_first_call_check_accepts_the_kernels_on_this_gpu(extension, dtype):
    """The check every process runs before its first kernel call of a kind must pass where the kernels are
    right (else auto mode would silently fall back to the PyTorch path)."""
    device = torch.device("cuda")
    for length in (128, 1000, 32768):
        for residual, masked in ((True, True), (False, False)):
            assert kernels._mixer_agreement(dtype, device, length, residual, masked) is None
    assert kernels._glu_agreement(dtype, device, (4, 1536, 192), (4, 192, 768), True) is None


@pytest.mark.parametrize("padding_mode", ["reference", "masked"])
def test_whole_model_agrees_between_the_two_paths(extension, padding_mode):
    config = M2BertConfig.from_preset("m2-bert-80M-2k", num_hidden_layers=2, hidden_dropout_prob=0.0,
                                      padding_mode=padding_mode)
    torch.manual_seed(0)
    model = M2BertModel(config).cuda()
    input_ids = torch.randint(1000, 30000, (2, 2048), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 1500:] = 0

    def forward_backward(implementation):
        model.config.kernel_implementation = implementation  # read by every forward pass
        model.zero_grad()
        out = model(input_ids, attention_mask)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.last_hidden_state.detach(), grads

    hidden_torch, grads_torch = forward_backward("torch")
    hidden_cuda, grads_cuda = forward_backward("cuda")
    assert relative_error(hidden_cuda, hidden_torch) < 1e-4
    assert grads_cuda.keys() == grads_torch.keys()
    errors = {name: relative_error(grads_cuda[name], grads_torch[name]) for name in grads_torch}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: {errors[worst]:.2e}"


SANITIZED_CASE = """
import torch
from model import kernels
from test_kernels import mixer_case, run_with_grads
for dtype in (torch.float32, torch.bfloat16):
    for mode, residual in (("masked", True), ("reference", False)):
        case = mixer_case(2, 64, 1000, dtype, mode, residual=residual, device="cuda")
        run_with_grads(kernels.fused_monarch_mixer_core, case, torch.randn(2, 64, 1000, device="cuda").to(dtype))
torch.cuda.synchronize()
print("sanitized case done")
"""


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_finds_nothing_in_a_small_case(extension, tool):
    help_text = subprocess.run(["compute-sanitizer", "--help"], capture_output=True, text=True).stdout
    # Check our kernels only (their names are in namespace m2) when this version can filter.
    only_ours = ["--kernel-name", "kns=m2"] if "--kernel-name" in help_text else []
    command = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", *only_ours,
               sys.executable, "-c", SANITIZED_CASE]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), M2_KERNELS="cuda")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "sanitized case done" in output
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]
