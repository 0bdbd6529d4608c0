"""The ``triton`` backend: launchers (here) for the kernels in ``kernels.py`` (and the synced
layer's in ``sync_kernels.py``), with the block sizes and tilings of ``config.py``.

The interface of ``backends/base.py``; inputs ``x``/``dy`` are
``(N, C, H, W)`` NCHW- or channels_last-contiguous, float32/float16/bfloat16, on CUDA (or
on CPU under ``TRITON_INTERPRET=1``).  Statistics are float32.  Nothing here syncs with the
device: the blend weights are read inside the kernels, every shape decision is static.

Bytes moved (``|x|`` = one pass over x in its dtype; per-(n, c) traffic is negligible):

* ``instance_stats``:    1 read of x.
* ``diversity_angles``:  1 read of x.
* ``dabn_forward``:      2 reads + 1 write of x (statistics pass, normalize pass).
* ``dabn_normalize``:    1 read + 1 write of x (the normalize pass; statistics given).
* ``dabn_backward``:     2 reads of x, 2 reads of dy, 1 write of dx (two passes);
  ``dabn_backward_sums`` / ``dabn_backward_apply`` are those passes alone.

Launch sequence: forward = stats partials -> (N, C) finalize -> normalize; backward =
partial sums -> (N, C) finalize (dweight, dbias and the dx coefficients) -> dx.

Host-side facts the kernels are given rather than compute: the edge rules of SPEC D1 and
the batch count ``N*M`` (an int32 product in a kernel wraps at 2^31 elements), and the
device: every launch runs under a guard for x's device (Triton launches on the current one).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from ..base import KernelBackend
from . import config as cfg
from . import kernels as jit
from . import sync_kernels as sync_jit

__all__ = ["TritonBackend"]

_F32 = torch.float32


#: offsets inside one image (c*M + p, p*C + c) are int32 in the kernels
_MAX_IMAGE_ELEMS = 2**31 - 1
#: CUDA grid limits: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65,535
_MAX_GRID = (2**31 - 1, 65535, 65535)


def _device_guard(device: torch.device):
    """A context making ``device`` current for the launches inside it (Triton launches on the
    current device and its current stream; a tensor on ``cuda:1`` while ``cuda:0`` is current
    would otherwise fault or race with its stream).  Nothing to do off CUDA."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _guarded(method):
    """Runs a backend method under :func:`_device_guard` for the device of its tensor ``x``
    (the second argument of the backward's, the first of the others')."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        # the tensor whose device counts: x (2nd argument of the backward passes), else the first
        i = 1 if method.__name__ in ("dabn_backward", "dabn_backward_sums", "dabn_backward_apply") else 0
        x = kwargs["x"] if "x" in kwargs else args[i]
        with _device_guard(x.device):
            return method(self, *args, **kwargs)
    return wrapper


def _check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The grid, or a clear error where it exceeds CUDA's limits (a launch would fail with an
    opaque error, or not at all)."""
    for axis, (size, limit) in enumerate(zip(grid, _MAX_GRID, strict=False)):
        if size > limit:
            raise ValueError(f"triton backend: {what} needs {size} programs on grid axis {axis} "
                             f"(CUDA allows {limit}); use the 'cuda' backend for this shape")
    return grid


def _edge_rules(n: int, m: int) -> dict:
    """SPEC D1 as shape facts for the kernels: ``M <= 1`` (no instance statistics) and
    ``N*M <= 1`` (no batch statistics), decided here in Python ints, never in a kernel's int32."""
    return {"NO_INST": m <= 1, "NO_BATCH": n * m <= 1}


def _batch_counts(n: int, m: int) -> tuple[float, float]:
    """``(N*M, max(N*M - 1, 1))`` as floats: the batch divisors of SPEC D4/D5 (an fp32 kernel
    argument holds 2^31 and beyond; an int32 product of N and M does not)."""
    return float(n * m), float(max(n * m - 1, 1))


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """``(x, channels_last)``: x dense in NCHW or channels_last order.  A tensor that is both
    (C == 1 or H*W == 1) maps elements identically under either offset formula.  Raises for
    an image of 2^31 elements or more (its int32 offsets would wrap: wrong addresses, not an
    error, on a GPU)."""
    if x[0].numel() > _MAX_IMAGE_ELEMS:
        raise ValueError(f"triton backend: one image of C*H*W = {x[0].numel()} elements; the kernels "
                         f"index within an image in int32 (at most {_MAX_IMAGE_ELEMS}); use the "
                         "'cuda' or 'cpu' backend")
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _like_layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _vec(t: Tensor, x: Tensor) -> Tensor:
    """A (C,) parameter as a contiguous vector on x's device (its dtype is cast in-kernel)."""
    return t.detach().to(device=x.device).contiguous()


def _stats(x: Tensor, channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One read of x -> ``mean_i, var_i (N, C)``, ``mu_B, var_B (C,)``, all fp32."""
    n, c, h, w = x.shape
    m = h * w
    t = cfg.reduce_tiling(n, c, m, channels_last, x.element_size(), x.device)
    pmean = x.new_empty((n, t.splits, c), dtype=torch.float64)  # fp64 summaries: see kernels.py
    pm2 = torch.empty_like(pmean)
    jit._stats_partial_kernel[_check_grid(t.grid(n), "the statistics pass")](
        x, pmean, pm2, n, c, m, t.iters, t.splits,
        CHANNELS_LAST=channels_last, BLOCK_C=t.block_c, BLOCK_P=t.block_p)
    mean = x.new_empty((n, c), dtype=_F32)
    var = torch.empty_like(mean)
    bmean = x.new_empty((c,), dtype=_F32)
    bvar = torch.empty_like(bmean)
    block_n, block_c = cfg.finalize_blocks(n, c)
    jit._stats_finalize_kernel[(cfg.cdiv(c, block_c),)](
        x, pmean, pm2, mean, var, bmean, bvar, n, c, m, t.chunk, t.splits, _batch_counts(n, m)[1],
        CHANNELS_LAST=channels_last, BLOCK_N=block_n, BLOCK_C=block_c)
    return mean, var, bmean, bvar


def _shrink_flag(shrink_k: float | None, m: int) -> tuple[bool, float]:
    """SPEC: shrink applies only when ``M >= 2`` (for ``M <= 1`` the instance weight is 0)."""
    if shrink_k is None or m <= 1:
        return False, 0.0
    return True, float(shrink_k)


def _blend_vec(blend: Tensor, x: Tensor) -> Tensor:
    return blend.detach().to(device=x.device, dtype=_F32).contiguous()


def _normalize(x, cl, weight, bias, source_mean, source_var, blend, shrink_k, eps,
               mean, var, bmean, bvar) -> Tensor:
    """The normalize pass: y from x and its instance / batch statistics (fp32)."""
    n, c, h, w = x.shape
    m = h * w
    smean, svar = _vec(source_mean, x), _vec(source_var, x)
    shrink, k = _shrink_flag(shrink_k, m)
    y = torch.empty_like(x)
    t = cfg.reduce_tiling(n, c, m, cl, x.element_size(), x.device)
    jit._normalize_kernel[_check_grid(t.grid(n), "the normalize pass")](
        x, y, mean, var, bmean, bvar, smean, svar,
        _vec(weight, x) if weight is not None else smean,
        _vec(bias, x) if bias is not None else smean,
        _blend_vec(blend, x), n, c, m, t.iters, k, float(eps),
        CHANNELS_LAST=cl, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SHRINK=shrink,
        **_edge_rules(n, m), BLOCK_C=t.block_c, BLOCK_P=t.block_p)
    return y


class TritonBackend(KernelBackend):
    name = "triton"

    @_guarded
    def instance_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) -> (mean, var), each (N, C) fp32; unbiased var, 0 when H*W == 1."""
        x, cl = _layout(x.detach())
        mean, var, _, _ = _stats(x, cl)
        return mean, var

    @_guarded
    def diversity_angles(self, x: Tensor, source_mean: Tensor, batch_mean: Tensor) -> Tensor:
        """x (N, C, H, W), source_mean (C,), batch_mean (C,) -> angles (N,) fp32 radians (SPEC §2,
        pixel mode).  One read of x; the arccos of the N means runs as one tiny torch op (the
        interpreter has no libdevice ``acos``)."""
        x, cl = _layout(x.detach())
        n, c, h, w = x.shape
        m = h * w
        block_c, block_p, p_tiles = cfg.angles_tiling(c, m, cl, x.element_size())
        part = x.new_empty((n, p_tiles), dtype=_F32)
        jit._angles_partial_kernel[_check_grid((n * p_tiles,), "the angles pass")](
            x, _vec(source_mean, x), _vec(batch_mean, x), part, n, c, m, p_tiles,
            CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_P=block_p)
        mean_cos = x.new_empty((n,), dtype=torch.float64)
        jit._angles_finalize_kernel[_check_grid((n,), "the angles' mean")](
            part, mean_cos, m, p_tiles, BLOCK=min(cfg.LAUNCH.angles_reduce_block, cfg.next_pow2(p_tiles)))
        return mean_cos.clamp_(-1.0, 1.0).arccos_().to(_F32)

    @_guarded
    def dabn_forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                     source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C, H, W); weight, bias (C,) or None; source stats (C,); blend (3,) on x's device
        -> (y with x's shape/dtype/layout, mean_i (N, C) fp32, var_i (N, C) fp32)."""
        x, cl = _layout(x.detach())
        mean, var, bmean, bvar = _stats(x, cl)
        return _normalize(x, cl, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                          mean, var, bmean, bvar), mean, var

    @_guarded
    def dabn_normalize(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                       source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                       mean_i: Tensor, var_i: Tensor) -> Tensor:
        """:func:`dabn_forward`'s y given the instance statistics ``mean_i, var_i`` (N, C) of x: one
        read of x.  The batch statistics follow from them (SPEC §1) in a few (N, C) torch ops."""
        x, cl = _layout(x.detach())
        m = x.shape[2] * x.shape[3]
        mean = mean_i.detach().to(_F32).contiguous()
        var = var_i.detach().to(_F32).contiguous()
        bmean = mean.mean(dim=0)
        nm = x.shape[0] * m
        if nm > 1:
            bvar = ((m - 1) * var + m * (mean - bmean).square()).sum(dim=0) / (nm - 1)
        else:
            bvar = torch.zeros_like(bmean)
        return _normalize(x, cl, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                          mean, var, bmean, bvar)

    @_guarded
    def dabn_backward(self, dy: Tensor, x: Tensor, weight: Tensor | None, source_mean: Tensor,
                      source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                      mean_i: Tensor, var_i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dy, x (N, C, H, W) in the same layout; mean_i, var_i (N, C) fp32 from the forward
        -> (dx with x's shape/dtype/layout, dweight (C,) fp32, dbias (C,) fp32).
        The formula is :func:`datta_kernels.reference.dabn_backward`."""
        x, dy, cl = _bwd_layout(dy, x)
        n, c, h, w = x.shape
        m = h * w
        mean_i = mean_i.detach().to(_F32).contiguous()
        var_i = var_i.detach().to(_F32).contiguous()
        psdy, psdyxc, splits = _bwd_partials(dy, x, cl, mean_i)

        smean, svar = _vec(source_mean, x), _vec(source_var, x)
        shrink, k = _shrink_flag(shrink_k, m)
        coef_a = torch.empty_like(mean_i)
        coef_b = torch.empty_like(mean_i)
        coef_c = torch.empty_like(mean_i)
        dweight = x.new_empty((c,), dtype=_F32)
        dbias = torch.empty_like(dweight)
        block_n, block_c = cfg.finalize_blocks(n, c)
        jit._bwd_finalize_kernel[(cfg.cdiv(c, block_c),)](
            psdy, psdyxc, mean_i, var_i, smean, svar,
            _vec(weight, x) if weight is not None else smean, _blend_vec(blend, x),
            coef_a, coef_b, coef_c, dweight, dbias, n, c, m, splits, k, float(eps), *_batch_counts(n, m),
            HAS_WEIGHT=weight is not None, SHRINK=shrink, **_edge_rules(n, m),
            BLOCK_N=block_n, BLOCK_C=block_c)
        return _bwd_dx(dy, x, cl, mean_i, coef_a, coef_b, coef_c), dweight, dbias

    @_guarded
    def dabn_backward_sums(self, dy: Tensor, x: Tensor, mean_i: Tensor) -> tuple[Tensor, Tensor]:
        """Backward pass 1 alone: ``(sdy, sdyxc)`` (N, C) fp32 (the fp64 partials summed)."""
        x, dy, cl = _bwd_layout(dy, x)
        psdy, psdyxc, _ = _bwd_partials(dy, x, cl, mean_i.detach().to(_F32).contiguous())
        return psdy.sum(dim=1).to(_F32), psdyxc.sum(dim=1).to(_F32)

    @_guarded
    def batch_moments_local(self, mean_i: Tensor, var_i: Tensor, m: int) -> Tensor:
        """This slice's batch-moment pack (2C + 2,) fp64 (one kernel; fp32 statistics, the
        only ones this backend makes)."""
        if mean_i.dtype != _F32:
            return super().batch_moments_local(mean_i, var_i, m)
        mean_i, var_i = _f32(mean_i, var_i)
        n, c = mean_i.shape
        packed = mean_i.new_empty((2 * c + 2,), dtype=torch.float64)
        block_n, block_c = cfg.finalize_blocks(max(n, 1), max(c, 1))
        sync_jit._batch_local_kernel[(max(cfg.cdiv(c, block_c), 1),)](
            mean_i, var_i, packed, n, c, m, n * m, BLOCK_N=block_n, BLOCK_C=block_c)
        return packed

    @_guarded
    def batch_moments_merge(self, rows: Tensor, dtype: torch.dtype):
        """The rank-ordered merge of gathered packs (one kernel; fp32 statistics, the only
        ones this backend makes)."""
        if dtype != _F32:
            return super().batch_moments_merge(rows, dtype)
        rows = rows.detach().to(torch.float64).contiguous()
        c = (rows.shape[1] - 2) // 2
        mean, var = rows.new_empty((c,), dtype=_F32), rows.new_empty((c,), dtype=_F32)
        count, samples = rows.new_empty(()), rows.new_empty(())
        block_c = min(cfg.next_pow2(c), cfg.LAUNCH.finalize_elems)
        sync_jit._batch_merge_kernel[(max(cfg.cdiv(c, block_c), 1),)](
            rows, mean, var, count, samples, rows.shape[0], c, BLOCK_C=block_c)
        return mean, var, count, samples

    @_guarded
    def blend_moments(self, mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                      blend: Tensor, batch: tuple[Tensor, Tensor, Tensor], m: int,
                      shrink_k: float | None, eps: float) -> tuple[Tensor, Tensor]:
        """The synced layer's blended moments (N, C) fp32 with the given batch (one kernel)."""
        (mean_i, var_i, smean, svar, bl, bmean, bvar, count), k, flags, grid = _sync_args(
            mean_i, var_i, source_mean, source_var, blend, batch, m, shrink_k)
        mean, var = torch.empty_like(mean_i), torch.empty_like(mean_i)
        n, c = mean_i.shape
        sync_jit._sync_blend_kernel[grid](mean_i, var_i, smean, svar, bl, bmean, bvar, count, mean, var,
                                     n, c, m, k, float(eps), **flags)
        return mean, var

    @_guarded
    def dabn_backward_batch_terms(self, sdy, sdyxc, weight, source_mean, source_var, blend, batch,
                                  mean_i, var_i, m, shrink_k, eps):
        """The synced layer's D5 batch terms (2C,) fp64, dweight, dbias (C,) fp32 (one kernel)."""
        (mean_i, var_i, smean, svar, bl, bmean, bvar, count), k, flags, grid = _sync_args(
            mean_i, var_i, source_mean, source_var, blend, batch, m, shrink_k)
        n, c = mean_i.shape
        sdy, sdyxc = _f32(sdy, sdyxc)
        terms = mean_i.new_empty((2 * c,), dtype=torch.float64)
        dweight, dbias = mean_i.new_empty((c,)), mean_i.new_empty((c,))
        sync_jit._sync_terms_kernel[grid](sdy, sdyxc, mean_i, var_i, smean, svar,
                                     _vec(weight, mean_i) if weight is not None else smean, bl,
                                     bmean, bvar, count, terms, dweight, dbias, n, c, m, k, float(eps),
                                     HAS_WEIGHT=weight is not None, **flags)
        return terms, dweight, dbias

    @_guarded
    def dabn_backward_coefficients(self, sdy, sdyxc, weight, source_mean, source_var, blend, batch,
                                   mean_i, var_i, m, shrink_k, eps, batch_terms):
        """The synced layer's D5 coefficients A, B, C0 (N, C) fp32 (one kernel)."""
        (mean_i, var_i, smean, svar, bl, bmean, bvar, count), k, flags, grid = _sync_args(
            mean_i, var_i, source_mean, source_var, blend, batch, m, shrink_k)
        n, c = mean_i.shape
        sdy, sdyxc = _f32(sdy, sdyxc)
        terms = batch_terms.detach().to(torch.float64).contiguous()
        a, b, c0 = (torch.empty_like(mean_i) for _ in range(3))
        sync_jit._sync_coefs_kernel[grid](sdy, sdyxc, mean_i, var_i, smean, svar,
                                     _vec(weight, mean_i) if weight is not None else smean, bl,
                                     bmean, bvar, count, terms, a, b, c0, n, c, m, k, float(eps),
                                     HAS_WEIGHT=weight is not None, **flags)
        return a, b, c0

    @_guarded
    def dabn_backward_apply(self, dy: Tensor, x: Tensor, mean_i: Tensor, a: Tensor, b: Tensor,
                            c0: Tensor) -> Tensor:
        """Backward pass 2 alone, with given (N, C) coefficients."""
        x, dy, cl = _bwd_layout(dy, x)
        f32 = [t.detach().to(_F32).contiguous() for t in (mean_i, a, b, c0)]
        return _bwd_dx(dy, x, cl, *f32)


def _f32(*ts: Tensor) -> list[Tensor]:
    return [t.detach().to(_F32).contiguous() for t in ts]


def _sync_args(mean_i, var_i, source_mean, source_var, blend, batch, m, shrink_k):
    """The synced layer's kernels' common arguments: fp32 (N, C) / (C,) statistics, the batch
    count as fp64 (read on the device), the shrink flag and the instance edge rule (a shape
    fact), the finalize blocks and grid."""
    mean_i, var_i, smean, svar, bl, bmean, bvar = _f32(mean_i, var_i, source_mean, source_var, blend,
                                                      batch[0], batch[1])
    count = batch[2].detach().to(torch.float64).reshape(1)
    n, c = mean_i.shape
    shrink, k = _shrink_flag(shrink_k, m)
    block_n, block_c = cfg.finalize_blocks(n, c)
    grid = _check_grid((cfg.cdiv(c, block_c),), "the synced layer's coefficients")
    return (mean_i, var_i, smean, svar, bl, bmean, bvar, count), k, dict(
        NO_INST=m <= 1, SHRINK=shrink, BLOCK_N=block_n, BLOCK_C=block_c), grid


def _bwd_layout(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """x in a kernel layout and dy in the same one."""
    x, cl = _layout(x.detach())
    return x, _like_layout(dy.detach(), cl), cl


def _bwd_partials(dy: Tensor, x: Tensor, cl: bool, mean_i: Tensor) -> tuple[Tensor, Tensor, int]:
    """Backward pass 1: fp64 partial sums ``(N, splits, C)`` of ``dy`` and ``dy (x - mu_i)``."""
    n, c, h, w = x.shape
    t = cfg.reduce_tiling(n, c, h * w, cl, x.element_size(), x.device)
    psdy = x.new_empty((n, t.splits, c), dtype=torch.float64)  # fp64 totals: see kernels.py
    psdyxc = torch.empty_like(psdy)
    jit._bwd_partial_kernel[_check_grid(t.grid(n), "the backward sums")](
        dy, x, mean_i, psdy, psdyxc, n, c, h * w, t.iters, t.splits,
        CHANNELS_LAST=cl, BLOCK_C=t.block_c, BLOCK_P=t.block_p)
    return psdy, psdyxc, t.splits


def _bwd_dx(dy: Tensor, x: Tensor, cl: bool, mean_i: Tensor, a: Tensor, b: Tensor,
            c0: Tensor) -> Tensor:
    """Backward pass 2: ``dx = a dy + b (x - mu_i) + c0`` (fp32 (N, C) coefficients)."""
    n, c, h, w = x.shape
    t = cfg.reduce_tiling(n, c, h * w, cl, x.element_size(), x.device)
    dx = torch.empty_like(x)
    jit._bwd_dx_kernel[_check_grid(t.grid(n), "the dx pass")](
        dy, x, dx, mean_i, a, b, c0, n, c, h * w, t.iters,
        CHANNELS_LAST=cl, BLOCK_C=t.block_c, BLOCK_P=t.block_p)
    return dx
