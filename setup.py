"""Builds ``datta_kernels._C``: the fused CPU kernels always, the CUDA kernels when possible.

    pip install --no-build-isolation -e .     # develop (builds in place)
    pip install --no-build-isolation .        # install

CUDA is built when ``torch.version.cuda`` is set, a CUDA toolkit is found (CUDA_HOME) and
``DATTA_NO_CUDA`` is not "1" -- never gated on ``torch.cuda.is_available()``, so GPU-less
build machines still produce GPU wheels.  Architectures: ``TORCH_CUDA_ARCH_LIST``
(default "8.0;9.0").  The vector ISA needs no flag here: csrc/cpu/kernels_{avx2,avx512}.cpp
raise it with a target pragma and csrc/cpu/dispatch.cpp picks one at run time.
The same source globs drive CMakeLists.txt (the libtorch build).
"""
from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_GLOBS = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_GLOBS = ("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100; override with TORCH_CUDA_ARCH_LIST


def sources(patterns: tuple[str, ...]) -> list[str]:
    """Paths relative to this file (setuptools wants relative sources), sorted for stable builds."""
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def cuda_reason() -> str | None:
    """Why CUDA is not built (None: it is)."""
    if os.environ.get("DATTA_NO_CUDA") == "1":
        return "DATTA_NO_CUDA=1"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not sources(CUDA_GLOBS):
        return "no sources in csrc/cuda/"
    return None


def extension():
    # -Wno-psabi: ATen's vector headers warn about AVX argument passing under our target pragmas
    cxx = ["-O3", "-fopenmp", "-DDATTA_PYTHON_MODULE", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    why_not = cuda_reason()
    if why_not is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(f"datta_kernels: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return cpp_extension.CUDAExtension(
            "datta_kernels._C", sources(CPU_GLOBS) + sources(CUDA_GLOBS),
            extra_compile_args={"cxx": cxx + ["-DDATTA_WITH_CUDA"],
                                "nvcc": ["-O3", "-DDATTA_WITH_CUDA"]},
            **kwargs)
    print(f"datta_kernels: building CPU kernels only ({why_not})")
    return cpp_extension.CppExtension("datta_kernels._C", sources(CPU_GLOBS),
                                      extra_compile_args={"cxx": cxx}, **kwargs)


setup(ext_modules=[extension()], cmdclass={"build_ext": cpp_extension.BuildExtension})
