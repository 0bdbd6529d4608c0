"""The interface every backend implements (``reference``, ``cpu``, ``cuda``, ``triton``).

One backend = one module in this folder, mirroring ``csrc/``: ``reference.py`` (the SPEC as
PyTorch), ``cpu.py`` and ``cuda.py`` (the compiled kernels of ``csrc/cpu`` and ``csrc/cuda``),
``triton/`` (kernels, launchers and launch configuration side by side).  The ordered table that
picks one lives in ``__init__.py``; the autograd-aware ops that call it in ``datta_kernels.ops``.

Contract of every method:

* ``x`` and ``dy`` arrive ``(N, C, H, W)`` contiguous in NCHW or channels_last (``ops`` copies
  other strides once); ``M = H*W``.  Outputs keep x's shape, dtype and memory format.
* Statistics are float32 (float64 for float64 input, see :func:`acc_dtype`).
* ``blend`` is a ``(3,)`` tensor ``(w_s, w_b, w_i)`` on x's device, validated by the caller
  (``>= 0``, sums to 1).  In the labels of docs/SPEC.md (D1–D5): the backend applies SPEC
  §3's edge rules to it per call (D1): with ``M <= 1`` the instance weight moves to the
  source, with ``N*M <= 1`` the batch weight does; then the optional NOTE shrink (D2,
  ``shrink_k``, only where ``M > 1``), the blended moments and the normalisation (D3); batch
  statistics come from the instance statistics (D4); the backward uses the coefficients of
  D5.  A statistic whose weight is 0 is selected away, never
  multiplied by 0 (SPEC "Non-finite input").
* No method syncs with the device (nothing reads a device value on the host).
"""
from __future__ import annotations

import abc

import torch
from torch import Tensor

__all__ = ["KernelBackend", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of every statistic: float64 stays float64 (for gradcheck), everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class KernelBackend(abc.ABC):
    """The operations of SPEC §1–§3 a backend provides (see the module docstring)."""

    #: the backend's name in the table (``DATTA_BACKEND``, ``backend=`` arguments)
    name: str

    @abc.abstractmethod
    def instance_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """SPEC §1: per-(n, c) mean and unbiased variance over (H, W) -> ``(N, C)`` each
        (variance 0 when M == 1).  One read of x."""

    @abc.abstractmethod
    def diversity_angles(self, x: Tensor, source_mean: Tensor, batch_mean: Tensor) -> Tensor:
        """SPEC §2, pixel mode: the angle ``theta[n]`` (radians) of each sample ``(N,)`` between
        ``x[n] - batch_mean`` and ``source_mean - batch_mean`` averaged over pixels (means
        ``(C,)``).  One read of x."""

    def dispersion_score(self, mean_i: Tensor, var_i: Tensor, source_mean: Tensor,
                         source_var: Tensor, m: int, eps: float, parts: str,
                         stat: str) -> tuple[Tensor, Tensor]:
        """SPEC §2, dispersion mode, from instance statistics ``(N, C)``: ``(score, per_sample)``,
        a 0-dim and an ``(N,)`` float32 tensor.  It reads no x, only ``(N, C)`` statistics: by
        default the reference's few torch ops, which are already as fast as a kernel on a GPU
        (a backend where they are dispatch-bound overrides this, as ``cpu`` does)."""
        from .. import reference
        return reference.dispersion_score(mean_i, var_i, source_mean, source_var, m, eps,
                                          parts, stat)

    @abc.abstractmethod
    def dabn_forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     source_mean: Tensor, source_var: Tensor, blend: Tensor,
                     shrink_k: float | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """SPEC §3: ``(y, mean_i, var_i)``; weight, bias ``(C,)`` or None, source statistics
        ``(C,)``.  Two reads and one write of x."""

    @abc.abstractmethod
    def dabn_normalize(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       source_mean: Tensor, source_var: Tensor, blend: Tensor,
                       shrink_k: float | None, eps: float, mean_i: Tensor,
                       var_i: Tensor) -> Tensor:
        """``y`` of :meth:`dabn_forward` given ``mean_i, var_i = instance_stats(x)``: one read and
        one write of x."""

    @abc.abstractmethod
    def dabn_backward(self, dy: Tensor, x: Tensor, weight: Tensor | None, source_mean: Tensor,
                      source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                      mean_i: Tensor, var_i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SPEC §3 (D5): ``(dx, dweight, dbias)``, dweight/dbias ``(C,)`` (statistics dtype),
        given the forward's instance statistics.  Two reads of x and dy, one write of dx."""

    # SPEC D5's two passes alone, for a caller that computes the coefficients in between
    # (datta_kernels.distributed sums its batch terms over a process group there).  By default
    # the reference's torch ops; a backend with the passes as kernels overrides them.
    def dabn_backward_sums(self, dy: Tensor, x: Tensor, mean_i: Tensor) -> tuple[Tensor, Tensor]:
        """SPEC D5 pass 1: ``(sdy, sdyxc)`` ``(N, C)``, ``sum_p dy`` and ``sum_p dy (x - mu_i)``.
        One read of x and dy."""
        from .. import reference
        return reference.dabn_backward_sums(dy, x, mean_i)[2:]

    def dabn_backward_apply(self, dy: Tensor, x: Tensor, mean_i: Tensor, a: Tensor, b: Tensor,
                            c0: Tensor) -> Tensor:
        """SPEC D5 pass 2: ``dx = a dy + b (x - mu_i) + c0`` with ``(N, C)`` coefficients (the
        b term only where ``b != 0``), in x's dtype and memory format.  One read of x and dy,
        one write of dx."""
        from .. import reference
        dyf, xc = reference.dabn_backward_centred(dy, x, mean_i)
        return reference.dabn_backward_dx(dyf, xc, a, b, c0, x)

