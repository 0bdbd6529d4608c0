"""The SPEC (``docs/SPEC.md``) written as plain PyTorch.

Every backend is judged against this module.  All statistics are computed in
float32 (float64 stays float64 so ``gradcheck`` can use it); the output has the
input's dtype and memory format.  Each stage is a small function so tests can
probe it on its own.

Shapes: ``x`` is ``(N, C, H, W)``, ``M = H*W``; instance statistics are
``(N, C)``; batch and source statistics are ``(C,)``; ``blend`` is a length-3
tensor ``(w_s, w_b, w_i)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .presets import DISPERSION_PARTS, acc_dtype

__all__ = [
    "instance_stats",
    "batch_stats",
    "effective_blend",
    "shrink_instance_stats",
    "blend_moments",
    "normalize",
    "dabn",
    "dabn_normalize",
    "diversity_angles",
    "diversity_angles_instance",
    "score_from_angles",
    "dispersion_z",
    "dispersion_score",
    "diversity_score",
    "dabn_backward",
    "dabn_backward_sums",
    "dabn_backward_centred",
    "dabn_backward_coefficients",
    "dabn_backward_dx",
    "merge_moments",
]


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and unbiased variance over (H, W) -> two ``(N, C)`` tensors.

    Centred two-pass formula (never E[x^2] - E[x]^2).  When ``M == 1`` the unbiased
    variance is undefined; it is returned as 0 (SPEC D4) and SPEC's edge rule (D1) moves
    the instance weight to the source, so it is never used.
    """
    xf = x.to(acc_dtype(x.dtype))
    m = x.shape[2] * x.shape[3]
    mean = xf.mean(dim=(2, 3))
    if m <= 1:
        return mean, torch.zeros_like(mean)
    var = (xf - mean[:, :, None, None]).square().sum(dim=(2, 3)) / (m - 1)
    return mean, var


def gaussian_sym_kl(mean_b: Tensor, var_b: Tensor, mean_s: Tensor, var_s: Tensor, eps: float) -> Tensor:
    """The symmetric KL divergence between per-channel Gaussians ``(mean_b, var_b)`` and
    ``(mean_s, var_s)`` ``(C,)``, averaged over channels (0-dim): with ``a = var_b + eps``,
    ``b = var_s + eps``, per channel ``(a / b + b / a) / 2 - 1 + (mean_b - mean_s)^2 (1 / a +
    1 / b) / 2`` (SPEC §6 step 5's source shift, §3c's stream divergence)."""
    a, b = var_b + eps, var_s + eps
    d2 = (mean_b - mean_s).square()
    return (0.5 * (a / b + b / a) - 1.0 + 0.5 * d2 * (a.reciprocal() + b.reciprocal())).mean()


def batch_stats(mean_i: Tensor, var_i: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """SPEC D4: batch mean and unbiased variance ``(C,)`` from instance statistics (exact, §1).

    ``mu_B = mean_n mu_i``;  ``(N*M - 1) var_B = sum_n [(M - 1) var_i + M (mu_i - mu_B)^2]``.
    Returns variance 0 when ``N*M <= 1`` (the batch weight then moves to the source).
    """
    n = mean_i.shape[0]
    mu_b = mean_i.mean(dim=0)
    if n * m <= 1:
        return mu_b, torch.zeros_like(mu_b)
    ss = ((m - 1) * var_i + m * (mean_i - mu_b).square()).sum(dim=0)
    return mu_b, ss / (n * m - 1)


def effective_blend(blend: Tensor, n: int, m: int,
                    batch_count: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC D1 (§3 edge rules): weights whose statistics are undefined move to the source.

    ``M <= 1``: ``w_s += w_i, w_i = 0``; ``N*M <= 1``: ``w_s += w_b, w_b = 0``.
    The shapes are static, so this never syncs.  ``batch_count``: the element count of the
    batch whose statistics are used when it is not this one (a 0-dim tensor, e.g. a process
    group's global batch, :mod:`datta_kernels.distributed`); the batch rule then tests it as a
    tensor (still no sync).
    """
    w_s, w_b, w_i = blend[0], blend[1], blend[2]
    if m <= 1:
        w_s, w_i = w_s + w_i, torch.zeros_like(w_i)
    if batch_count is not None:
        has_b = (batch_count > 1).to(w_b.dtype)
        w_s, w_b = w_s + w_b * (1 - has_b), w_b * has_b
    elif n * m <= 1:
        w_s, w_b = w_s + w_b, torch.zeros_like(w_b)
    return w_s, w_b, w_i


def _softshrink(z: Tensor, lam: Tensor) -> Tensor:
    """``sign(z) * max(|z| - lam, 0)`` with a tensor threshold (gradient 1 outside, 0 inside)."""
    return torch.sign(z) * torch.clamp(z.abs() - lam, min=0)


def shrink_instance_stats(
    mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
    m: int, k: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """SPEC D2: NOTE-style shrinkage of instance statistics towards the source (§3).

    ``s_mu = sqrt((var_s + eps) / M)``, ``s_sig = (var_s + eps) sqrt(2 / (M - 1))``,
    ``mu~ = mu_s + softshrink(mu_i - mu_s, k s_mu)``, ``var~ = var_s + softshrink(var_i - var_s, k s_sig)``.
    Requires ``M >= 2`` (for ``M <= 1`` the instance weight is 0 anyway).
    """
    sv = source_var + eps
    s_mu = torch.sqrt(sv / m)
    s_sig = sv * math.sqrt(2.0 / max(m - 1, 1))
    mean_t = source_mean + _softshrink(mean_i - source_mean, k * s_mu)
    var_t = source_var + _softshrink(var_i - source_var, k * s_sig)
    return mean_t, var_t


def weighted(w: Tensor, stat: Tensor) -> Tensor:
    """SPEC D3's weighted term: ``w * stat`` where ``w != 0``, else 0: a statistic with weight
    0 is never read, so an inf/NaN in it cannot leak into the result through
    ``0 * inf = NaN`` (SPEC §3, "Non-finite input").  Selected, not multiplied; the gradient
    of the unselected side is 0."""
    return torch.where(w != 0, w * stat, 0.0)


def blend_moments(
    mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
    blend: Tensor, m: int, shrink_k: float | None, eps: float,
    batch: tuple[Tensor, Tensor, Tensor] | None = None,
    instance: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """SPEC D3: blended per-(n, c) mean and variance ``(N, C)`` (after D1, D4 and D2);
    terms of weight 0 are selected away (:func:`weighted`).  ``batch``: ``(mu_B, var_B,
    count)`` of another batch (``count`` its element count, a 0-dim tensor) instead of D4 on
    these instance statistics.  ``instance``: the ``(N, C)`` statistics of the instance terms
    when they are not ``mean_i, var_i`` (the cluster-pooled ones of SPEC §3b; D4 still reads
    ``mean_i, var_i``)."""
    n = mean_i.shape[0]
    dt = mean_i.dtype
    smean, svar = source_mean.to(dt), source_var.to(dt)
    if batch is None:
        mu_b, var_b = batch_stats(mean_i, var_i, m)
        count = None
    else:
        mu_b, var_b, count = (t.to(dt) for t in batch)
    w_s, w_b, w_i = (w.to(dt) for w in effective_blend(blend, n, m, count))
    if instance is not None:
        mean_i, var_i = instance
    if shrink_k is not None and m > 1:
        mean_i, var_i = shrink_instance_stats(mean_i, var_i, smean, svar, m, shrink_k, eps)
    mean = weighted(w_s, smean) + weighted(w_b, mu_b) + weighted(w_i, mean_i)
    var = weighted(w_s, svar) + weighted(w_b, var_b) + weighted(w_i, var_i)
    return mean, var


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
              bias: Tensor | None, eps: float) -> Tensor:
    """SPEC D3: ``y = gamma (x - m) rsqrt(max(v, 0) + eps) + beta`` with per-(n, c) ``m, v``."""
    dt = mean.dtype
    scale = torch.rsqrt(torch.clamp(var, min=0) + eps)
    if weight is not None:
        scale = scale * weight.to(dt)
    y = (x.to(dt) - mean[:, :, None, None]) * scale[:, :, None, None]
    if bias is not None:
        y = y + bias.to(dt)[None, :, None, None]
    return y.to(x.dtype)


def dabn(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
         source_var: Tensor, blend: Tensor, shrink_k: float | None = None,
         eps: float = 1e-5) -> Tensor:
    """Diversity-adaptive BatchNorm forward (SPEC §3), differentiable by autograd.

    x: (N, C, H, W) any float dtype and layout -> y with x's shape, dtype and memory format.
    """
    mean_i, var_i = instance_stats(x)
    return dabn_normalize(x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                          mean_i, var_i)


def dabn_normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                   source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                   mean_i: Tensor, var_i: Tensor) -> Tensor:
    """:func:`dabn` given the instance statistics ``mean_i, var_i`` ``(N, C)`` of x (as
    :func:`instance_stats` returns them); autograd reaches x through them only if they carry
    a graph."""
    m = x.shape[2] * x.shape[3]
    blend = blend.to(device=x.device, dtype=mean_i.dtype)
    mean, var = blend_moments(mean_i, var_i, source_mean.detach(), source_var.detach(),
                              blend.detach(), m, shrink_k, eps)
    y = normalize(x, mean, var, weight, bias, eps)
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def diversity_angles(x: Tensor, source_mean: Tensor, batch_mean: Tensor) -> Tensor:
    """Pixel-mode angles ``theta[n]`` in radians, ``(N,)`` float32 (SPEC §2).

    ``a = mu_s - x[n, :, p]``, ``b = mu_B - x[n, :, p]`` as direct differences,
    ``cos = <a, b> / (max(|a|, 1e-10) max(|b|, 1e-10))``, ``theta = arccos(clamp(mean_p cos))``.
    """
    dt = acc_dtype(x.dtype)
    xf = x.to(dt)
    a = source_mean.to(dt)[None, :, None, None] - xf
    b = batch_mean.to(dt)[None, :, None, None] - xf
    return _angles(a, b, dim=1).mean(dim=(1, 2)).clamp(-1, 1).arccos()


def diversity_angles_instance(mean_i: Tensor, source_mean: Tensor, batch_mean: Tensor) -> Tensor:
    """APPROXIMATION of :func:`diversity_angles`: ``x[n, :, p]`` replaced by ``mu_i[n, :]``."""
    dt = mean_i.dtype
    a = source_mean.to(dt)[None, :] - mean_i
    b = batch_mean.to(dt)[None, :] - mean_i
    return _angles(a, b, dim=1).clamp(-1, 1).arccos()


def _angles(a: Tensor, b: Tensor, dim: int) -> Tensor:
    dot = (a * b).sum(dim=dim)
    na = a.square().sum(dim=dim).sqrt().clamp(min=1e-10)
    nb = b.square().sum(dim=dim).sqrt().clamp(min=1e-10)
    return dot / (na * nb)


def score_from_angles(angles: Tensor, stat: str = "std") -> Tensor:
    """Population std (``stat="std"``) or variance (``"var"``) of the angles -> 0-dim tensor."""
    var = (angles - angles.mean()).square().mean()
    return var.sqrt() if stat == "std" else var


def dispersion_z(mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                 m: int, eps: float, parts: str = DISPERSION_PARTS) -> Tensor:
    """Standardised instance statistics ``(N, F)`` (SPEC §2, dispersion mode).

    ``z_mu = (mu_i - mu_s) / sqrt(var_s + eps)`` (C columns) and
    ``z_sigma = log((var_i + eps) / (var_s + eps)) / 2`` (C columns), concatenated as
    ``parts`` says.  With ``M <= 1`` the instance variance is undefined (SPEC §1 edge rule)
    and only ``z_mu`` is used, whatever ``parts`` says.
    """
    if parts not in ("mean", "logstd", "both"):
        raise ValueError(f"parts must be 'mean', 'logstd' or 'both', got {parts!r}")
    dt = mean_i.dtype
    sv = source_var.to(dt) + eps
    cols = []
    if parts in ("mean", "both") or m <= 1:
        cols.append((mean_i - source_mean.to(dt)) * torch.rsqrt(sv))
    if parts in ("logstd", "both") and m > 1:
        cols.append(0.5 * torch.log((var_i + eps) / sv))
    return torch.cat(cols, dim=1)


def dispersion_score(mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                     m: int, eps: float, parts: str = DISPERSION_PARTS,
                     stat: str = "std") -> tuple[Tensor, Tensor]:
    """``(score, per_sample)`` of the dispersion mode (SPEC §2) from instance statistics.

    ``score = mean_f std_n z[n, f]`` (population std over the batch, mean over the features of
    :func:`dispersion_z`); ``per_sample[n] = sqrt(mean_f (z[n, f] - mean_n z[., f])^2)``, how far
    sample n lies from the batch centre in source-standardised units (so
    ``mean_n per_sample^2 = mean_f var_n z``).  ``N = 1`` gives 0.  ``stat="var"`` returns
    ``mean_f var_n z`` instead.  Shapes: mean_i, var_i (N, C); source stats (C,) -> a 0-dim and
    an (N,) float32 tensor.
    """
    z = dispersion_z(mean_i, var_i, source_mean, source_var, m, eps, parts).float()
    dev = z - z.mean(dim=0)
    var_f = dev.square().mean(dim=0)
    per_sample = dev.square().mean(dim=1).sqrt()
    score = var_f.sqrt().mean() if stat == "std" else var_f.mean()
    return score, per_sample


def diversity_score(x: Tensor, source_mean: Tensor, mode: str = "pixel",
                    stat: str = "std", source_var: Tensor | None = None,
                    eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``(score, per_sample)`` on the input of the score layer (SPEC §2): per-sample angles for
    ``"pixel"``/``"instance"``, distances to the batch centre for ``"dispersion"``."""
    with torch.no_grad():
        mean_i, var_i = instance_stats(x)
        m = x.shape[2] * x.shape[3]
        if mode == "dispersion":
            return dispersion_score(mean_i, var_i, source_mean, source_var, m, eps, stat=stat)
        mu_b, _ = batch_stats(mean_i, var_i, m)
        if mode == "pixel":
            angles = diversity_angles(x, source_mean, mu_b)
        else:
            angles = diversity_angles_instance(mean_i, source_mean, mu_b)
        angles = angles.float()
        return score_from_angles(angles, stat), angles


def dabn_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, source_mean: Tensor, source_var: Tensor,
    blend: Tensor, shrink_k: float | None, eps: float, mean_i: Tensor, var_i: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit backward of :func:`dabn` -> ``(dx, dweight, dbias)`` (dweight/dbias ``(C,)`` fp32).

    SPEC D5 (the backward coefficients).  This is the formula the fused kernels implement
    (tested against autograd).  Names:
    ``m, v`` blended moments ``(N, C)``, ``r = rsqrt(max(v, 0) + eps)``, ``g = gamma``,
    ``xc = x - mu_i`` (centred on the instance mean: stable for large offsets).

    Pass 1 (reads x, dy):  ``sdy = sum_p dy``,  ``sdyxc = sum_p dy * xc``.
    Per (n, c) (tiny): :func:`dabn_backward_coefficients`.
    Pass 2 (reads x, dy, writes dx):  ``dx = A dy + B xc + C0`` (:func:`dabn_backward_dx`).
    """
    dyf, xc, sdy, sdyxc = dabn_backward_sums(dy, x, mean_i)
    a, coef_b, coef_c, dweight, dbias = dabn_backward_coefficients(
        sdy, sdyxc, weight, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i,
        x.shape[2] * x.shape[3])
    return dabn_backward_dx(dyf, xc, a, coef_b, coef_c, x), dweight, dbias


def dabn_backward_sums(dy: Tensor, x: Tensor, mean_i: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPEC D5's pass 1 -> ``(dy, xc, sdy, sdyxc)``: dy and ``xc = x - mu_i`` in the statistics
    dtype, ``sdy = sum_p dy`` and ``sdyxc = sum_p dy * xc`` ``(N, C)``."""
    dyf, xc = dabn_backward_centred(dy, x, mean_i)
    sdyxc = torch.linalg.vecdot(dyf.flatten(2), xc.flatten(2))   # no dy * xc temporary
    return dyf, xc, dyf.sum(dim=(2, 3)), sdyxc


def dabn_backward_centred(dy: Tensor, x: Tensor, mean_i: Tensor) -> tuple[Tensor, Tensor]:
    """``(dy, xc = x - mu_i)`` in the statistics dtype: what both D5 passes read."""
    dt = mean_i.dtype
    return dy.to(dt), x.to(dt) - mean_i[:, :, None, None]


def dabn_backward_coefficients(
    sdy: Tensor, sdyxc: Tensor, weight: Tensor | None, source_mean: Tensor, source_var: Tensor,
    blend: Tensor, shrink_k: float | None, eps: float, mean_i: Tensor, var_i: Tensor, m: int,
    batch: tuple[Tensor, Tensor, Tensor] | None = None, sum_batch=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SPEC D5, the per-(n, c) step of :func:`dabn_backward` -> ``(A, B, C0, dweight, dbias)``::

        sdyxh = r * (sdyxc + (mu_i - m) * sdy)                  (= sum_p dy * xhat)
        dbias = sum_n sdy,  dweight = sum_n sdyxh
        dm = -g r sdy,  dv = -g r^2 sdyxh / 2 (0 where v < 0, the clamp)
        dmu_i = w_i dm [|mu_i - mu_s| > k s_mu],  dvar_i = w_i dv [|var_i - var_s| > k s_sig]
        dmu_B = w_b sum_n dm,  dvar_B = w_b sum_n dv
        A = g r,  B = 2 dvar_i / (M - 1) + 2 dvar_B / (N M - 1)
        C0 = dmu_i / M + dmu_B / (N M) + 2 dvar_B (mu_i - mu_B) / (N M - 1)

    Every ``w * term`` is :func:`weighted` (a statistic of weight 0 is not read).  ``batch``
    ``(mu_B, var_B, count)`` as in :func:`blend_moments` (``N M`` is then ``count``);
    ``sum_batch``: applied to the packed ``(2C,)`` ``[dmu_B, dvar_B]`` (a sum over the ranks
    of a process group), or None to leave ``B, C0`` without the batch terms' other members.
    """
    dt = mean_i.dtype
    n = mean_i.shape[0]
    smean, svar = source_mean.to(dt), source_var.to(dt)
    if batch is None:
        mu_b, var_b = batch_stats(mean_i, var_i, m)
        count = torch.full((), float(n * m), dtype=dt, device=mean_i.device)
        w_s, w_b, w_i = (t.to(dt) for t in effective_blend(blend.to(dt), n, m))
    else:
        mu_b, var_b, count = (t.to(dt) for t in batch)
        w_s, w_b, w_i = (t.to(dt) for t in effective_blend(blend.to(dt), n, m, count))
    mean_t, var_t = mean_i, var_i
    keep_mu = keep_var = torch.ones_like(mean_i)
    if shrink_k is not None and m > 1:
        mean_t, var_t = shrink_instance_stats(mean_i, var_i, smean, svar, m, shrink_k, eps)
        sv = svar + eps
        keep_mu = ((mean_i - smean).abs() > shrink_k * torch.sqrt(sv / m)).to(dt)
        keep_var = ((var_i - svar).abs() > shrink_k * sv * math.sqrt(2.0 / (m - 1))).to(dt)
    mean = weighted(w_s, smean) + weighted(w_b, mu_b) + weighted(w_i, mean_t)
    var = weighted(w_s, svar) + weighted(w_b, var_b) + weighted(w_i, var_t)
    r = torch.rsqrt(var.clamp(min=0) + eps)
    g = weight.to(dt).expand_as(r) if weight is not None else torch.ones_like(r)

    sdyxh = r * (sdyxc + (mean_i - mean) * sdy)
    dbias, dweight = sdy.sum(dim=0), sdyxh.sum(dim=0)
    dm = -g * r * sdy
    dv = torch.where(var >= 0, -0.5 * g * r * r * sdyxh, torch.zeros_like(var))
    # Unused statistics stay unread (weighted() selects): with w_i = w_b = 0 an inf pixel
    # reaches dweight (it is in sum dy xhat) but not dx = g r dy.
    dmu_i, dvar_i = weighted(w_i, dm * keep_mu), weighted(w_i, dv * keep_var)
    dmu_b, dvar_b = weighted(w_b, dm.sum(dim=0)), weighted(w_b, dv.sum(dim=0))
    if sum_batch is not None:
        dmu_b, dvar_b = sum_batch(torch.cat([dmu_b, dvar_b])).to(dt).chunk(2)
    coef_b = torch.zeros_like(r)
    coef_c = dmu_i / m + dmu_b / count.clamp(min=1)
    if m > 1:
        coef_b = coef_b + 2 * dvar_i / (m - 1)
    # the batch variance terms only where count > 1 (w_b is 0 there otherwise: D1)
    inv_c1 = torch.where(count > 1, 1 / (count - 1).clamp(min=1), torch.zeros_like(count))
    coef_b = coef_b + 2 * dvar_b * inv_c1
    coef_c = coef_c + weighted(2 * dvar_b * inv_c1, mean_i - mu_b)
    return g * r, coef_b, coef_c, dweight, dbias


def dabn_backward_dx(dyf: Tensor, xc: Tensor, a: Tensor, coef_b: Tensor, coef_c: Tensor,
                     x: Tensor) -> Tensor:
    """SPEC D5's pass 2: ``dx = A dy + B xc + C0`` in x's dtype and memory format; the B term
    only where ``B != 0`` (xc is inf/NaN on a plane with a non-finite pixel)."""
    b = coef_b[:, :, None, None]
    dx = torch.addcmul(coef_c[:, :, None, None], dyf, a[:, :, None, None])
    dx.addcmul_(torch.where(b != 0, xc, 0.0), b)       # weighted(b, xc) in two passes
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return dx.to(x.dtype).contiguous(memory_format=fmt)


def merge_moments(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank moments, in rank order.

    rows: ``(W, 1 + 2F)`` float64, row r = ``[count_r, mean_r (F), M2_r (F)]`` -> ``(count,
    mean (F), M2 (F))`` of the union.  A row with count 0 changes nothing.  A fixed sequence
    of float64 operations on the same gathered tensor: every rank gets bitwise the same result.
    """
    f = (rows.shape[1] - 1) // 2
    count, mean, m2 = rows[0, 0], rows[0, 1:1 + f], rows[0, 1 + f:]
    for r in range(1, rows.shape[0]):
        n_b, mean_b, m2_b = rows[r, 0], rows[r, 1:1 + f], rows[r, 1 + f:]
        n_ab = count + n_b
        safe = n_ab.clamp(min=1)
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe)
        m2 = m2 + m2_b + delta.square() * (count * n_b / safe)
        count = n_ab
    return count, mean, m2
