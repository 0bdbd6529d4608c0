"""Quickstart: adapt a small BatchNorm CNN to a shifting test stream with DATTA.

    python python/quickstart.py            # a few seconds on a laptop CPU
    python python/quickstart.py --batches 120 --device cuda

What happens:
1. train a tiny CNN with BatchNorm on synthetic 4-class images (the "source" domain);
2. build a test stream from corrupted copies: single-domain segments (one corruption per batch)
   and mixed batches (a different corruption per image);
3. wrap the model with ``datta_kernels.DATTA``: every batch, the first BatchNorm computes the
   diversity score of its input, the KDE selector decides "single" or "multiple", every layer
   normalises with that decision's blend, and "single" batches take one entropy step;
4. compare with the ``Source`` and ``TBN`` baselines, and check that the default backend makes
   the same decisions and logits as the pure-PyTorch reference.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import datta_kernels as dk
from datta_kernels.adapt import TBN, Source

CLASSES = 4
SIZE = 16


def make_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) images: a bright blob in one of four quadrants (the label), plus noise."""
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    h = SIZE // 2
    for k in range(CLASSES):
        r, c = divmod(k, 2)
        x[y == k, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.0
    return x, y


#: Corruptions: each maps a batch to a shifted version of itself.
CORRUPTIONS = {
    "contrast": lambda x: 0.4 * x,
    "brightness": lambda x: x + 0.8,
    "noise": lambda x: x + 0.6 * torch.randn_like(x),
    "tint": lambda x: x + torch.tensor([0.9, -0.5, 0.2], device=x.device)[:, None, None],
}


def corrupt(x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Apply ``names[i % len(names)]`` to image i (one name: a single-domain batch)."""
    out = torch.empty_like(x)
    for i, name in enumerate(names * (len(x) // len(names) + 1)):
        if i == len(x):
            break
        out[i] = CORRUPTIONS[name](x[i:i + 1])[0]
    return out


def small_cnn() -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def train(model: nn.Module, steps: int, g: torch.Generator, device: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = make_images(32, g)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_stream(batches: int, batch: int, g: torch.Generator):
    """Dynamic stream: single-domain segments of 1-4 batches and mixed batches, shuffled."""
    names = list(CORRUPTIONS)
    stream = []
    while len(stream) < batches:
        x, y = make_images(batch, g)
        if torch.rand(1, generator=g).item() < 0.5:
            name = names[int(torch.randint(0, len(names), (1,), generator=g))]
            for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
                x, y = make_images(batch, g)
                stream.append((corrupt(x, [name]), y, "single"))
        else:
            stream.append((corrupt(x, names), y, "mixed"))
    return stream[:batches]


def run(adapter, stream, device):
    correct, decisions, logits = 0, [], []
    for x, y, _ in stream:
        out = adapter(x.to(device))
        correct += int((out.argmax(1).cpu() == y).sum())
        decisions.append(adapter.last_decision)
        logits.append(out.cpu())
    return correct / sum(len(y) for _, y, _ in stream), decisions, logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=70, help="test batches in the stream")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=30, help="KDE warm-up (the paper uses 50)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    print(f"backends available here: {dk.available_backends()}")
    model = small_cnn().to(args.device)
    train(model, args.train_steps, g, args.device)
    stream = make_stream(args.batches, args.batch_size, g)
    kinds = [k for _, _, k in stream]
    print(f"trained a {sum(p.numel() for p in model.parameters())}-parameter CNN; stream: "
          f"{kinds.count('single')} single-domain + {kinds.count('mixed')} mixed batches")

    # Baselines: no adaptation, and test-batch statistics in every BatchNorm.
    acc_source, _, _ = run(Source(copy.deepcopy(model)), stream, args.device)
    acc_tbn, _, _ = run(TBN(copy.deepcopy(model)), stream, args.device)

    # DATTA: converts every BatchNorm2d to FusedDABN (in place: hence the copies here).
    def datta(backend):
        return dk.DATTA(copy.deepcopy(model), selector=dk.KDESelector(warmup=args.warmup),
                        lr=1e-3, backend=backend)

    adapter = datta("auto")
    acc_datta, decisions, logits = run(adapter, stream, args.device)
    print(f"\nfirst FusedDABN layer: {adapter.layers[0]}")
    print(f"top-1  source {acc_source:.3f}   tbn {acc_tbn:.3f}   datta {acc_datta:.3f}   "
          f"({adapter.n_updates} DAFT steps)")

    print("\nbatch  stream  decision (after the KDE warm-up)")
    for i in range(args.warmup - 1, min(args.warmup + 14, len(stream))):
        print(f"{i:5d}  {kinds[i]:6s}  {decisions[i]}")
    after = range(args.warmup - 1, len(stream))
    agree = sum((kinds[i] == "single") == (decisions[i] == "single") for i in after)
    print(f"decision matches the stream's batch kind on {agree}/{len(after)} post-warm-up batches")

    # The same stream with the pure-PyTorch reference backend: decisions and logits agree.
    _, ref_decisions, ref_logits = run(datta("reference"), stream, args.device)
    same = sum(a == b for a, b in zip(decisions, ref_decisions, strict=True))
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
    print(f"\nreference backend: same decision on {same}/{len(stream)} batches, "
          f"max |logit difference| {diff:.2e}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
