"""The ``cuda`` backend: the CUDA kernels of ``csrc/cuda`` (``datta_kernels._C`` built with
CUDA).  They register under the same kernel ops as ``cpu`` (``torch.ops.datta._*``, dispatched
on the tensors' device), so this backend is the CPU one's calls on CUDA tensors; the dispersion
score, a handful of ``(N, C)`` ops, runs as torch ops (the interface's default)."""
from __future__ import annotations

from .base import KernelBackend
from .cpu import CpuBackend


class CudaBackend(CpuBackend):
    name = "cuda"
    dispersion_score = KernelBackend.dispersion_score
