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

from ..presets import acc_dtype

__all__ = ["KernelBackend", "acc_dtype"]


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

    # The synced layer's per-(n, c) math (datta_kernels.distributed), with the statistics of
    # another batch given as ``batch = (mu_B (C,), var_B (C,), count)``, ``count`` the batch's
    # element count as a 0-dim tensor (never read on the host by a device backend).  By
    # default the reference's torch ops (~100 small ops each); a backend with kernels for
    # them overrides these.
    def batch_moments_local(self, mean_i: Tensor, var_i: Tensor, m: int) -> Tensor:
        """SPEC D4 for this slice, packed for a gather: float64 ``(2C + 2,)`` ``[N M, mean_n
        mu_i (C), sum_n ((M - 1) var_i + M (mu_i - mean)^2) (C), N]`` (zeros for N = 0)."""
        n = mean_i.shape[0]
        mi, vi = mean_i.detach().double(), var_i.detach().double()
        mean_l = mi.sum(dim=0) / max(n, 1)
        m2_l = ((m - 1) * vi + m * (mi - mean_l).square()).sum(dim=0)
        return torch.cat([mean_l.new_full((1,), float(n * m)), mean_l, m2_l,
                          mean_l.new_full((1,), float(n))])

    def batch_moments_merge(self, rows: Tensor, dtype: torch.dtype
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Chan's merge of gathered packs ``(W, 2C + 2)`` in rank order (the same bits on every
        rank) -> ``(mu_B, var_B)`` ``(C,)`` in ``dtype``, ``count`` and ``samples`` 0-dim
        float64; ``var_B = M2 / (count - 1)`` where ``count > 1``, else 0."""
        from .. import reference

        count, mean, m2 = reference.merge_moments(rows[:, :-1])
        var = torch.where(count > 1, m2 / (count - 1).clamp(min=1), torch.zeros_like(m2))
        return mean.to(dtype), var.to(dtype), count, rows[:, -1].sum()

    def blend_moments(self, mean_i: Tensor, var_i: Tensor, source_mean: Tensor,
                      source_var: Tensor, blend: Tensor, batch: tuple[Tensor, Tensor, Tensor],
                      m: int, shrink_k: float | None, eps: float) -> tuple[Tensor, Tensor]:
        """SPEC D1-D3 with the given batch: blended ``(mean, var)``, ``(N, C)`` in the
        statistics dtype (D1's batch rule tests ``count > 1``)."""
        from .. import reference
        return reference.blend_moments(mean_i, var_i, source_mean, source_var, blend, m, shrink_k,
                                       eps, batch=batch)

    def dabn_backward_batch_terms(self, sdy: Tensor, sdyxc: Tensor, weight: Tensor | None,
                                  source_mean: Tensor, source_var: Tensor, blend: Tensor,
                                  batch: tuple[Tensor, Tensor, Tensor], mean_i: Tensor,
                                  var_i: Tensor, m: int, shrink_k: float | None,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """SPEC D5's batch terms of this slice: ``(terms, dweight, dbias)``, ``terms`` the
        float64 ``(2C,)`` ``[w_b sum_n dm, w_b sum_n dv]`` a process group sums before
        :meth:`dabn_backward_coefficients`; dweight, dbias ``(C,)`` this slice's share."""
        from .. import reference
        kept = []

        def keep(t):
            kept.append(t.double())
            return t
        *_, dweight, dbias = reference.dabn_backward_coefficients(
            sdy, sdyxc, weight, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i, m,
            batch=batch, sum_batch=keep)
        return kept[0], dweight, dbias

    def dabn_backward_coefficients(self, sdy: Tensor, sdyxc: Tensor, weight: Tensor | None,
                                   source_mean: Tensor, source_var: Tensor, blend: Tensor,
                                   batch: tuple[Tensor, Tensor, Tensor], mean_i: Tensor,
                                   var_i: Tensor, m: int, shrink_k: float | None, eps: float,
                                   batch_terms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SPEC D5's ``(A, B, C0)`` ``(N, C)`` for :meth:`dabn_backward_apply`, given the batch
        terms of :meth:`dabn_backward_batch_terms` summed over the group."""
        from .. import reference
        a, b, c0, _, _ = reference.dabn_backward_coefficients(
            sdy, sdyxc, weight, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i, m,
            batch=batch, sum_batch=lambda t: batch_terms)
        return a, b, c0

    def dabn_backward_apply(self, dy: Tensor, x: Tensor, mean_i: Tensor, a: Tensor, b: Tensor,
                            c0: Tensor) -> Tensor:
        """SPEC D5 pass 2: ``dx = a dy + b (x - mu_i) + c0`` with ``(N, C)`` coefficients (the
        b term only where ``b != 0``), in x's dtype and memory format.  One read of x and dy,
        one write of dx."""
        from .. import reference
        dyf, xc = reference.dabn_backward_centred(dy, x, mean_i)
        return reference.dabn_backward_dx(dyf, xc, a, b, c0, x)

