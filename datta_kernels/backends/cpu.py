"""The ``cpu`` backend: the fused C++ kernels of ``csrc/cpu`` (``datta_kernels._C``), reached
through the kernel ops ``torch.ops.datta._*`` declared in ``csrc/ops.cpp``.

Bytes moved: instance_stats 1 read of x; diversity_angles 1 read; dabn_forward 2 reads + 1
write (1 + 1 when the planes fit in cache); dabn_normalize 1 read + 1 write; dabn_backward
2 reads of x and dy + 1 write of dx (dabn_backward_sums and dabn_backward_apply: its two
passes alone, one read each, the second also one write).  batch_moments_local / _merge,
blend_moments, dabn_backward_batch_terms and dabn_backward_coefficients read only (N, C)
statistics (the synced layer's per-(n, c) math, one C++ loop each:
csrc/cpu/sync_coefs_cpu.cpp).
"""
from __future__ import annotations

import torch

from .. import _ext
from .base import KernelBackend


class CpuBackend(KernelBackend):
    name = "cpu"

    def __init__(self) -> None:
        _ext.require()
        self._ops = torch.ops.datta

    def instance_stats(self, x):
        return self._ops._instance_stats(x)

    def diversity_angles(self, x, source_mean, batch_mean):
        return self._ops._diversity_angles(x, source_mean, batch_mean)

    def dispersion_score(self, mean_i, var_i, source_mean, source_var, m, eps, parts, stat):
        # one C++ loop instead of ~18 tiny torch ops (dispatch-bound on CPU)
        return self._ops._dispersion_score(mean_i, var_i, source_mean, source_var, m, float(eps),
                                           parts, stat)

    def dabn_forward(self, x, weight, bias, source_mean, source_var, blend, shrink_k, eps):
        return self._ops._dabn_forward(x, weight, bias, source_mean, source_var, blend,
                                       shrink_k, eps)

    def dabn_normalize(self, x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                       mean_i, var_i):
        return self._ops._dabn_normalize(x, weight, bias, source_mean, source_var, blend,
                                         shrink_k, eps, mean_i, var_i)

    def dabn_backward(self, dy, x, weight, source_mean, source_var, blend, shrink_k, eps,
                      mean_i, var_i):
        return self._ops._dabn_backward(dy, x, weight, source_mean, source_var, blend, shrink_k,
                                        eps, mean_i, var_i)

    def dabn_backward_sums(self, dy, x, mean_i):
        return self._ops._dabn_backward_sums(dy, x, mean_i)

    def dabn_backward_apply(self, dy, x, mean_i, a, b, c0):
        return self._ops._dabn_backward_apply(dy, x, mean_i, a, b, c0)

    def batch_moments_local(self, mean_i, var_i, m):
        return self._ops._batch_moments_local(mean_i, var_i, m)

    def batch_moments_merge(self, rows, dtype):
        return self._ops._batch_moments_merge(rows, dtype)

    def blend_moments(self, mean_i, var_i, source_mean, source_var, blend, batch, m, shrink_k, eps):
        return self._ops._blend_moments(mean_i, var_i, source_mean, source_var, blend, *batch, m,
                                        shrink_k, float(eps))

    def dabn_backward_batch_terms(self, sdy, sdyxc, weight, source_mean, source_var, blend, batch,
                                  mean_i, var_i, m, shrink_k, eps):
        return self._ops._dabn_backward_batch_terms(sdy, sdyxc, weight, source_mean, source_var,
                                                    blend, *batch, mean_i, var_i, m, shrink_k,
                                                    float(eps))

    def dabn_backward_coefficients(self, sdy, sdyxc, weight, source_mean, source_var, blend, batch,
                                   mean_i, var_i, m, shrink_k, eps, batch_terms):
        return self._ops._dabn_backward_coefficients(sdy, sdyxc, weight, source_mean, source_var,
                                                     blend, *batch, mean_i, var_i, m, shrink_k,
                                                     float(eps), batch_terms)
