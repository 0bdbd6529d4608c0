"""A cache of :func:`datta_kernels.calibrate`'s choices for ``datta-kernels demo`` and ``run``.

``calibrate`` is most of the demo's wall time (about 30 of its 44 minutes at severity 3 on the
2-core development machine), and what it chooses depends only on its inputs: the model's
weights and statistics, the validation images and labels, the batch size and the settings
(batches, DAFT rates, backend, seed, blend grid), the library's code and the numerics of the
machine.  None of them depends on the test corruptions or their severity, so the demo at
severity 3 and then at 5 calibrates the same configuration twice.  :func:`cached_calibrate`
keys a saved :class:`~datta_kernels.calibration.Calibration` (``Calibration.save``) on a
SHA-256 of **all** of those inputs (every source file of the installed package and its compiled
extension, torch's version, the CPU capability, the thread count and the device name included),
so any change to any of them calibrates again; a file whose checksum does not verify, or that
this version cannot read, is recalibrated too.  ``refresh=True`` (``--recalibrate``) ignores
the cache.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..calibration import Calibration, calibrate
from .models import _sums, cache_dir, checksum_ok, write_checksum

__all__ = ["cached_calibrate", "calibration_key", "code_fingerprint"]

_PACKAGE = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of every Python source file of the installed ``datta_kernels`` package and its
    compiled extension (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in _PACKAGE.rglob("*")
                   if p.is_file() and (p.suffix == ".py" or p.name.startswith("_C")))
    for p in files:
        h.update(str(p.relative_to(_PACKAGE)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _update(h, name: str, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _device_name(domains: Mapping[str, tuple[Tensor, Tensor]]) -> str:
    device = next(iter(domains.values()))[0].device
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def calibration_key(model: nn.Module, domains: Mapping[str, tuple[Tensor, Tensor]], batch_size: int,
                    **settings) -> str:
    """SHA-256 (hex) of everything :func:`calibrate` reads: the model's state, the domains'
    names, images and labels, the batch size and ``settings`` (its keyword arguments), the code
    (:func:`code_fingerprint`), torch's version, the thread count and the device."""
    h = hashlib.sha256()
    h.update(json.dumps({"code": code_fingerprint(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "device": _device_name(domains),
                         "model": type(model).__name__, "batch_size": int(batch_size),
                         "settings": settings}, sort_keys=True, default=repr).encode())
    for name, t in model.state_dict().items():
        _update(h, f"model.{name}", t)
    for name, (x, y) in domains.items():
        _update(h, f"domain.{name}.x", x)
        _update(h, f"domain.{name}.y", y)
    return h.hexdigest()


def cached_calibrate(model: nn.Module, domains: Mapping[str, tuple[Tensor, Tensor]], batch_size: int, *,
                     cache: str | os.PathLike | None = None, refresh: bool = False,
                     **settings) -> tuple[Calibration, dict]:
    """``calibrate(copy of model, domains, batch_size, **settings).calibration``, or the one
    saved under ``cache`` (None: :func:`~datta_kernels.eval.models.cache_dir`) for exactly these
    inputs (:func:`calibration_key`).  Returns ``(calibration, info)``: ``info["source"]`` is
    ``"cache"`` or ``"calibrated"``, with ``path`` and ``key``, and ``why`` when a saved file
    was refused.  ``model`` is not modified."""
    key = calibration_key(model, domains, batch_size, **settings)
    root = cache_dir(cache)
    path = root / f"calibration_{key[:32]}.pt"
    info: dict = {"path": str(path), "key": key}
    if refresh:
        info["why"] = "recalibrate requested"
    elif path.is_file() and _sums(path).is_file():
        if checksum_ok(path):
            try:
                return Calibration.load(path), {**info, "source": "cache"}
            except (ValueError, RuntimeError, KeyError, TypeError) as err:
                info["why"] = f"unreadable ({err}), recalibrated"
        else:
            info["why"] = "checksum mismatch, recalibrated"
    report = calibrate(copy.deepcopy(model), domains, batch_size, **settings).calibration
    root.mkdir(parents=True, exist_ok=True)
    report.save(path)
    write_checksum(path)
    return report, {**info, "source": "calibrated"}
