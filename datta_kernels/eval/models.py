"""A small BatchNorm ResNet for 28×28 grayscale images, trained once and cached.

The network is a CIFAR-style ResNet cut down to fit a two-core CPU: a 3×3 stem at full
resolution (its BatchNorm is the first DABN layer, where DATTA measures diversity), then three
stages of basic blocks at 28², 14² and 7², global average pooling and a linear head. Every
normalization is an ``nn.BatchNorm2d``, so ``convert_model`` can swap them all.

The trained weights are cached under ``$XDG_CACHE_HOME/datta_kernels`` (``~/.cache`` when
unset) next to a ``.sha256`` file; a checksum mismatch or a changed training recipe retrains.
Training runs on portable numerics by default (:mod:`.numerics`): the same recipe gives the same
weights, bit for bit, whatever the vector width (AVX2 or AVX-512) and core count, on the AMD CPUs
checked; an Intel Xeon trains another copy (``bench/results/numerics_copies_intel.md``), so the
demo's model is one model per CPU maker, not one per machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "RECORDED_WEIGHTS", "SmallResNet", "TrainConfig", "cache_dir", "copy_note",
           "evaluate", "load_or_train", "train", "weights_digest"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """``(N, 1, 28, 28)`` images -> ``(N, num_classes)`` logits."""

    def __init__(self, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1), num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@dataclass(frozen=True)
class TrainConfig:
    """The whole training recipe; its JSON names the cache file, so changing it retrains.

    Defaults were tuned on a 2-core CPU (torch 2.13): 2 epochs over 45k images take about
    45 s and give ~88% clean test accuracy on Fashion-MNIST (all 60k: ~60 s, +0.3 points).
    """

    width: int = 16
    blocks: tuple[int, ...] = (1, 1, 1)
    epochs: int = 2
    train_subset: int | None = 45000
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    #: ``"portable"``: trained on :mod:`.numerics`' portable numerics (in a child process when
    #: this one is not on them), the same weights across vector widths and core counts (on one
    #: CPU maker: :mod:`.numerics`); ``"native"``:
    #: in this process as it is (weights specific to the machine and thread count).
    numerics: str = "portable"

    def __post_init__(self):
        from .numerics import check_mode

        check_mode(self.numerics, "TrainConfig.numerics")

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def build(self) -> SmallResNet:
        return SmallResNet(self.width, tuple(self.blocks))


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override`` (a ``--cache-dir``) when given, else ``$XDG_CACHE_HOME/datta_kernels``
    (``~/.cache/datta_kernels`` when unset)."""
    if override is not None:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "datta_kernels"


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal flips and ±2-pixel shifts: cheap, and they help a short schedule."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]


def training_indices(cfg: TrainConfig, n: int) -> Tensor:
    """The indices of the ``n`` training images :func:`train` fits on (all of them when
    ``cfg.train_subset`` is None or not smaller than ``n``): the first draw of its generator."""
    if cfg.train_subset is None or cfg.train_subset >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(n, generator=g)[: cfg.train_subset]


def held_out_indices(cfg: TrainConfig, n: int) -> Tensor:
    """The training images :func:`train` never fits on (sorted): clean held-out data."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[training_indices(cfg, n)] = False
    return keep.nonzero().flatten()


def train(cfg: TrainConfig, x: Tensor, y: Tensor, progress: bool = True) -> SmallResNet:
    """SGD + Nesterov with a one-cycle schedule on ``x`` ``(N, 1, 28, 28)``, ``y`` ``(N,)``."""
    from . import progress_bar

    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.train_subset is not None and cfg.train_subset < len(x):
        # the first draw of g, as training_indices makes it (g goes on to shuffle the epochs)
        idx = torch.randperm(len(x), generator=g)[: cfg.train_subset]
        x, y = x[idx], y[idx]
    model = cfg.build()
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    bar = progress_bar(total=cfg.epochs * steps_per_epoch, desc="train source model", disable=not progress)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``x`` ``(N, 1, H, W)``."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def _train_on_numerics(cfg: TrainConfig, x: Tensor, y: Tensor, progress: bool) -> SmallResNet:
    """:func:`train` on ``cfg.numerics``: here when this process already runs them (``native``,
    or a process :func:`.numerics.pin` put on ``portable``), else in a child process started on
    the portable switches, which hands back the weights (a failed child raises here)."""
    from .numerics import describe, portable_env

    if cfg.numerics == "native" or describe()["portable"]:
        return train(cfg, x, y, progress=progress)
    with tempfile.TemporaryDirectory(prefix="datta_train_") as tmp:
        job = Path(tmp)
        torch.save({"config": asdict(cfg), "x": x.detach().cpu(), "y": y.detach().cpu(),
                    "progress": progress}, job / "job.pt")
        done = subprocess.run([sys.executable, "-m", __name__, str(job)], env=portable_env(),
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training on portable numerics failed in its child process "
                               f"(exit {done.returncode}): {done.stdout.strip()}")
        model = cfg.build()
        model.load_state_dict(torch.load(job / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


def _train_job(job: Path) -> int:
    """The child of :func:`_train_on_numerics`: train ``job/job.pt``'s recipe, write
    ``job/model.pt``; exit 1 with the reason on stdout when the numerics are not portable."""
    from .numerics import pin

    info = pin("portable")  # before any tensor operation of this process
    if not info["portable"]:
        print(f"portable numerics unavailable: {info['why']}")
        return 1
    spec = torch.load(job / "job.pt", map_location="cpu", weights_only=True)
    cfg = TrainConfig(**{**spec["config"], "blocks": tuple(spec["config"]["blocks"])})
    model = train(cfg, spec["x"], spec["y"], progress=spec["progress"])
    torch.save(model.state_dict(), job / "model.pt")
    return 0


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s ``state_dict`` tensors' bytes, in order: which copy of a
    recipe a model is, independent of the file it was saved in."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: The default recipe's (``TrainConfig()``) weights whose numbers ``bench/results/demo.md`` and
#: the README report (first 16 hex digits of :func:`weights_digest`): trained on portable
#: numerics on AMD EPYC VMs, AVX2 and AVX-512 alike.  An Intel Xeon trains another copy
#: (``bench/results/numerics_copies_intel.md``).
RECORDED_WEIGHTS = "5c343e8eacf820d6"


def copy_note(cfg: TrainConfig, digest: str) -> str | None:
    """A line for a run's log when a model of the default recipe is not the copy the recorded
    tables were made with (other CPU maker, other torch build): its numbers will be its own.
    None for that copy and for any other recipe."""
    if cfg != TrainConfig() or digest.startswith(RECORDED_WEIGHTS):
        return None
    return (f"model: weights {digest[:16]}, not the copy bench/results/demo.md reports "
            f"({RECORDED_WEIGHTS}, trained on AMD CPUs): this run's numbers are this copy's, "
            "not the README's (portable numerics differ between CPU makers: "
            "bench/results/numerics_copies_intel.md)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sums(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def checksum_ok(path: Path) -> bool:
    """Whether ``path`` and its ``<name>.sha256`` file exist and the file's bytes match it."""
    sums = _sums(path)
    return path.is_file() and sums.is_file() and sums.read_text().split()[0] == _sha256(path)


def write_checksum(path: Path) -> None:
    """Write ``<name>.sha256`` beside ``path`` (``sha256sum``'s format), after ``path`` itself
    is complete: a file without one is never trusted."""
    _sums(path).write_text(f"{_sha256(path)}  {path.name}\n")


def load_or_train(cfg: TrainConfig, train_x: Tensor, train_y: Tensor, *,
                  cache: str | os.PathLike | None = None, retrain: bool = False,
                  progress: bool = True) -> tuple[SmallResNet, dict]:
    """The cached model for ``cfg`` if its checksum verifies, else a freshly trained one.

    Returns ``(model in eval mode, info)`` where ``info`` says ``source`` ("cache" or
    "trained"), ``path``, ``train_seconds``, ``weights_sha256`` (:func:`weights_digest`) and,
    when the cache was refused, ``why``.
    """
    root = cache_dir(cache)
    path = root / f"fmnist_resnet_{cfg.key()}.pt"
    info: dict = {"path": str(path), "config": asdict(cfg)}
    if not retrain and path.is_file() and _sums(path).is_file():
        if checksum_ok(path):
            model = cfg.build()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), {**info, "source": "cache", "train_seconds": 0.0,
                                  "weights_sha256": weights_digest(model)}
        info["why"] = "checksum mismatch, retrained"
    elif retrain:
        info["why"] = "--retrain"
    t0 = time.perf_counter()
    model = _train_on_numerics(cfg, train_x, train_y, progress)
    seconds = time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written checkpoint behind
    # a valid-looking checksum.
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    write_checksum(path)
    return model, {**info, "source": "trained", "train_seconds": seconds,
                   "weights_sha256": weights_digest(model)}


if __name__ == "__main__":
    sys.exit(_train_job(Path(sys.argv[1])))
