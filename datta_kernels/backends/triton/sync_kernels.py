"""Triton kernels of the synced layer's per-(n, c) math (``datta_kernels.distributed``; the
launchers are ``TritonBackend.batch_moments_local`` ... ``dabn_backward_coefficients`` in
``__init__.py``).  They read only ``(N, C)`` / ``(C,)`` statistics, never x, and share SPEC
D1-D5's helpers with the layer kernels of ``kernels.py``.  The oracle:
``reference.blend_moments`` / ``dabn_backward_coefficients`` (``tests/test_sync_coefs.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _blend, _blended_moments, _bwd_terms, _weighted


# ---------------------------------------------------------------- the synced layer's (N, C) math
# datta_kernels.distributed: SPEC D1-D3 and D5 with the statistics of another batch given
# (batch mean/var (C,), its element count read on the device: D1's batch rule is
# ``count > 1``, a value, not a shape).  One program per channel block, batch blocks in a
# fixed order.  The oracle: reference.blend_moments / dabn_backward_coefficients.
@triton.jit
def _batch_local_kernel(mean_ptr, var_ptr, packed_ptr, N, C, M, NM, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """SPEC D4 for this slice, packed for a gather: ``packed (2C + 2,)`` fp64 = ``[N M, mean_n
    mu_i (C), sum_n ((M - 1) var_i + M (mu_i - mean)^2) (C), N]`` (``NM = N*M`` from the host, an
    int: it becomes an exact fp64 in the store).  fp64 sums over the batch in a fixed order."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    if tl.program_id(0) == 0:
        tl.store(packed_ptr, NM)
        tl.store(packed_ptr + 2 * C + 1, N)
    total = tl.zeros([BLOCK_C], dtype=tl.float64)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        mean_i = tl.load(mean_ptr + n_offs[:, None] * C + c_offs[None, :], mask=mask, other=0.0)
        total += tl.sum(mean_i.to(tl.float64), axis=0)
    mean = total / tl.maximum(N, 1)
    ss = tl.zeros([BLOCK_C], dtype=tl.float64)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        nc = n_offs[:, None] * C + c_offs[None, :]
        d = tl.load(mean_ptr + nc, mask=mask, other=0.0).to(tl.float64) - mean[None, :]
        v = tl.load(var_ptr + nc, mask=mask, other=0.0).to(tl.float64)
        ss += tl.sum(tl.where(mask, (M - 1) * v + M * d * d, 0.0), axis=0)
    tl.store(packed_ptr + 1 + c_offs, mean, mask=c_mask)
    tl.store(packed_ptr + 1 + C + c_offs, ss, mask=c_mask)


@triton.jit
def _batch_merge_kernel(rows_ptr, mean_ptr, var_ptr, count_ptr, samples_ptr, W, C, BLOCK_C: tl.constexpr):
    """Chan's merge of the gathered packs ``rows (W, 2C + 2)`` fp64 in rank order (the same
    fp64 operations on every rank: the same bits) -> ``mu_B, var_B (C,)`` fp32 (var 0 where
    count <= 1), ``count``, ``samples`` fp64."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    k = 2 * C + 2
    cnt = tl.load(rows_ptr)
    mu = tl.load(rows_ptr + 1 + c_offs, mask=c_mask, other=0.0)
    m2 = tl.load(rows_ptr + 1 + C + c_offs, mask=c_mask, other=0.0)
    samples = tl.load(rows_ptr + k - 1)
    for q in range(1, W):
        n_b = tl.load(rows_ptr + q * k)
        n_ab = cnt + n_b
        safe = tl.maximum(n_ab, 1.0)
        delta = tl.load(rows_ptr + q * k + 1 + c_offs, mask=c_mask, other=0.0) - mu
        mu = mu + delta * (n_b / safe)
        m2_b = tl.load(rows_ptr + q * k + 1 + C + c_offs, mask=c_mask, other=0.0)
        m2 = m2 + m2_b + delta * delta * (cnt * n_b / safe)
        cnt = n_ab
        samples += tl.load(rows_ptr + q * k + k - 1)
    tl.store(mean_ptr + c_offs, mu.to(tl.float32), mask=c_mask)
    tl.store(var_ptr + c_offs, tl.where(cnt > 1.0, m2 / tl.maximum(cnt - 1.0, 1.0), 0.0).to(tl.float32),
             mask=c_mask)
    if tl.program_id(0) == 0:
        tl.store(count_ptr, cnt)
        tl.store(samples_ptr, samples)


@triton.jit
def _sync_channel(smean_ptr, svar_ptr, bmean_ptr, bvar_ptr, blend_ptr, count_ptr, c_offs, c_mask,
                  NO_INST: tl.constexpr):
    smean = tl.load(smean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    svar = tl.load(svar_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    mu_b = tl.load(bmean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    var_b = tl.load(bvar_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    count = tl.load(count_ptr).to(tl.float32)
    w_s, w_b, w_i = _blend(blend_ptr, NO_INST, False)
    has_b = count > 1.0
    w_s = tl.where(has_b, w_s, w_s + w_b)
    w_b = tl.where(has_b, w_b, 0.0)
    return smean, svar, mu_b, var_b, count, w_s, w_b, w_i


@triton.jit
def _sync_blend_kernel(mean_ptr, var_ptr, smean_ptr, svar_ptr, blend_ptr, bmean_ptr, bvar_ptr, count_ptr,
                       out_mean_ptr, out_var_ptr, N, C, M, shrink_k, eps, NO_INST: tl.constexpr,
                       SHRINK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """SPEC D1-D3: blended ``m, v`` (N, C) fp32 with the given batch."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    smean, svar, mu_b, var_b, count, w_s, w_b, w_i = _sync_channel(
        smean_ptr, svar_ptr, bmean_ptr, bvar_ptr, blend_ptr, count_ptr, c_offs, c_mask, NO_INST)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        nc = n_offs[:, None] * C + c_offs[None, :]
        mean_i = tl.load(mean_ptr + nc, mask=mask, other=0.0)
        var_i = tl.load(var_ptr + nc, mask=mask, other=0.0)
        m, v, _, _ = _blended_moments(mean_i, var_i, mu_b[None, :], var_b[None, :], smean[None, :],
                                      svar[None, :], w_s, w_b, w_i, M, shrink_k, eps, SHRINK)
        tl.store(out_mean_ptr + nc, m, mask=mask)
        tl.store(out_var_ptr + nc, v, mask=mask)


@triton.jit
def _sync_terms_kernel(sdy_ptr, sdyxc_ptr, mean_ptr, var_ptr, smean_ptr, svar_ptr, w_ptr, blend_ptr,
                       bmean_ptr, bvar_ptr, count_ptr, terms_ptr, dw_ptr, db_ptr, N, C, M, shrink_k, eps,
                       HAS_WEIGHT: tl.constexpr, NO_INST: tl.constexpr, SHRINK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """SPEC D5's batch terms ``[w_b sum_n dm, w_b sum_n dv]`` -> ``terms (2C,)`` fp64, and
    ``dweight = sum_n sdyxh``, ``dbias = sum_n sdy`` (C,) of this slice (``sdy, sdyxc`` the
    pass-1 sums, (N, C) fp32)."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    smean, svar, mu_b, var_b, count, w_s, w_b, w_i = _sync_channel(
        smean_ptr, svar_ptr, bmean_ptr, bvar_ptr, blend_ptr, count_ptr, c_offs, c_mask, NO_INST)
    g = tl.zeros([BLOCK_C], dtype=tl.float32) + 1.0
    if HAS_WEIGHT:
        g = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_C], dtype=tl.float32)
    dweight = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dm = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dv = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        _, sdy, sdyxh, _, dm, dv, _, _ = _bwd_terms(
            sdy_ptr, sdyxc_ptr, mean_ptr, var_ptr, n_offs, c_offs, mask, mu_b, var_b, smean, svar,
            g, w_s, w_b, w_i, C, M, 1, shrink_k, eps, SHRINK)
        dbias += tl.sum(tl.where(mask, sdy, 0.0), axis=0)
        dweight += tl.sum(tl.where(mask, sdyxh, 0.0), axis=0)
        sum_dm += tl.sum(tl.where(mask, dm, 0.0), axis=0)
        sum_dv += tl.sum(tl.where(mask, dv, 0.0), axis=0)
    tl.store(db_ptr + c_offs, dbias, mask=c_mask)
    tl.store(dw_ptr + c_offs, dweight, mask=c_mask)
    tl.store(terms_ptr + c_offs, _weighted(w_b, sum_dm).to(tl.float64), mask=c_mask)
    tl.store(terms_ptr + C + c_offs, _weighted(w_b, sum_dv).to(tl.float64), mask=c_mask)


@triton.jit
def _sync_coefs_kernel(sdy_ptr, sdyxc_ptr, mean_ptr, var_ptr, smean_ptr, svar_ptr, w_ptr, blend_ptr,
                       bmean_ptr, bvar_ptr, count_ptr, terms_ptr, a_ptr, b_ptr, c0_ptr, N, C, M, shrink_k,
                       eps, HAS_WEIGHT: tl.constexpr, NO_INST: tl.constexpr, SHRINK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """SPEC D5's ``A, B, C0`` (N, C) fp32 given the summed batch terms ``terms (2C,)`` fp64:
    ``B = 2 dvar_i / (M - 1) + 2 dvar_B / (count - 1) [count > 1]``,
    ``C0 = dmu_i / M + dmu_B / max(count, 1) + 2 dvar_B (mu_i - mu_B) / (count - 1) [count > 1]``."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    smean, svar, mu_b, var_b, count, w_s, w_b, w_i = _sync_channel(
        smean_ptr, svar_ptr, bmean_ptr, bvar_ptr, blend_ptr, count_ptr, c_offs, c_mask, NO_INST)
    g = tl.zeros([BLOCK_C], dtype=tl.float32) + 1.0
    if HAS_WEIGHT:
        g = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    dmu_bt = tl.load(terms_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    dvar_bt = tl.load(terms_ptr + C + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    inv_c1 = tl.where(count > 1.0, 1.0 / tl.maximum(count - 1.0, 1.0), 0.0)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        mean_i, _, _, r, dm, dv, keep_mu, keep_var = _bwd_terms(
            sdy_ptr, sdyxc_ptr, mean_ptr, var_ptr, n_offs, c_offs, mask, mu_b, var_b, smean, svar,
            g, w_s, w_b, w_i, C, M, 1, shrink_k, eps, SHRINK)
        dmu_i = _weighted(w_i, dm * keep_mu)
        dvar_i = _weighted(w_i, dv * keep_var)
        coef_b = 2.0 * dvar_i / tl.maximum(M - 1, 1) + 2.0 * dvar_bt[None, :] * inv_c1
        coef_c = (dmu_i / M + dmu_bt[None, :] / tl.maximum(count, 1.0)
                  + _weighted(2.0 * dvar_bt[None, :] * inv_c1, mean_i - mu_b[None, :]))
        nc = n_offs[:, None] * C + c_offs[None, :]
        tl.store(a_ptr + nc, g[None, :] * r, mask=mask)
        tl.store(b_ptr + nc, coef_b, mask=mask)
        tl.store(c0_ptr + nc, coef_c, mask=mask)
