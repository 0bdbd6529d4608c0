"""The named configurations of the method (SPEC §2, §3): blend presets and the shipped score.

Tables only (no math): product code and the reference both read them from here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Preset", "PRESETS", "DISPERSION_PARTS", "acc_dtype"]

#: sentinel: "the preset's value" (``shrink_k``, ``cluster``) where ``None`` means something else
_PRESET_DEFAULT = object()


class Preset(NamedTuple):
    """Blend weights ``(w_s, w_b, w_i)`` for each decision, the shrink of instance terms, and
    whether the instance terms are cluster-pooled (SPEC §3b: DYN's CABN; no shrink then).
    The third decision, ``skewed``, only comes from a selector with a low cut (SPEC §6)."""

    single: tuple[float, float, float]
    multiple: tuple[float, float, float]
    shrink_k: float | None = None
    cluster: bool = False
    #: the blend of "skewed" batches (less diverse than one i.i.d. domain); None = ``multiple``
    skewed: tuple[float, float, float] | None = None


#: SPEC §3 preset table.  ``shrink_k`` only matters where ``w_i > 0``.
PRESETS: dict[str, Preset] = {
    "datta": Preset((0.6, 0.4, 0.0), (0.85, 0.0, 0.15), 4.0),
    "datta_icme": Preset((0.6, 0.4, 0.0), (0.85, 0.15, 0.0)),
    "bn_adapt": Preset((0.6, 0.4, 0.0), (0.6, 0.4, 0.0)),
    "tbn": Preset((0.0, 1.0, 0.0), (0.0, 1.0, 0.0)),
    "source": Preset((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "instance": Preset((0.0, 0.0, 1.0), (0.0, 0.0, 1.0)),
    # DYN (Discover Your Neighbours): source_rate 0.8 with the sample's cluster statistics
    "dyn": Preset((0.8, 0.0, 0.2), (0.8, 0.0, 0.2), None, True),
}

#: Which parts of the standardised instance statistics the shipped ``"dispersion"`` score uses
#: (SPEC §2): ``"mean"`` (z_mu), ``"logstd"`` (z_sigma) or ``"both"``.  Chosen on the validation
#: corruptions only (``python -m datta_kernels.eval.diagnose --split validation``).
DISPERSION_PARTS = "both"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of every statistic: float64 stays float64 (for gradcheck), everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
