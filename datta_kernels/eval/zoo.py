"""Models for ``datta-kernels run``: built-in CIFAR architectures, torchvision, saved models,
and checkpoints loaded the way public model zoos ship them.

- ``wrn28-10``: a WideResNet-28-10 (pre-activation, dropout-free) whose ``state_dict`` keys are
  those of the widely used public CIFAR-10 "Standard" checkpoint (RobustBench):
  ``conv1.weight``, ``block{1,2,3}.layer.{0..3}.{bn1,conv1,bn2,conv2}.*``,
  ``block{1,2,3}.layer.0.convShortcut.weight``, ``bn1.*``, ``fc.weight``/``fc.bias``.
- ``resnet26``: a CIFAR ResNet-26 (3×3 stem, three stages of four basic blocks, 26 weight layers;
  :class:`~datta_kernels.eval.models.SmallResNet` with ``blocks=(4, 4, 4)``).
- ``torchvision:<name>``: ``torchvision.models.<name>`` (optional import; weights from
  ``--checkpoint``, never downloaded).
- a path to a file written by ``torch.save(model)``: the whole model (unpickled: trusted files only).

Checkpoints: a plain state dict, or one wrapped under ``state_dict`` / ``model``, with or without
DataParallel's ``module.`` prefix; loaded strictly (missing and unexpected keys are listed).
Inputs reach the model in ``[0, 1]``; :class:`Normalize` (per-channel mean/std) is prepended when
the model needs it (torchvision's ImageNet models do, the CIFAR zoo's models do not).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import SmallResNet

__all__ = ["BUILTIN", "IMAGENET_MEAN", "IMAGENET_STD", "CheckpointError", "Normalize", "WideResNet",
           "build_model", "default_normalization", "extract_state_dict", "load_checkpoint", "resnet26",
           "wrn28_10"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used (names the file and what is wrong)."""


class _WideBlock(nn.Module):
    """Pre-activation basic block: ``bn1 -> relu -> conv1 -> bn2 -> relu -> conv2`` plus a
    shortcut; when the width or stride changes, the shortcut is a 1×1 conv (``convShortcut``) of the
    *pre-activated* input, otherwise the raw input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same = cin == cout and stride == 1
        if not self.same:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.same else self.convShortcut(act))


class _WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen``: ``(N, 3, 32, 32)`` in [0, 1] -> ``(N, num_classes)``."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn28_10(num_classes: int = 10, width: int | None = None) -> WideResNet:
    """WideResNet-28-10 (``width`` overrides the widen factor 10, for small tests)."""
    return WideResNet(28, 10 if width is None else width, num_classes)


def resnet26(num_classes: int = 10, width: int | None = None) -> SmallResNet:
    """CIFAR ResNet-26 with base width ``width`` (default 16: stages of 16, 32, 64 channels)."""
    return SmallResNet(16 if width is None else width, (4, 4, 4), num_classes, in_channels=3)


#: Built-in architectures: name -> builder ``(num_classes, width) -> nn.Module``.
BUILTIN = {"wrn28-10": wrn28_10, "resnet26": resnet26}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a model's first layer (buffers, so ``.to()`` moves them)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def default_normalization(model: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """ImageNet mean/std for ``torchvision:*``; None (inputs in [0, 1]) for everything else."""
    return (IMAGENET_MEAN, IMAGENET_STD) if model.startswith("torchvision:") else None


def extract_state_dict(obj, path: str | os.PathLike = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a zoo checkpoint: unwrap ``state_dict`` / ``model`` (repeatedly), drop a
    ``module.`` prefix shared by every key."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if k in obj), None)
        if not isinstance(inner, (dict, nn.Module)):
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a state dict (nor one under 'state_dict' / 'model'); "
                              f"found {keys}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _torch_load(path: Path, trusted: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:
        hint = "" if trusted else (" (it may hold pickled Python objects; if you trust the file, "
                                   "pass --trust-checkpoint)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load ({first}){hint}") from None


def load_checkpoint(model: nn.Module, path: str | os.PathLike, trusted: bool = False) -> dict:
    """Load a zoo checkpoint into ``model`` strictly; returns facts for the results file."""
    path = Path(path)
    state = extract_state_dict(_torch_load(path, trusted), path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
        parts = ([f"missing keys: {show(missing)}"] if missing else []) + \
                ([f"unexpected keys: {show(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path}: does not match {type(model).__name__}; " + "; ".join(parts))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{path}: shape of {k} is {tuple(state[k].shape)}, the model's is "
                              f"{tuple(own[k].shape)} ({len(bad)} mismatched tensors)")
    model.load_state_dict(state, strict=False)   # strictness checked above; tolerate old BN counters
    return {"checkpoint": str(path), "tensors": len(state)}


def _torchvision_model(name: str) -> nn.Module:
    try:
        tv = importlib.import_module("torchvision")
    except ImportError:
        raise CheckpointError(f"--model torchvision:{name} needs torchvision, which is not installed: "
                              "pip install the torchvision release matching your torch") from None
    except RuntimeError as e:       # e.g. a CUDA torchvision wheel on a CPU torch (its ops fail to load)
        raise CheckpointError(f"--model torchvision:{name}: torchvision is installed but does not import "
                              f"against this torch {torch.__version__} ({str(e).splitlines()[0]}); install "
                              "the torchvision build made for it (for a CPU torch: the CPU wheel)") from None
    builder = getattr(tv.models, name, None)
    if not callable(builder) or name.startswith("_"):
        raise CheckpointError(f"torchvision.models has no model {name!r}")
    return builder(weights=None)


def build_model(spec: str, num_classes: int, checkpoint: str | None = None, random_init: bool = False,
                width: int | None = None, normalization=None, trusted: bool = False
                ) -> tuple[nn.Module, dict]:
    """The eval-mode model for ``--model spec`` (see the module docstring) and facts about it.

    ``normalization``: ``(mean, std)`` to prepend as :class:`Normalize`, or None for none."""
    info: dict = {"name": spec, "checkpoint": checkpoint, "random_init": random_init}
    if spec in BUILTIN or spec.startswith("torchvision:"):
        if spec in BUILTIN:
            model = BUILTIN[spec](num_classes, width)
        else:
            model = _torchvision_model(spec.split(":", 1)[1])
        if checkpoint is not None:
            info.update(load_checkpoint(model, checkpoint, trusted))
    else:
        path = Path(spec)
        model = _torch_load(path, trusted=True)
        if isinstance(model, dict):
            raise CheckpointError(f"{path}: holds a state dict, not a whole model; pass the architecture "
                                  f"as --model ({', '.join(BUILTIN)} or torchvision:<name>) and this "
                                  "file as --checkpoint")
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{path}: holds a {type(model).__name__}, not an nn.Module")
        info["checkpoint"] = str(path)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise CheckpointError(f"model {spec!r} has no BatchNorm2d layer: DATTA and the BN baselines "
                              "adapt BatchNorm2d layers only")
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["architecture"] = type(model).__name__
    if normalization is not None:
        model = nn.Sequential(Normalize(*normalization), model)
        info["normalization"] = {"mean": list(normalization[0]), "std": list(normalization[1])}
    else:
        info["normalization"] = None
    return model.eval(), info
