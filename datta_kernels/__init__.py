"""datta_kernels: fused kernels and modules for DATTA (Diversity-Adaptive Test-Time Adaptation).

See ``shared/SPEC.md`` for the math; ``datta_kernels.reference`` is that page as code.
"""
from . import ops  # noqa: F401  (registers torch.ops.datta.*)
from .backends import available_backends
from .functional import blend_tensor, dabn, diversity_score, instance_stats
from .reference import PRESETS, Preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Preset",
    "available_backends",
    "blend_tensor",
    "dabn",
    "diversity_score",
    "instance_stats",
]
