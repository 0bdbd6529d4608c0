"""datta_kernels: fused kernels and modules for DATTA (Diversity-Adaptive Test-Time Adaptation).

See ``docs/SPEC.md`` for the math; ``datta_kernels.reference`` is that page as code.
"""
from . import ops  # noqa: F401  (registers torch.ops.datta.*)
from .adapt import DATTA, DYN
from .backends import available_backends
from .calibration import Calibration, calibrate
from .cluster import cluster_labels
from .diversity import ClassProbe, KDESelector, ThresholdSelector, calibrate_threshold, prediction_spread
from .functional import blend_tensor, dabn, diversity_score, instance_stats
from .nn import FusedDABN
from .presets import PRESETS, Preset
from .surgery import convert_model, revert_model

__version__ = "0.1.0"

__all__ = [
    "DATTA",
    "DYN",
    "calibrate",
    "Calibration",
    "cluster_labels",
    "FusedDABN",
    "convert_model",
    "revert_model",
    "KDESelector",
    "ThresholdSelector",
    "ClassProbe",
    "prediction_spread",
    "calibrate_threshold",
    "PRESETS",
    "Preset",
    "available_backends",
    "blend_tensor",
    "dabn",
    "diversity_score",
    "instance_stats",
]
