"""Where the stream statistics start, and the order of the validation domains (validation data
only; nothing is chosen here).

The stream statistics of ``skewed`` batches (SPEC §3c) start at the source statistics, and
``calibrate``'s validation streams (SPEC §6 steps 4-5) take the validation domains in the order
given; the demo gives the clean held-out images first, so every validation stream starts on the
source model's own domain, the one start where the source statistics cannot be wrong.  A
deployment may start on any shift.  This script measures, on the validation streams, the
calibrated configuration without DAFT (``calibrate`` as the demo runs it, with one DAFT rate,
2e-3, to save time: steps 1-4 do not depend on the rate) with the stream starting at the source
statistics (as built), at the first folded batch's own statistics (its first fold at
momentum 1: a reset at the first batch), and as the plain average of the folded batches until
it holds ``1 / momentum`` of them (the ``t``-th fold at ``max(momentum, 1 / t)``), over the
domains in the given order and in seeded random orders.  The mixed stream does not depend on
the order (every domain pooled) and is run once per start.

    python bench/stream_start.py [--batch-size 64] [--orders 3] > bench/results/stream_start.md
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from _validation_setup import calibrated_study

from datta_kernels.calibration import _streams


@torch.no_grad()
def stream_accuracy(adapter, x, y, batches, start: str) -> float:
    """Accuracy (%) over one stream.  ``start``: ``"source"`` as built; ``"first batch"``: the
    stream layers fold at momentum 1 until a batch has folded (a batch not decided
    ``multiple``), then at their momentum ``rho``; ``"average"``: the ``t``-th folded batch at
    ``max(rho, 1 / t)``, the plain average of the folded batches until it holds ``1 / rho``
    of them, then the moving average."""
    layers = [layer for layer in adapter.layers if layer.stream_momentum is not None]
    rho = layers[0].stream_momentum if layers else None
    folded = 0

    def set_rate():
        rate = rho if start == "source" else (max(rho, 1.0 / (folded + 1)) if start == "average"
                                               else (1.0 if folded == 0 else rho))
        for layer in layers:
            layer.stream_momentum = rate
    correct = total = 0
    for idx in batches:
        if layers:
            set_rate()
        correct += int((adapter(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
        folded += adapter.last_decision != "multiple"
    return 100.0 * correct / total


STARTS = ("source", "first batch", "average")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--orders", type=int, default=3, help="seeded random domain orders besides the given one")
    args, cfg, model, vdom, rep = calibrated_study(
        "Where the stream statistics start, and the order of the validation domains", __doc__, p)
    bs = args.batch_size
    print(f"- batch size {bs}; calibrated: stream momentum {rep.stream_momentum}, reset {rep.stream_reset}, "
          f"stream blend {rep.stream_blend}, rule {rep.selector()}\n")
    if rep.stream_momentum is None:
        print("calibrate chose the source statistics for skewed batches: no stream to start.")
        return
    names = list(vdom)
    orders = [("given", names)]
    for k in range(args.orders):
        perm = np.random.default_rng(k).permutation(len(names))
        orders.append((f"random {k}", [names[i] for i in perm]))
    for label, order in orders:
        print(f"- order {label}: {', '.join(order)}")
    print("\nAccuracy (%) without DAFT per validation stream (mean: of single, mixed, dynamic, sorted):\n")
    print("| order | stream starts at | single | dynamic | sorted | mixed | mean |")
    print("|---|---|---|---|---|---|---|")
    mixed = {}
    for label, order in orders:
        xs, ys, streams = _streams({k: vdom[k] for k in order}, bs, cfg.seed)
        for start in STARTS:
            acc = {}
            for name in ("single", "dynamic", "sorted") + (("mixed",) if start not in mixed else ()):
                adapter = rep.adapter(copy.deepcopy(model), backend=cfg.backend)
                acc[name] = stream_accuracy(adapter, xs, ys, streams[name], start)
            mixed.setdefault(start, acc.get("mixed"))
            acc["mixed"] = mixed[start]
            print(f"| {label} | {start} | " + " | ".join(f"{acc[k]:.2f}" for k in
                                                          ("single", "dynamic", "sorted", "mixed"))
                  + f" | {np.mean(list(acc.values())):.2f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
