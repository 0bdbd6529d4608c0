"""Loads the compiled library ``datta_kernels._C`` (fused CPU kernels, CUDA when built).

Importing ``_C`` registers the kernel-level ops ``torch.ops.datta._instance_stats``,
``_diversity_angles``, ``_dabn_forward`` and ``_dabn_backward`` (schemas in
``csrc/ops.cpp``).  A missing build is not an error until a compiled backend is asked for.
"""
from __future__ import annotations

import importlib.util

import torch

_ERROR: str | None = None

if importlib.util.find_spec(f"{__package__}._C") is None:
    _ERROR = "not built"
else:
    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # e.g. built against another torch (undefined symbols)
        _ERROR = f"failed to load: {e}"

_HINT = ("build it with `pip install --no-build-isolation -e .` from the repository root "
         "(needs a C++ compiler and the same torch you run with)")


def unavailable_reasons() -> list[str]:
    """Empty when the compiled library is loaded, else why not and how to fix it."""
    if _ERROR is None:
        return []
    return [f"datta_kernels._C is {_ERROR}; {_HINT}"]


def require() -> None:
    """Raise an actionable error when the compiled library is missing."""
    why = unavailable_reasons()
    if why:
        raise RuntimeError(why[0])


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``datta::<op>`` has a kernel registered for ``dispatch_key`` (e.g. "CUDA")."""
    if _ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"datta::{op}", dispatch_key)


def build_info() -> dict[str, object]:
    """What the compiled library was built with (OpenMP, vector ISA, CUDA)."""
    if _ERROR is not None:
        return {"built": False, "error": _ERROR}
    # ``_build_info() -> str`` is "key=value;key=value" (e.g. "openmp=1;cpu_capability=avx2").
    text = torch.ops.datta._build_info()
    info = dict(item.split("=", 1) for item in text.split(";") if "=" in item)
    return {"built": True, **info}
