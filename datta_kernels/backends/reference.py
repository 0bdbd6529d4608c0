"""The ``reference`` backend: ``datta_kernels.reference`` (the SPEC as PyTorch) behind the
backend interface.  Runs on every device torch runs on; slow (several passes per op)."""
from __future__ import annotations

from .. import reference as ref
from .base import KernelBackend


class ReferenceBackend(KernelBackend):
    name = "reference"

    def instance_stats(self, x):
        return ref.instance_stats(x)

    def diversity_angles(self, x, source_mean, batch_mean):
        return ref.diversity_angles(x, source_mean, batch_mean)

    def dabn_forward(self, x, weight, bias, source_mean, source_var, blend, shrink_k, eps):
        mean_i, var_i = ref.instance_stats(x)
        y = ref.dabn(x, weight, bias, source_mean, source_var, blend, shrink_k, eps)
        return y, mean_i, var_i

    def dabn_normalize(self, x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                       mean_i, var_i):
        return ref.dabn_normalize(x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                                  mean_i, var_i)

    def dabn_backward(self, dy, x, weight, source_mean, source_var, blend, shrink_k, eps,
                      mean_i, var_i):
        return ref.dabn_backward(dy, x, weight, source_mean, source_var, blend, shrink_k, eps,
                                 mean_i, var_i)
