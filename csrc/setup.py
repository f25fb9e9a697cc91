"""Ahead-of-time build of the Monarch Mixer kernels as the module `m2_mixer_kernels`.

    TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install --no-build-isolation ./csrc

`model.kernels` imports this module when it is installed and otherwise compiles the same sources on first
use (see docs/kernels.md). `--no-build-isolation` builds against the torch already installed, which the
extension must match.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = Path(__file__).resolve().parent

setup(
    name="m2-mixer-kernels",
    version="0.1.0",
    description="Fused CUDA kernels of the M2-BERT sequence mixer (m2-loco)",
    ext_modules=[
        CUDAExtension(
            name="m2_mixer_kernels",
            sources=["binding.cpp", "kernels.cu"],
            include_dirs=[str(here)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
