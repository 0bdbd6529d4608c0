"""Public functional API (mirrors ``torch.nn.functional`` style).

``instance_stats``, ``diversity_score`` and ``dabn`` validate their inputs once, pick a
backend from the table in ``backends.py`` and call the ``torch.ops.datta`` custom ops.
No function here syncs with the device: shape checks are host-side, blend tensors on an
accelerator are checked with an asynchronous device assert.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends, ops
from .reference import PRESETS, score_from_angles

__all__ = ["instance_stats", "diversity_score", "dabn", "blend_tensor", "available_backends",
           "PRESETS"]

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
                 decision: str = "single", dtype: torch.dtype = torch.float32) -> Tensor:
    """A validated length-3 blend tensor (float32 unless ``dtype`` says otherwise) from
    weights, a tensor or a preset name (``decision`` picks the preset's row)."""
    if isinstance(blend, str):
        if blend not in PRESETS:
            raise ValueError(f"unknown preset {blend!r}; choose one of {sorted(PRESETS)}")
        blend = getattr(PRESETS[blend], decision)
    if isinstance(blend, Tensor):
        if blend.shape != (3,) or not blend.is_floating_point():
            raise ValueError(f"blend tensor must be float with shape (3,), got "
                             f"{blend.dtype} {tuple(blend.shape)}")
        _check_blend_values(blend)
        return blend.to(device=device if device is not None else blend.device, dtype=dtype)
    try:
        w = [float(v) for v in blend]
    except (TypeError, ValueError):
        raise TypeError("blend must be a length-3 tensor, a sequence of 3 weights (w_s, w_b, w_i) "
                        f"or a preset name, got {blend!r}") from None
    _check_weights(w)
    return torch.tensor(w, dtype=dtype, device=device)


def _check_blend_values(blend: Tensor) -> None:
    """Value checks on a blend tensor without a host sync (async assert on accelerators)."""
    if torch.compiler.is_compiling():
        return
    if blend.device.type == "cpu":
        _check_weights(blend.tolist(), _blend_tol(blend.dtype))
        return
    ok = (blend >= 0).all() & ((blend.sum() - 1).abs() <= _blend_tol(blend.dtype))
    torch._assert_async(ok, "blend weights must be >= 0 and sum to 1")


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
    return ops.instance_stats(x.detach(), _backend_for(x, backend))


def diversity_score(x: Tensor, source_mean: Tensor, *, mode: str = "pixel", stat: str = "std",
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The DD diversity score of SPEC §2 on a first-layer input.

    x: (N, C, H, W); source_mean: (C,) -> (score, angles): a 0-dim and an (N,) float32 tensor
    on x's device (no host sync, no gradient).  ``mode="pixel"`` is exact;
    ``mode="instance"`` is an APPROXIMATION (per-instance mean vectors instead of pixels,
    no extra pass over x).  ``stat="var"`` returns the variance of the angles instead.
    """
    _check_x(x)
    _check_channel_vec(source_mean, "source_mean", x)
    if mode not in ("pixel", "instance"):
        raise ValueError(f"mode must be 'pixel' or 'instance', got {mode!r}")
    if stat not in ("std", "var"):
        raise ValueError(f"stat must be 'std' or 'var', got {stat!r}")
    name = _backend_for(x, backend)
    x = x.detach()
    source_mean = source_mean.detach()
    mean_i, _ = ops.instance_stats(x, name)
    mu_b = mean_i.mean(dim=0)
    if mode == "pixel":
        angles = ops.diversity_angles(x, source_mean, mu_b, name)
    else:
        from .reference import diversity_angles_instance
        angles = diversity_angles_instance(mean_i, source_mean, mu_b)
    angles = angles.float()
    return score_from_angles(angles, stat), angles


def dabn(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
         source_var: Tensor, blend: Tensor | Sequence[float], *, shrink_k: float | None = None,
         eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """Diversity-adaptive BatchNorm (SPEC §3).

    x: (N, C, H, W) float32/float16/bfloat16/float64, NCHW or channels_last;
    weight, bias: (C,) or None; source_mean, source_var: (C,);
    blend: (w_s, w_b, w_i) as a length-3 tensor (preferred: changing values never
    recompile) or a sequence of floats, >= 0 and summing to 1.
    Returns y with x's shape, dtype and memory format; differentiable w.r.t. x, weight, bias.
    """
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
        blend = blend_tensor(blend, dtype=torch.promote_types(blend.dtype, wdt))
    else:
        blend = blend_tensor(blend, device=x.device, dtype=wdt)
    name = _backend_for(x, backend)
    return ops.dabn(x, weight, bias, source_mean.detach(), source_var.detach(), blend.detach(),
                    shrink_k, float(eps), name)
