"""Module surgery: swap every BatchNorm2d of a model for a :class:`~datta_kernels.FusedDABN`
(or the synced layer) and back.  The one place that rebuilds layers: the layer modules
(``nn``, ``sync``) import neither it nor the adapters, so the import graph has no cycle.
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import FusedDABN, _resolve_weights, dabn_layers
from .presets import _PRESET_DEFAULT
from .sync import SyncFusedDABN

__all__ = ["convert_model", "revert_model"]


def _is_plain_bn(m: nn.Module) -> bool:
    # SyncBatchNorm (checkpoints trained with DDP) holds the same state as BatchNorm2d; after
    # conversion its test-batch statistics are those of the local batch (see convert_model)
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(m, FusedDABN)


def _factory(bn: nn.BatchNorm2d) -> dict:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    return {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}


def _copy_grad_flags(src: nn.Module, dst: nn.Module) -> None:
    for name in ("weight", "bias"):
        s, d = getattr(src, name), getattr(dst, name)
        if s is not None and d is not None:
            d.requires_grad_(s.requires_grad)


def _rebuild(old: nn.Module, cls: type, **kwargs) -> nn.Module:
    """A new ``cls`` layer (``FusedDABN`` or a subclass, ``kwargs`` to its constructor) with the
    state, device, dtype, ``requires_grad`` flags and training mode of ``old`` (a BatchNorm2d or
    a FusedDABN)."""
    new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
              **_factory(old), **kwargs)
    new.load_state_dict(old.state_dict(), strict=True)
    _copy_grad_flags(old, new)
    return new.train(old.training)


def _swap(model: nn.Module, match, make) -> tuple[nn.Module, int]:
    """Replace every submodule for which ``match`` holds by ``make(submodule)`` (recursively)."""
    if match(model):
        return make(model), 1
    count = 0
    for name, child in model.named_children():
        new, n = _swap(child, match, make)
        if new is not child:
            setattr(model, name, new)
        count += n
    return model, count


_NO_GROUP = object()  # sentinel: "no process_group argument" (None means the default group)


def convert_model(model: nn.Module, preset: str = "datta", *, process_group=_NO_GROUP,
                  **kwargs) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` (and ``nn.SyncBatchNorm``) of ``model`` by a
    :class:`FusedDABN` (in place).

    With ``process_group`` (a group, or ``None`` for the default group) the new layers are
    :class:`~datta_kernels.distributed.SyncFusedDABN`: batch statistics of the global batch.
    A converted ``nn.SyncBatchNorm`` keeps its own group when ``torch.distributed`` is
    initialised; without it (e.g. loading a DDP checkpoint in one process) it becomes a
    plain FusedDABN using the local batch.  Converted SyncBatchNorm layers expect 4-D input.

    Keeps device, dtype, parameters and buffers (the running statistics become the source
    statistics), ``requires_grad`` and the training flag.  ``kwargs`` go to ``FusedDABN``
    (``shrink_k``, ``weights``, ``backend``, ``score_mode``).  Returns ``model`` (or the new
    layer when ``model`` itself is a BatchNorm2d).  Raises ``ValueError`` when there is no
    BatchNorm2d to convert.
    """
    _resolve_weights(preset, kwargs.get("weights"), kwargs.get("shrink_k", _PRESET_DEFAULT),
                     kwargs.get("cluster", _PRESET_DEFAULT))

    def make(bn: nn.BatchNorm2d) -> FusedDABN:
        group = process_group
        if group is _NO_GROUP and isinstance(bn, nn.SyncBatchNorm) and _dist_initialized():
            group = bn.process_group
        if group is not _NO_GROUP:
            return _rebuild(bn, SyncFusedDABN, preset=preset, process_group=group, **kwargs)
        return _rebuild(bn, FusedDABN, preset=preset, **kwargs)

    model, count = _swap(model, _is_plain_bn, make)
    if count == 0:
        already = len(dabn_layers(model))
        hint = (f" (it already has {already} FusedDABN layers: use FusedDABN.set_preset to "
                "reconfigure them)") if already else ""
        raise ValueError(f"convert_model: {type(model).__name__} has no nn.BatchNorm2d layer "
                         f"to convert{hint}")
    return model


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def revert_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`FusedDABN` by a plain ``nn.BatchNorm2d`` (in place) whose running
    statistics are the SOURCE statistics and whose affine parameters are the current ones."""

    def make(layer: FusedDABN) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine,
                            layer.track_running_stats, **_factory(layer))
        with torch.no_grad():
            if layer.affine:
                bn.weight.copy_(layer.weight)
                bn.bias.copy_(layer.bias)
            if layer.track_running_stats:
                bn.running_mean.copy_(layer.source_mean)
                bn.running_var.copy_(layer.source_var)
                bn.num_batches_tracked.copy_(layer.num_batches_tracked)
        _copy_grad_flags(layer, bn)
        return bn.train(layer.training)

    model, count = _swap(model, lambda m: isinstance(m, FusedDABN), make)
    if count == 0:
        raise ValueError(f"revert_model: {type(model).__name__} has no FusedDABN layer")
    return model
