"""Adapt a Fashion-MNIST classifier to a dynamic stream of corrupted images with DATTA.

    python python/adapt_stream.py                      # real Fashion-MNIST (Debian package)
    python python/adapt_stream.py --data-dir DIR       # any directory with the four idx files
    python python/adapt_stream.py --synthetic --per-domain 32   # CI: no dataset needed

The story, in the order the code tells it:
1. load Fashion-MNIST from local idx files (``apt-get install dataset-fashion-mnist``);
2. get the source model: a small BatchNorm ResNet trained on the clean training set, cached
   under ``~/.cache/datta_kernels`` (about a minute on a laptop CPU the first time);
3. corrupt a test subset with every corruption and build the *dynamic* stream: one
   single-domain batch, then one batch mixing all corruptions, and so on;
4. wrap a copy of the model with ``datta_kernels.DATTA`` and feed the stream: each batch the
   first BatchNorm scores the batch's diversity, the KDE selector calls it "single" or
   "multiple", every BatchNorm normalises with that decision's blend, and "single" batches
   take one entropy-minimisation step (predict first, then update);
5. compare with the unadapted model and with test-batch normalisation.

``datta-kernels demo`` runs the full comparison (all methods, all streams) and writes tables
and a figure; this script is the few lines you would copy into your own code.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import datta_kernels as dk
from datta_kernels.adapt import TBN, Source
from datta_kernels.eval.corruptions import corrupt_all
from datta_kernels.eval.datasets import load_fashion_mnist, write_synthetic
from datta_kernels.eval.models import TrainConfig, evaluate, load_or_train
from datta_kernels.eval.streams import build_pool, make_stream


def feed(adapter, pool, stream, log_every: int = 0) -> float:
    """Run ``stream`` through ``adapter``; return top-1 accuracy. Optionally log DATTA's view."""
    correct = 0
    for i, (idx, kind) in enumerate(zip(stream.batches, stream.kinds)):
        logits = adapter(pool.x[idx])            # predict, then (maybe) update
        correct += int((logits.argmax(1) == pool.y[idx]).sum())
        if log_every and i % log_every == 0:
            print(f"  batch {i:4d}  true {kind:<6}  score {adapter.last_score:.4f}  "
                  f"decision {adapter.last_decision}")
    return correct / stream.num_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="use a generated stand-in dataset")
    p.add_argument("--per-domain", type=int, default=400, help="test images per corruption")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    # 1. data
    data_dir, train = args.data_dir, TrainConfig()
    if args.synthetic:
        data_dir = write_synthetic(tempfile.mkdtemp(), n_train=256, n_test=128)
        train = TrainConfig(width=4, epochs=1, train_subset=256, batch_size=32)
    data = load_fashion_mnist(data_dir)

    # 2. the source model (cached; a checksum mismatch retrains it)
    model, info = load_or_train(train, data.train_x, data.train_y)
    print(f"source model ({info['source']}): clean test accuracy "
          f"{evaluate(model, data.test_x, data.test_y):.1%}")

    # 3. corrupted test subset -> dynamic stream
    n = min(args.per_domain, len(data.test_y))
    x, y = data.test_x[:n], data.test_y[:n]
    pool = build_pool(corrupt_all(x, seed=0), y)
    stream = make_stream(pool, "dynamic", args.batch_size, seed=0)
    print(f"dynamic stream: {len(stream)} batches of {args.batch_size} over {len(pool.names)} corruptions")

    # 4. DATTA: converts every BatchNorm2d of the (copied) model in place
    datta = dk.DATTA(copy.deepcopy(model), lr=args.lr)
    # an odd stride, so the log shows both kinds of batch of the alternating stream
    acc_datta = feed(datta, pool, stream, log_every=max(1, len(stream) // 12) | 1)

    # 5. baselines on the same stream
    acc_source = feed(Source(copy.deepcopy(model)), pool, stream)
    acc_tbn = feed(TBN(copy.deepcopy(model)), pool, stream)
    print(f"accuracy on the dynamic stream: source {acc_source:.1%}, TBN {acc_tbn:.1%}, "
          f"DATTA {acc_datta:.1%} ({datta.n_updates} entropy steps over {datta.n_batches} batches)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
