"""The backends and the ordered table that picks one (DESIGN principle 4: declared, not guessed).

Each backend is a module of this folder implementing :class:`base.KernelBackend` (read that
file for the contract): ``reference.py``, ``cpu.py``, ``cuda.py``, ``triton/``.  Each row of the
table says which device types and dtypes a backend serves and, for a given input, returns the
reasons it cannot run (an empty list means it can).  ``"auto"`` picks the first row that fits;
an explicitly requested backend (argument or the ``DATTA_BACKEND`` environment variable) that
cannot run raises with every reason.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _ext
from .base import KernelBackend

ENV_VAR = "DATTA_BACKEND"
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One row of the table: what it serves, and how to load its implementation."""

    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    load: Callable[[], KernelBackend] = field(repr=False)
    #: global reasons this backend cannot run at all (missing build, missing package...).
    unavailable: Callable[[], list[str]] = field(repr=False, default=lambda: [])
    #: extra device types accepted only under a condition, with the reason when unmet.
    conditional_devices: Callable[[str], str | None] = field(repr=False, default=lambda d: "")

    def reasons(self, device_type: str, dtype: torch.dtype, explicit: bool = True) -> list[str]:
        """Why this backend cannot run on ``device_type``/``dtype`` (empty: it can).

        Conditionally served devices (Triton on CPU through its interpreter) count only
        for an explicit request (``explicit=True``), never for ``auto``.
        """
        why = list(self.unavailable())
        if device_type not in self.device_types:
            cond = self.conditional_devices(device_type)
            if cond is None:  # accepted under its condition
                if not explicit:
                    why.append(f"serves {device_type!r} only when requested explicitly")
            elif cond:
                why.append(cond)
            else:
                why.append(f"serves device types {self.device_types}, not {device_type!r}")
        if dtype not in self.dtypes:
            why.append(f"does not support dtype {dtype}")
        return why

    def impl(self) -> KernelBackend:
        """The implementation, loaded on first use and cached (``load`` may raise with the
        reason; nothing is cached then)."""
        impl = _LOADED.get(self.name)
        if impl is None:
            impl = _LOADED[self.name] = self.load()
        return impl


_LOADED: dict[str, KernelBackend] = {}


def _load(module: str, cls: str) -> Callable[[], KernelBackend]:
    """A loader importing ``.<module>`` only when the backend is first used (Triton's import
    costs seconds and may be missing)."""
    return lambda: getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def _triton_unavailable() -> list[str]:
    """Why the Triton backend cannot load.  Any exception counts, not only ImportError: a
    Triton too old or too new for an API the backend uses fails at import with a TypeError or
    AttributeError, and ``info`` / ``auto`` must report it, not crash."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install may raise anything
        return [f"triton is not importable ({type(e).__name__}: {e})"]
    try:
        importlib.import_module(f"{__name__}.triton")
    except Exception as e:  # noqa: BLE001 - see above
        return [f"datta_kernels.backends.triton failed to import ({type(e).__name__}: {e})"]
    return []


def _triton_interpret_cpu(device_type: str) -> str | None:
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    return ""


def _cuda_unavailable() -> list[str]:
    why = _ext.unavailable_reasons()
    if not why and not _ext.has_kernel("_dabn_forward", "CUDA"):
        why.append("datta_kernels._C was built without CUDA kernels")
    return why


#: The ordered table.  ``auto`` takes the first row whose ``reasons`` are empty.
BACKENDS: tuple[Backend, ...] = (
    Backend("cuda", ("cuda",), (torch.float32, torch.float16, torch.bfloat16, torch.float64),
            _load("cuda", "CudaBackend"), _cuda_unavailable),
    Backend("triton", ("cuda",), (torch.float32, torch.float16, torch.bfloat16),
            _load("triton", "TritonBackend"), _triton_unavailable, _triton_interpret_cpu),
    Backend("cpu", ("cpu",), FLOAT_DTYPES, _load("cpu", "CpuBackend"), _ext.unavailable_reasons),
    Backend("reference", ("cpu", "cuda", "meta", "mps", "xpu"), FLOAT_DTYPES,
            _load("reference", "ReferenceBackend")),
)
_BY_NAME = {b.name: b for b in BACKENDS}


def backend_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get(name: str) -> Backend:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {backend_names()}") from None


def resolve(name: str | None, device_type: str, dtype: torch.dtype) -> str:
    """Return the backend name to use for this device/dtype.

    ``name=None`` or ``"auto"`` consults ``DATTA_BACKEND`` and otherwise takes the first
    row of the table that can run.  An explicit request that cannot run raises with
    every reason.

    The answer depends on process state torch.compile cannot trace (the kernels the extension
    registered, environment variables) and is constant for given arguments, so a compiled
    graph takes it once at trace time (``DATTA_BACKEND`` is read when a graph is compiled).
    """
    if name is None or name == "auto":
        name = os.environ.get(ENV_VAR) or "auto"
    # the answer only changes with the environment (TRITON_INTERPRET gates Triton on CPU):
    # cache it, a layer asks on every forward and walking the table costs ~30 us
    return _resolve_cached(name, device_type, dtype, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=256)
def _resolve_cached(name: str, device_type: str, dtype: torch.dtype, _interpret: str | None) -> str:
    if name != "auto":
        why = get(name).reasons(device_type, dtype)
        if why:
            raise RuntimeError(
                f"datta_kernels backend {name!r} cannot run on {device_type}/{dtype}: "
                + "; ".join(why))
        return name
    for b in BACKENDS:
        if not b.reasons(device_type, dtype, explicit=False):
            return b.name
    raise RuntimeError(f"no datta_kernels backend serves {device_type}/{dtype}")


def _device_present(device_type: str) -> bool:
    """Whether this process has a device of ``device_type`` (``cpu`` and ``meta`` always)."""
    if device_type in ("cpu", "meta"):
        return True
    module = getattr(torch, device_type, None)            # torch.cuda, torch.xpu, torch.mps
    if device_type == "mps":
        return bool(torch.backends.mps.is_available())
    return bool(module is not None and hasattr(module, "is_available") and module.is_available())


# What ``@torch.compiler.assume_constant_result`` does, without importing torch._dynamo when
# this module is imported (~1.5 s of CPU; every ``datta-kernels`` command paid it).
resolve._dynamo_marked_constant = True


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run now (on ``device_type`` if given, else on any
    device this process has) for float32 inputs; empty when this process has no device of
    ``device_type`` (``available_backends("cuda")`` on a CPU-only machine is ``[]``)."""
    if device_type is not None and not _device_present(device_type):
        return []
    types = [device_type] if device_type else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b.name for b in BACKENDS if any(not b.reasons(t, torch.float32) for t in types)]


def explain(device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot run on ``device_type``/``dtype`` (empty: usable)."""
    return {b.name: b.reasons(device_type, dtype) for b in BACKENDS}
