"""Public functional API (mirrors ``torch.nn.functional`` style).

``instance_stats``, ``diversity_score`` and ``dabn`` validate their inputs once, pick a
backend from the table in ``backends/`` and call the ``torch.ops.datta`` custom ops.
No function here syncs with the device: shape checks are host-side, blend tensors on an
accelerator are checked with an asynchronous device assert.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends, ops
from . import reference as ref
from .cluster import cluster_labels, cluster_moments
from .presets import DISPERSION_PARTS, PRESETS

__all__ = ["instance_stats", "diversity_score", "dabn", "cluster_dabn", "blend_tensor",
           "available_backends", "PRESETS", "SCORE_MODES"]

#: Diversity score modes (SPEC §2): exact per-pixel angles, their instance-mean approximation,
#: and the spread of source-standardised instance statistics.
SCORE_MODES = ("pixel", "instance", "dispersion")

available_backends = backends.available_backends

_BLEND_TOL = 1e-4  # weights are user floats (0.85 + 0.15): allow rounding, reject real errors


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); statistics are undefined")


def _check_channel_vec(t: Tensor | None, name: str, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must have shape ({x.shape[1]},) to match x's channels, "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _blend_tol(dtype: torch.dtype) -> float:
    """Sum tolerance of blend weights stored in ``dtype``: ``_BLEND_TOL``, or three roundings
    of a coarser dtype (fp16 stores 0.85 + 0.15 as 1.00012, bf16 as 1.00195)."""
    return max(_BLEND_TOL, 3 * torch.finfo(dtype).eps)


def _check_weights(w: Sequence[float], tol: float = _BLEND_TOL) -> None:
    if len(w) != 3:
        raise ValueError(f"blend must have 3 weights (w_s, w_b, w_i), got {len(w)}")
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ValueError(f"blend weights must be finite and >= 0, got {tuple(w)}")
    if abs(sum(w) - 1.0) > tol:
        raise ValueError(f"blend weights must sum to 1, got {tuple(w)} (sum {sum(w)})")


def blend_tensor(blend: Tensor | Sequence[float] | str, device: torch.device | str | None = None,
                 decision: str = "single", dtype: torch.dtype = torch.float32, *,
                 check: bool = True) -> Tensor:
    """A validated length-3 blend tensor (float32 unless ``dtype`` says otherwise) from
    weights, a tensor or a preset name (``decision`` picks the preset's row); ``check=False``
    skips the value check of a tensor (its shape and dtype are still checked)."""
    if isinstance(blend, str):
        if blend not in PRESETS:
            raise ValueError(f"unknown preset {blend!r}; choose one of {sorted(PRESETS)}")
        blend = getattr(PRESETS[blend], decision)
    if isinstance(blend, Tensor):
        if blend.shape != (3,) or not blend.is_floating_point():
            raise ValueError(f"blend tensor must be float with shape (3,), got "
                             f"{blend.dtype} {tuple(blend.shape)}")
        if check:
            _check_blend_values(blend)
        return blend.to(device=device if device is not None else blend.device, dtype=dtype)
    try:
        w = [float(v) for v in blend]
    except (TypeError, ValueError):
        raise TypeError("blend must be a length-3 tensor, a sequence of 3 weights (w_s, w_b, w_i) "
                        f"or a preset name, got {blend!r}") from None
    _check_weights(w)
    return torch.tensor(w, dtype=dtype, device=device)


#: id(blend) -> (weak reference, version counter) of blend tensors whose values were checked
_CHECKED_BLENDS: dict[int, tuple[weakref.ref, int]] = {}


def _check_blend_values(blend: Tensor) -> None:
    """Value checks on a blend tensor without a host sync (async assert on accelerators).

    A tensor already checked and not written since (same object, same version counter: every
    in-place write through it or a view bumps it) is not checked again: on a GPU the check is
    ~8 tiny launches, as much host time as the DABN call itself (an H200's host: 185 -> 38 us
    a forward call, bench/results/h200_profile_aa395c1.md -> h200_profile.md).
    """
    if torch.compiler.is_compiling():
        return
    try:
        version = blend._version
    except RuntimeError:           # an inference-mode tensor has no version counter
        version = None
    key = id(blend)
    seen = _CHECKED_BLENDS.get(key)
    if version is not None and seen is not None and seen[0]() is blend and seen[1] == version:
        return
    if blend.device.type == "cpu":
        _check_weights(blend.tolist(), _blend_tol(blend.dtype))
    else:
        ok = (blend >= 0).all() & ((blend.sum() - 1).abs() <= _blend_tol(blend.dtype))
        torch._assert_async(ok, "blend weights must be >= 0 and sum to 1")
    if version is not None:
        _CHECKED_BLENDS[key] = (weakref.ref(blend, lambda _, k=key: _CHECKED_BLENDS.pop(k, None)), version)


def _backend_for(x: Tensor, backend: str | None) -> str:
    return backends.resolve(backend, x.device.type, x.dtype)


def instance_stats(x: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and unbiased variance over (H, W).

    x: (N, C, H, W) with H*W >= 2 -> (mean, var), each (N, C) float32 (float64 for float64 x).
    Carries no gradient.
    """
    _check_x(x)
    if x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"instance variance is undefined for H*W = {x.shape[2] * x.shape[3]} "
                         "(unbiased variance needs at least 2 pixels)")
    return ops.instance_stats_op(x.detach(), _backend_for(x, backend))


def diversity_score(x: Tensor, source_mean: Tensor, *, mode: str = "pixel", stat: str = "std",
                    source_var: Tensor | None = None, eps: float = 1e-5,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The DD diversity score of SPEC §2 on the input of the score layer.

    x: (N, C, H, W); source_mean, source_var: (C,) -> (score, per_sample): a 0-dim and an (N,)
    float32 tensor on x's device (no host sync, no gradient).

    * ``mode="pixel"`` (the authors' score): per_sample = the angles ``theta[n]`` (radians);
      exact, one extra pass over x.
    * ``mode="instance"``: an APPROXIMATION of pixel (per-instance mean vectors instead of
      pixels, no extra pass over x); per_sample = its angles.
    * ``mode="dispersion"``: mean over features of the population std over the batch of the
      source-standardised instance statistics (needs ``source_var`` and the layer's ``eps``);
      per_sample = each sample's RMS distance to the batch centre in those units.  No extra
      pass over x.

    ``stat="var"`` returns the variance instead of the std.
    """
    _check_x(x)
    check_score_args(x, source_mean, source_var, mode, stat)
    name = _backend_for(x, backend)
    mean_i, var_i = ops.run_instance_stats(x.detach(), name)
    return score_from_stats(x, mean_i, var_i, source_mean, source_var, mode=mode, stat=stat,
                            eps=eps, backend=name)


def check_score_args(x: Tensor, source_mean: Tensor, source_var: Tensor | None, mode: str,
                     stat: str) -> None:
    """Validate the score arguments once (host-side shape/name checks, no sync)."""
    _check_channel_vec(source_mean, "source_mean", x)
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if stat not in ("std", "var"):
        raise ValueError(f"stat must be 'std' or 'var', got {stat!r}")
    if mode == "dispersion":
        if source_var is None:
            raise ValueError("mode='dispersion' needs source_var (the layer's running_var)")
        _check_channel_vec(source_var, "source_var", x)


def score_from_stats(x: Tensor, mean_i: Tensor, var_i: Tensor, source_mean: Tensor,
                     source_var: Tensor | None, *, mode: str, stat: str = "std", eps: float = 1e-5,
                     backend: str) -> tuple[Tensor, Tensor]:
    """``(score, per_sample)`` from the instance statistics ``(N, C)`` of x (already computed
    by the caller, who reuses them to normalise).  Only ``"pixel"`` reads x again."""
    source_mean = source_mean.detach()
    if mode == "dispersion":
        return backends.get(backend).impl().dispersion_score(
            mean_i, var_i, source_mean, source_var.detach(), x.shape[2] * x.shape[3], eps,
            DISPERSION_PARTS, stat)
    mu_b = mean_i.mean(dim=0)
    if mode == "pixel":
        angles = ops.diversity_angles_op(x.detach(), source_mean, mu_b, backend)
    else:   # a few (N, C) torch ops: the reference's are the implementation
        angles = ref.diversity_angles_instance(mean_i, source_mean, mu_b)
    angles = angles.float()
    return ref.score_from_angles(angles, stat), angles


def dabn(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
         source_var: Tensor, blend: Tensor | Sequence[float], *, shrink_k: float | None = None,
         eps: float = 1e-5, backend: str = "auto",
         stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Diversity-adaptive BatchNorm (SPEC §3).

    x: (N, C, H, W) float32/float16/bfloat16/float64, NCHW or channels_last;
    weight, bias: (C,) or None; source_mean, source_var: (C,);
    blend: (w_s, w_b, w_i) as a length-3 tensor (preferred: changing values never
    recompile) or a sequence of floats, >= 0 and summing to 1.
    stats: optional ``(mean_i, var_i)`` ``(N, C)`` = ``instance_stats(x)`` computed by the
    caller (e.g. for a diversity score): the statistics pass is then skipped (one read of x
    instead of two); gradients still flow to x through them.
    Returns y with x's shape, dtype and memory format; differentiable w.r.t. x, weight, bias.
    """
    return _dabn(x, weight, bias, source_mean, source_var, blend, shrink_k=shrink_k, eps=eps,
                 backend=backend, stats=stats, check_blend=True)


def _dabn(x, weight, bias, source_mean, source_var, blend, *, shrink_k, eps, backend, stats,
          check_blend: bool) -> Tensor:
    """:func:`dabn`; ``check_blend=False`` skips the value check of a blend tensor whose values
    the caller guarantees (a ``FusedDABN`` picks one of its checked blend buffers)."""
    _check_x(x)
    for t, name in ((weight, "weight"), (bias, "bias"), (source_mean, "source_mean"),
                    (source_var, "source_var")):
        _check_channel_vec(t, name, x)
    if shrink_k is not None:
        shrink_k = float(shrink_k)
        if not math.isfinite(shrink_k) or shrink_k < 0:
            raise ValueError(f"shrink_k must be a finite number >= 0 or None, got {shrink_k}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    # float64 inputs (gradcheck) keep float64 weights; everything else computes in float32
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(blend, Tensor):
        if blend.device != x.device:
            raise ValueError(f"blend is on {blend.device} but x is on {x.device}")
        blend = blend_tensor(blend, dtype=torch.promote_types(blend.dtype, wdt), check=check_blend)
    else:
        blend = blend_tensor(blend, device=x.device, dtype=wdt)
    if stats is not None:
        _check_stats(stats, x)
    name = _backend_for(x, backend)
    return ops.run_dabn(x, weight, bias, source_mean.detach(), source_var.detach(), blend.detach(),
                    shrink_k, float(eps), name, stats=stats)


def cluster_dabn(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                 source_var: Tensor, blend: Tensor, *, eps: float = 1e-5, backend: str = "auto",
                 stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Cluster-aware DABN (SPEC §3b, DYN's CABN): :func:`dabn` whose instance terms are the
    pooled statistics of each sample's FINCH cluster (:func:`~datta_kernels.cluster_labels` on
    the instance means), the batch and source terms as in D3.

    ``blend`` a length-3 tensor (as :func:`dabn`); no shrink.  Without a graph to record: one
    pass of the backend's instance statistics (skipped when ``stats`` are given), the tiny
    ``(N, C)`` clustering and blend on the device, one fused normalisation pass: 2 reads and 1
    write of x, no host sync.  When ``x`` needs a gradient the statistics are recomputed by
    differentiable PyTorch ops (the labels are constants); when only ``weight``/``bias`` do,
    the normalisation is.
    """
    _check_x(x)
    for t, name in ((weight, "weight"), (bias, "bias"), (source_mean, "source_mean"),
                    (source_var, "source_var")):
        _check_channel_vec(t, name, x)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if not isinstance(blend, Tensor) or blend.shape != (3,) or blend.device != x.device:
        raise ValueError(f"blend must be a length-3 tensor on {x.device}")
    name = _backend_for(x, backend)
    grad = torch.is_grad_enabled()
    x_grad = grad and x.requires_grad
    if x_grad:
        mean_i, var_i = ref.instance_stats(x)
    elif stats is not None:
        _check_stats(stats, x)
        mean_i, var_i = stats
    else:
        mean_i, var_i = ops.run_instance_stats(x, name)
    pooled = cluster_moments(mean_i, var_i, cluster_labels(mean_i.detach()), eps)
    m = x.shape[2] * x.shape[3]
    mean, var = ref.blend_moments(mean_i, var_i, source_mean.detach(), source_var.detach(),
                                  blend.detach().to(mean_i.dtype), m, None, eps, instance=pooled)
    if x_grad or (grad and any(t is not None and t.requires_grad for t in (weight, bias))):
        y = ref.normalize(x, mean, var, weight, bias, eps)
        fmt = torch.channels_last if ops.is_channels_last(x) else torch.contiguous_format
        return y.contiguous(memory_format=fmt)
    return normalize_with_moments(x, mean, var, weight, bias, eps, name)


def _check_stats(stats, x: Tensor) -> None:
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2
            and all(isinstance(t, Tensor) for t in stats)):
        raise TypeError("stats must be a pair (mean_i, var_i) of tensors")
    for t, name in zip(stats, ("mean_i", "var_i")):
        if t.shape != x.shape[:2] or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"stats {name} must be a floating-point {tuple(x.shape[:2])} tensor "
                             f"on {x.device} (instance_stats(x)), got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


#: the blend (0, 0, 1) per (device, dtype): given moments stand in for the instance statistics
_PURE_INSTANCE: dict = {}


def normalize_with_moments(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                           bias: Tensor | None, eps: float, backend: str) -> Tensor:
    """SPEC D3's last step with given per-(n, c) moments ``(N, C)``: ``y = gamma (x - m)
    rsqrt(max(v, 0) + eps) + beta`` in x's dtype and memory format.  One read and one write of
    x by the backend's fused ``dabn_normalize`` called with the blend ``(0, 0, 1)``: the given
    moments take the place of the instance statistics (no shrink, source unused).

    Forward only: an autograd graph through the result would treat the moments as x's
    instance statistics.  Callers record no graph (the cluster-aware layer without grad) or
    wrap it in their own ``autograd.Function`` (the synced layer)."""
    if backend == "reference" or x.shape[0] == 0 or x.shape[2] * x.shape[3] <= 1:
        y = ref.normalize(x, mean, var, weight, bias, eps)
        fmt = torch.channels_last if ops.is_channels_last(x) else torch.contiguous_format
        return y.contiguous(memory_format=fmt)
    key = (x.device, mean.dtype)
    if key not in _PURE_INSTANCE:
        _PURE_INSTANCE[key] = torch.tensor([0.0, 0.0, 1.0], dtype=mean.dtype, device=x.device)
    zeros = mean.new_zeros(mean.shape[1])
    return ops.run_dabn(x, weight, bias, zeros, zeros, _PURE_INSTANCE[key], None, eps, backend,
                        stats=(mean, var))
