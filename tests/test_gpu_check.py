"""bench/gpu_check.py's own logic, which must be right before a GPU is lent: which carried wheels install
on the GPU machine's Python, what a carry folder lacks, and the reading of ptxas's resource report. (Its
stages run end to end with `python bench/gpu_check.py run --dry-run`.)"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package
from bench.gpu_check import (CARRIED, carried_version, check_carry, fits_device_python, parse_ptxas,  # noqa: E402
                             wheel_name_version)


def test_wheel_tags_are_matched_against_cpython_3_12_on_x86_64_manylinux(tmp_path):
    def fits(filename):
        return fits_device_python(wheel_name_version(tmp_path / filename)[2])

    assert fits("pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert fits("cramjam-2.14.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    assert fits("hjson-3.1.0-py3-none-any.whl")
    assert fits("somepkg-1.0-cp39-abi3-manylinux_2_17_x86_64.whl")
    assert not fits("zstd-1.5.7.2-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert not fits("pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_aarch64.whl")
    assert not fits("brotli-1.2.1-cp312-cp312-macosx_11_0_arm64.whl")


def test_check_carry_names_what_is_missing_duplicated_or_unusable(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for item in CARRIED:
        if item.name not in ("zstd", "hjson"):
            (wheels / f"{item.name.replace('-', '_')}-{carried_version(item)}-py3-none-any.whl").touch()
    (wheels / "zstd-1.5.6.1-cp311-cp311-manylinux_2_17_x86_64.whl").touch()  # the wrong Python
    (wheels / "catalogue-2.0.9-py3-none-any.whl").touch()  # a second catalogue
    (wheels / "requests-2.0-py3-none-any.whl").touch()  # not carried
    problems = "\n".join(check_carry(tmp_path))
    assert "no wheel of hjson" in problems
    assert "zstd-1.5.6.1-cp311-cp311-manylinux_2_17_x86_64.whl: no tag installs on CPython 3.12" in problems
    assert "2 wheels of catalogue" in problems
    assert "requests-2.0-py3-none-any.whl: not in the carry list" in problems
    assert "no mixture manifest" in problems
    assert "pydantic" not in problems


PTXAS = """\
ptxas info    : Compiling entry function '_ZN2m243_GLOBAL__N__430b1eee_10_kernels_cu_803364c021mixer_prologue_kernelINS_8BFloat16EEEvNS_9MixerArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN2m243_GLOBAL__N__430b1eee_10_kernels_cu_803364c021mixer_prologue_kernelINS_8BFloat16EEEvNS_9MixerArgsE
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN2m243_GLOBAL__N__430b1eee_10_kernels_cu_803364c023fft_conv_forward_kernelIfEEvNS_7ConvArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN2m243_GLOBAL__N__430b1eee_10_kernels_cu_803364c023fft_conv_forward_kernelIfEEvNS_7ConvArgsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers
"""


def test_ptxas_report_is_read_per_kernel():
    assert parse_ptxas(PTXAS) == [
        {"kernel": "mixer_prologue_kernel", "dtype": "bf16", "arch": "sm_90", "stack_bytes": 8, "spill_stores": 4,
         "spill_loads": 4, "registers": 64, "static_smem_bytes": 2048},
        {"kernel": "fft_conv_forward_kernel", "dtype": "fp32", "arch": "sm_90", "stack_bytes": 0, "spill_stores": 0,
         "spill_loads": 0, "registers": 96, "static_smem_bytes": 0},
    ]
