"""Triton kernels of the ``triton`` backend (launchers in ``__init__.py``, block sizes in
``config.py``).

Conventions shared by every kernel:

* ``x`` is read as ``(N, C, M)`` with ``M = H*W``.  NCHW: element ``(n, c, p)`` sits at
  ``n*C*M + c*M + p``; channels_last: at ``n*M*C + p*C + c``.  Tiles are ``[BLOCK_C, BLOCK_P]``
  in both layouts; the offset formula (a ``CHANNELS_LAST`` constexpr) tells Triton which tile
  dim is contiguous, so loads vectorise along pixels (NCHW) or channels (channels_last).
* Streaming kernels run on the grid ``(N * c_blocks, splits)``; program ``(row, split)`` walks
  pixel tiles ``[split*ITERS, split*ITERS + ITERS)`` of row ``row = n*c_blocks + cb``.
* Every statistic is fp32; padding lanes are masked out of every sum; no atomics anywhere, so
  results are bit-identical run to run.  Totals that run over a whole plane (the moments'
  running mean/M2, the backward's ``sum dy``, ``sum dy (x - mu)``, the angles' ``sum cos``)
  take fp32 tile results into fp64: an fp32 running total drifts with M and stops growing
  once the total is 2^24 times the tile's share; at M = 2^26 .. 2^31 that is 5e-5 relative
  error or worse.
* Per-(n, c) partials are stored ``(N, splits, C)`` (channels contiguous) for the finalize
  kernels, which tile ``[BLOCK_N, BLOCK_C]`` and loop over splits and batch blocks in a fixed
  order.
"""
from __future__ import annotations

import inspect

import triton
import triton.language as tl
import triton.testing

from .config import AUTOTUNE_KEY, autotune_configs

#: Memory-bound kernels time steadily, so a short benchmark (5 ms warm-up, 20 ms of runs per
#: config) picks the winner; a new layer shape then costs ~0.1 s once, not seconds.
_BENCH_MS = {"warmup": 5, "rep": 20}


def _autotune_timing() -> dict:
    """How to hand the short benchmark to ``triton.autotune``: ``do_bench=`` where this
    Triton's ``autotune`` has that argument, else the older ``warmup=`` / ``rep=``
    milliseconds (``do_bench=`` on a Triton without it is a TypeError at import)."""
    params = inspect.signature(triton.autotune).parameters
    if "do_bench" in params:
        def do_bench(fn, quantiles):
            return triton.testing.do_bench(fn, quantiles=quantiles, **_BENCH_MS)
        return {"do_bench": do_bench}
    return {k: v for k, v in _BENCH_MS.items() if k in params}


def _autotuner(reduces: bool):
    return triton.autotune(configs=autotune_configs(reduces), key=AUTOTUNE_KEY, **_autotune_timing())


#: kernels that reduce over a tile (pinned num_warps: it sets the sum order) / element-wise ones
_autotune_reduce = _autotuner(reduces=True)
_autotune_map = _autotuner(reduces=False)


# ---------------------------------------------------------------- shared helpers
@triton.jit
def _offsets(c_offs, p_offs, C, M, CHANNELS_LAST: tl.constexpr):
    """In-image offsets of the tile ``[BLOCK_C, BLOCK_P]``."""
    if CHANNELS_LAST:
        offs = p_offs[None, :] * C + c_offs[:, None]
    else:
        offs = c_offs[:, None] * M + p_offs[None, :]
    return offs


@triton.jit
def _row(C, BLOCK_C: tl.constexpr):
    """Program -> (n, channel offsets, channel mask) of a streaming kernel."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    row = tl.program_id(0)
    n = row // c_blocks
    c_offs = (row % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c_offs, c_offs < C


@triton.jit
def _chan(cnt_a, mean_a, m2_a, cnt_b, mean_b, m2_b):
    """Chan et al. merge of two (count, mean, M2) summaries; counts are scalars."""
    tot = cnt_a + cnt_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (cnt_b / tot)
    m2 = m2_a + m2_b + delta * delta * (cnt_a * cnt_b / tot)
    return tot, mean, m2


@triton.jit
def _weighted(w, s):
    """SPEC D3's weighted term: ``w * s`` where ``w != 0``, else 0: a statistic of weight 0 is
    never read, so an inf/NaN in it cannot leak through ``0 * inf = NaN`` (SPEC §3,
    "Non-finite input")."""
    return tl.where(w != 0, w * s, 0.0)


@triton.jit
def _blend(blend_ptr, NO_INST: tl.constexpr, NO_BATCH: tl.constexpr):
    """SPEC D1: §3 weights with the edge rules (``NO_INST``, i.e. ``M <= 1``: w_i -> w_s;
    ``NO_BATCH``, i.e. ``N*M <= 1``: w_b -> w_s).  The rules are shape facts decided on the
    host (``N*M`` overflows int32 here at 2^31 elements); the weights are read on the device,
    so changing the blend never syncs or recompiles."""
    w_s = tl.load(blend_ptr).to(tl.float32)
    w_b = tl.load(blend_ptr + 1).to(tl.float32)
    w_i = tl.load(blend_ptr + 2).to(tl.float32)
    if NO_INST:
        w_s = w_s + w_i
        w_i = 0.0 * w_i
    if NO_BATCH:
        w_s = w_s + w_b
        w_b = 0.0 * w_b
    return w_s, w_b, w_i


@triton.jit
def _blended_moments(mean_i, var_i, mu_b, var_b, smean, svar, w_s, w_b, w_i, M, shrink_k, eps,
                     SHRINK: tl.constexpr):
    """SPEC D3 blended ``m, v`` (with D2's shrink when SHRINK) and the softshrink pass-through
    masks for D5, ``keep_mu, keep_var``
    (1 where the shrunk statistic moves with the raw one, 0 inside the dead zone).

    ``lam_mu = k sqrt((var_s + eps) / M)``, ``lam_var = k (var_s + eps) sqrt(2 / (M - 1))``,
    ``softshrink(z, lam) = z - lam`` (z > lam), ``z + lam`` (z < -lam), else ``z * 0`` (0, or
    NaN for a NaN statistic, as in the reference).
    SHRINK is only set when ``M >= 2``.
    """
    keep_mu = tl.zeros_like(mean_i) + 1.0
    keep_var = tl.zeros_like(mean_i) + 1.0
    mean_t = mean_i
    var_t = var_i
    if SHRINK:
        sv = svar + eps
        lam_mu = shrink_k * tl.sqrt(sv / M)
        lam_var = shrink_k * sv * tl.sqrt(2.0 / (M - 1))
        z_mu = mean_i - smean
        z_var = var_i - svar
        keep_mu = (tl.abs(z_mu) > lam_mu).to(tl.float32)
        keep_var = (tl.abs(z_var) > lam_var).to(tl.float32)
        mean_t = smean + tl.where(z_mu > lam_mu, z_mu - lam_mu,
                                 tl.where(z_mu < -lam_mu, z_mu + lam_mu, z_mu * 0.0))
        var_t = svar + tl.where(z_var > lam_var, z_var - lam_var,
                                tl.where(z_var < -lam_var, z_var + lam_var, z_var * 0.0))
    m = _weighted(w_s, smean) + _weighted(w_b, mu_b) + _weighted(w_i, mean_t)
    v = _weighted(w_s, svar) + _weighted(w_b, var_b) + _weighted(w_i, var_t)
    return m, v, keep_mu, keep_var


@triton.jit
def _batch_stats_block(cnt, bmean, bm2, mean_i, m2_i, mask, nb, M):
    """SPEC D4: fold one batch block into the running batch summary (§1):
    block mean ``mean_n mu_i``, block M2 ``sum_n [M2_i + M (mu_i - block mean)^2]``,
    merged with Chan's formula (count ``nb*M`` per block)."""
    mu = tl.sum(tl.where(mask, mean_i, 0.0), axis=0) / nb
    dev = tl.where(mask, mean_i - mu[None, :], 0.0)
    m2 = tl.sum(tl.where(mask, m2_i, 0.0) + M * dev * dev, axis=0)
    return _chan(cnt, bmean, bm2, nb * M, mu, m2)


# ---------------------------------------------------------------- forward: statistics
@_autotune_reduce
@triton.jit
def _stats_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, N, C, M, ITERS, SPLITS,
                          CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-(n, c, split) count/mean/M2 of ``x`` -> ``pmean, pm2 (N, SPLITS, C)`` fp64.

    Shifted Chan: every program subtracts the same per-(n, c) shift ``K = x[n, c, 0]`` (exact
    for nearby values), centres each tile on its own mean before squaring (two passes over
    registers, one over memory), and merges tiles into its running summary with Chan's
    formula.  The stored means are ``mean - K``, so the merges' ``delta^2`` terms work at the
    noise scale, not at the offset's: ``1e4 + noise`` keeps ~1e-6 relative variance error,
    where ``sum x^2 - (sum x)^2 / M`` in fp32 returns garbage.  The count of a tile,
    ``min(BLOCK_P, M - p0)``, is the same for every channel, so it stays a scalar.  Tiles are
    reduced in fp32, the running summary is fp64 (its M2 is a total over every tile: in fp32
    it drifts with M, see the module notes).
    """
    n, c_offs, c_mask = _row(C, BLOCK_C)
    split = tl.program_id(1)
    base = x_ptr + n.to(tl.int64) * C * M
    shift = tl.load(base + _offsets(c_offs, tl.arange(0, 1), C, M, CHANNELS_LAST),
                    mask=c_mask[:, None], other=0.0).to(tl.float32)
    t0 = split * ITERS
    t1 = tl.minimum(t0 + ITERS, tl.cdiv(M, BLOCK_P))
    cnt = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t in range(t0, t1):
        p_offs = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p_offs < M)[None, :]
        x = tl.load(base + _offsets(c_offs, p_offs, C, M, CHANNELS_LAST), mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - shift, 0.0)
        cnt_b = tl.minimum(M - t * BLOCK_P, BLOCK_P).to(tl.float32)
        mean_b = tl.sum(x, axis=1) / cnt_b
        d = tl.where(mask, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        cnt, mean, m2 = _chan(cnt, mean, m2, cnt_b, mean_b.to(tl.float64), m2_b.to(tl.float64))
    out = (n * SPLITS + split) * C + c_offs
    tl.store(pmean_ptr + out, mean, mask=c_mask)
    tl.store(pm2_ptr + out, m2, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(x_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, bmean_ptr, bvar_ptr,
                           N, C, M, CHUNK, SPLITS, nm1, CHANNELS_LAST: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits -> ``mean_i, var_i (N, C)`` (unbiased, 0 when M == 1) and fold the
    batch -> ``mu_B, var_B (C,)`` (unbiased, 0 when N*M <= 1).  One program per channel
    block; fixed loop order over batch blocks and splits.  The partial means are relative
    to the shift ``K = x[n, c, 0]``, added back once here; the splits merge in fp64, the
    batch fold (N values) in fp32.  ``nm1 = max(N*M - 1, 1)`` comes from the host as a float
    (``N*M`` is not an int32)."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    bcnt = 0.0
    bmean = tl.zeros([BLOCK_C], dtype=tl.float32)
    bm2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        cnt = 0.0
        mean = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        m2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float64)
        for s in range(0, SPLITS):
            offs = (n_offs[:, None] * SPLITS + s) * C + c_offs[None, :]
            cnt_b = tl.minimum(M - s * CHUNK, CHUNK).to(tl.float32)
            mean_b = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
            m2_b = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
            cnt, mean, m2 = _chan(cnt, mean, m2, cnt_b, mean_b, m2_b)
        shift_offs = n_offs[:, None].to(tl.int64) * C * M + _offsets(c_offs, tl.arange(0, 1), C, M,
                                                                     CHANNELS_LAST).reshape(1, BLOCK_C)
        mean = (mean + tl.load(x_ptr + shift_offs, mask=mask, other=0.0).to(tl.float64)).to(tl.float32)
        m2 = m2.to(tl.float32)
        nc = n_offs[:, None] * C + c_offs[None, :]
        tl.store(mean_ptr + nc, mean, mask=mask)
        tl.store(var_ptr + nc, m2 / tl.maximum(M - 1, 1), mask=mask)  # 0 when M == 1 (SPEC D4)
        nb = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
        bcnt, bmean, bm2 = _batch_stats_block(bcnt, bmean, bm2, mean, m2, mask, nb, M)
    tl.store(bmean_ptr + c_offs, bmean, mask=c_mask)
    tl.store(bvar_ptr + c_offs, bm2 / nm1, mask=c_mask)  # SPEC D4


# ---------------------------------------------------------------- forward: normalize
@_autotune_map
@triton.jit
def _normalize_kernel(x_ptr, y_ptr, mean_ptr, var_ptr, bmean_ptr, bvar_ptr, smean_ptr, svar_ptr,
                      w_ptr, b_ptr, blend_ptr, N, C, M, ITERS, shrink_k, eps,
                      CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SHRINK: tl.constexpr, NO_INST: tl.constexpr, NO_BATCH: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """SPEC D3: ``y = gamma (x - m) rsqrt(max(v, 0) + eps) + beta`` with x's dtype and layout.

    The prologue forms ``m, v`` for its ``(n, channel block)`` from the (N, C) instance stats,
    the (C,) batch stats and the source stats (a few BLOCK_C-vectors, amortised over ITERS
    tiles), so no separate (N, C) coefficient kernel or buffer is needed.  ``x - m`` is formed
    before scaling (not ``x*scale + shift``), which keeps ``1e4 + noise`` accurate.
    """
    n, c_offs, c_mask = _row(C, BLOCK_C)
    split = tl.program_id(1)
    nc = n * C + c_offs
    mean_i = tl.load(mean_ptr + nc, mask=c_mask, other=0.0)
    var_i = tl.load(var_ptr + nc, mask=c_mask, other=0.0)
    mu_b = tl.load(bmean_ptr + c_offs, mask=c_mask, other=0.0)
    var_b = tl.load(bvar_ptr + c_offs, mask=c_mask, other=0.0)
    smean = tl.load(smean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    svar = tl.load(svar_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    w_s, w_b, w_i = _blend(blend_ptr, NO_INST, NO_BATCH)
    m, v, _, _ = _blended_moments(mean_i, var_i, mu_b, var_b, smean, svar, w_s, w_b, w_i, M, shrink_k, eps,
                          SHRINK)
    scale = tl.rsqrt(tl.maximum(v, 0.0) + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    base = n.to(tl.int64) * C * M
    t0 = split * ITERS
    t1 = tl.minimum(t0 + ITERS, tl.cdiv(M, BLOCK_P))
    for t in range(t0, t1):
        p_offs = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p_offs < M)[None, :]
        offs = base + _offsets(c_offs, p_offs, C, M, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - m[:, None]) * scale[:, None] + shift[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward
@_autotune_reduce
@triton.jit
def _bwd_partial_kernel(dy_ptr, x_ptr, mean_ptr, psdy_ptr, psdyxc_ptr, N, C, M, ITERS, SPLITS,
                        CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Backward pass 1: ``sdy = sum_p dy``, ``sdyxc = sum_p dy (x - mu_i)`` per (n, c, split)
    -> ``(N, SPLITS, C)`` fp64.  Centring on ``mu_i`` keeps the products small.  Each tile is
    summed in fp32 (a tree), the tile sums in fp64 (see the module notes)."""
    n, c_offs, c_mask = _row(C, BLOCK_C)
    split = tl.program_id(1)
    mu = tl.load(mean_ptr + n * C + c_offs, mask=c_mask, other=0.0)
    base = n.to(tl.int64) * C * M
    t0 = split * ITERS
    t1 = tl.minimum(t0 + ITERS, tl.cdiv(M, BLOCK_P))
    sdy = tl.zeros([BLOCK_C], dtype=tl.float64)
    sdyxc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t in range(t0, t1):
        p_offs = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p_offs < M)[None, :]
        offs = base + _offsets(c_offs, p_offs, C, M, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sdy += tl.sum(dy, axis=1).to(tl.float64)
        sdyxc += tl.sum(dy * tl.where(mask, x - mu[:, None], 0.0), axis=1).to(tl.float64)
    out = (n * SPLITS + split) * C + c_offs
    tl.store(psdy_ptr + out, sdy, mask=c_mask)
    tl.store(psdyxc_ptr + out, sdyxc, mask=c_mask)


@triton.jit
def _bwd_terms(psdy_ptr, psdyxc_ptr, mean_ptr, var_ptr, n_offs, c_offs, mask, mu_b, var_b, smean, svar,
               g, w_s, w_b, w_i, C, M, SPLITS, shrink_k, eps, SHRINK: tl.constexpr):
    """SPEC D5: per-(n, c) backward terms of one batch block (names as in reference.dabn_backward);
    the fp64 split partials are added in fp64, then rounded once to fp32."""
    sdy = tl.zeros(mask.shape, dtype=tl.float64)
    sdyxc = tl.zeros(mask.shape, dtype=tl.float64)
    for s in range(0, SPLITS):
        offs = (n_offs[:, None] * SPLITS + s) * C + c_offs[None, :]
        sdy += tl.load(psdy_ptr + offs, mask=mask, other=0.0)
        sdyxc += tl.load(psdyxc_ptr + offs, mask=mask, other=0.0)
    sdy = sdy.to(tl.float32)
    sdyxc = sdyxc.to(tl.float32)
    nc = n_offs[:, None] * C + c_offs[None, :]
    mean_i = tl.load(mean_ptr + nc, mask=mask, other=0.0)
    var_i = tl.load(var_ptr + nc, mask=mask, other=0.0)
    m, v, keep_mu, keep_var = _blended_moments(mean_i, var_i, mu_b[None, :], var_b[None, :], smean[None, :],
                                       svar[None, :], w_s, w_b, w_i, M, shrink_k, eps, SHRINK)
    r = tl.rsqrt(tl.maximum(v, 0.0) + eps)
    sdyxh = r * (sdyxc + (mean_i - m) * sdy)
    dm = -g[None, :] * r * sdy
    dv = tl.where(v >= 0, -0.5 * g[None, :] * r * r * sdyxh, 0.0)
    return mean_i, sdy, sdyxh, r, dm, dv, keep_mu, keep_var


@triton.jit
def _bwd_finalize_kernel(psdy_ptr, psdyxc_ptr, mean_ptr, var_ptr, smean_ptr, svar_ptr, w_ptr, blend_ptr,
                         a_ptr, b_ptr, c0_ptr, dw_ptr, db_ptr, N, C, M, SPLITS, shrink_k, eps, nm, nm1,
                         HAS_WEIGHT: tl.constexpr, SHRINK: tl.constexpr, NO_INST: tl.constexpr,
                         NO_BATCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """SPEC D5, the backward coefficients, per channel block (three fixed-order sweeps over
    batch blocks):

    1. batch stats ``mu_B, var_B`` from the saved ``mu_i, var_i`` (SPEC D4, as in the forward);
    2. ``sdyxh = r (sdyxc + (mu_i - m) sdy)``, ``dbias = sum_n sdy``, ``dweight = sum_n sdyxh``,
       ``dm = -g r sdy``, ``dv = -g r^2 sdyxh / 2`` (0 where v < 0),
       ``dmu_B = w_b sum_n dm``, ``dvar_B = w_b sum_n dv``;
    3. ``dmu_i = w_i dm keep_mu``, ``dvar_i = w_i dv keep_var``,
       ``A = g r``, ``B = 2 dvar_i / (M - 1) + 2 dvar_B / (N M - 1)``,
       ``C0 = dmu_i / M + dmu_B / (N M) + 2 dvar_B (mu_i - mu_B) / (N M - 1)``  -> (N, C).

    Undefined denominators (``M = 1``, ``N M = 1``) meet a zero weight from the edge rules,
    so ``max(., 1)`` only keeps the arithmetic finite.  The edge rules (``NO_INST``,
    ``NO_BATCH``) and ``nm = N M``, ``nm1 = max(N M - 1, 1)`` (floats) come from the host:
    ``N * M`` in int32 wraps at 2^31 elements.  Every ``w * term`` is
    ``_weighted(w, term)`` (and the ``mu_i - mu_B`` term is dropped where ``dvar_B = 0``): a
    statistic of weight 0, an inf/NaN one included, never reaches the coefficients.
    dweight/dbias are plain fixed-order sums over the batch: deterministic, no atomics.
    """
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    smean = tl.load(smean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    svar = tl.load(svar_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_C], dtype=tl.float32) + 1.0
    if HAS_WEIGHT:
        g = tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    w_s, w_b, w_i = _blend(blend_ptr, NO_INST, NO_BATCH)

    bcnt = 0.0
    mu_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    bm2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        nc = n_offs[:, None] * C + c_offs[None, :]
        mean_i = tl.load(mean_ptr + nc, mask=mask, other=0.0)
        m2_i = tl.load(var_ptr + nc, mask=mask, other=0.0) * (M - 1)
        nb = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
        bcnt, mu_b, bm2 = _batch_stats_block(bcnt, mu_b, bm2, mean_i, m2_i, mask, nb, M)
    var_b = bm2 / nm1

    dbias = tl.zeros([BLOCK_C], dtype=tl.float32)
    dweight = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dm = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dv = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        _, sdy, sdyxh, _, dm, dv, _, _ = _bwd_terms(
            psdy_ptr, psdyxc_ptr, mean_ptr, var_ptr, n_offs, c_offs, mask, mu_b, var_b, smean, svar,
            g, w_s, w_b, w_i, C, M, SPLITS, shrink_k, eps, SHRINK)
        dbias += tl.sum(tl.where(mask, sdy, 0.0), axis=0)
        dweight += tl.sum(tl.where(mask, sdyxh, 0.0), axis=0)
        sum_dm += tl.sum(tl.where(mask, dm, 0.0), axis=0)
        sum_dv += tl.sum(tl.where(mask, dv, 0.0), axis=0)
    tl.store(db_ptr + c_offs, dbias, mask=c_mask)
    tl.store(dw_ptr + c_offs, dweight, mask=c_mask)
    dmu_bt = _weighted(w_b, sum_dm)
    dvar_bt = _weighted(w_b, sum_dv)

    for n0 in range(0, N, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        mask = (n_offs < N)[:, None] & c_mask[None, :]
        mean_i, _, _, r, dm, dv, keep_mu, keep_var = _bwd_terms(
            psdy_ptr, psdyxc_ptr, mean_ptr, var_ptr, n_offs, c_offs, mask, mu_b, var_b, smean, svar,
            g, w_s, w_b, w_i, C, M, SPLITS, shrink_k, eps, SHRINK)
        dmu_i = _weighted(w_i, dm * keep_mu)
        dvar_i = _weighted(w_i, dv * keep_var)
        coef_a = g[None, :] * r
        coef_b = 2.0 * dvar_i / tl.maximum(M - 1, 1) + 2.0 * dvar_bt[None, :] / nm1
        coef_c = (dmu_i / M + dmu_bt[None, :] / nm
                  + _weighted(2.0 * dvar_bt[None, :] / nm1, mean_i - mu_b[None, :]))
        nc = n_offs[:, None] * C + c_offs[None, :]
        tl.store(a_ptr + nc, coef_a, mask=mask)
        tl.store(b_ptr + nc, coef_b, mask=mask)
        tl.store(c0_ptr + nc, coef_c, mask=mask)


@_autotune_map
@triton.jit
def _bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, a_ptr, b_ptr, c0_ptr, N, C, M, ITERS,
                   CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """SPEC D5 pass 2: ``dx = A dy + B (x - mu_i) + C0`` with x's dtype and layout; the B term
    only where ``B != 0`` (a plane with an inf/NaN pixel has ``x - mu_i`` inf/NaN)."""
    n, c_offs, c_mask = _row(C, BLOCK_C)
    split = tl.program_id(1)
    nc = n * C + c_offs
    mu = tl.load(mean_ptr + nc, mask=c_mask, other=0.0)
    coef_a = tl.load(a_ptr + nc, mask=c_mask, other=0.0)
    coef_b = tl.load(b_ptr + nc, mask=c_mask, other=0.0)
    coef_c = tl.load(c0_ptr + nc, mask=c_mask, other=0.0)
    base = n.to(tl.int64) * C * M
    t0 = split * ITERS
    t1 = tl.minimum(t0 + ITERS, tl.cdiv(M, BLOCK_P))
    for t in range(t0, t1):
        p_offs = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (p_offs < M)[None, :]
        offs = base + _offsets(c_offs, p_offs, C, M, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = coef_a[:, None] * dy + _weighted(coef_b[:, None], x - mu[:, None]) + coef_c[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- diversity angles (SPEC §2)
@_autotune_reduce
@triton.jit
def _angles_partial_kernel(x_ptr, smean_ptr, bmean_ptr, part_ptr, N, C, M, P_TILES,
                           CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per (n, pixel tile): ``sum_p cos[n, p]`` -> ``part (N, P_TILES)`` fp32.  One-axis grid
    of ``N * P_TILES`` programs, program ``n * P_TILES + pt`` (grid axes 1 and 2 stop at 65,535:
    a batch on one of them would not launch beyond that).

    ``a = mu_s - x``, ``b = mu_B - x`` as direct fp32 differences (no expanded dot product),
    accumulated over channel blocks: ``<a, b>``, ``|a|^2``, ``|b|^2`` per pixel, then
    ``cos = <a, b> / (max(|a|, 1e-10) max(|b|, 1e-10))``; padding pixels add 0.
    """
    pid = tl.program_id(0)
    n = pid // P_TILES
    pt = pid % P_TILES
    p_offs = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p_offs < M
    base = x_ptr + n.to(tl.int64) * C * M
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    na = tl.zeros([BLOCK_P], dtype=tl.float32)
    nb = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_offs = c0 + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        mask = c_mask[:, None] & p_mask[None, :]
        x = tl.load(base + _offsets(c_offs, p_offs, C, M, CHANNELS_LAST), mask=mask, other=0.0)
        x = x.to(tl.float32)
        sm = tl.load(smean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        bm = tl.load(bmean_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        a = tl.where(mask, sm[:, None] - x, 0.0)
        b = tl.where(mask, bm[:, None] - x, 0.0)
        dot += tl.sum(a * b, axis=0)
        na += tl.sum(a * a, axis=0)
        nb += tl.sum(b * b, axis=0)
    cos = dot / (tl.maximum(tl.sqrt(na), 1e-10) * tl.maximum(tl.sqrt(nb), 1e-10))
    tl.store(part_ptr + n * P_TILES + pt, tl.sum(tl.where(p_mask, cos, 0.0), axis=0))


@triton.jit
def _angles_finalize_kernel(part_ptr, mean_cos_ptr, M, P_TILES, BLOCK: tl.constexpr):
    """``mean_p cos[n, p]`` -> ``mean_cos (N,)`` fp64: fixed-order sum of one row of fp32
    partials in fp64 (an fp32 total of 2^31 cosines of 1 stops at 2^30; and the arccos near 0
    turns a rounding of the mean into ``sqrt(2 * rounding)``, so the mean stays fp64)."""
    n = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t0 in range(0, P_TILES, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + n * P_TILES + offs, mask=offs < P_TILES, other=0.0).to(tl.float64)
    tl.store(mean_cos_ptr + n, tl.sum(acc, axis=0) / M)
