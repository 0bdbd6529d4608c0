"""Two design checks of ``datta_kernels.calibrate`` (SPEC §6), on the demo's validation set
only (never test data).

1. *How many validation batches?*  The gap between two single-domain blends, (0, 0.8, 0.2) and
   plain batch statistics (0, 1, 0), both behind a stem on (0.6, 0.2, 0.2), measured as
   ``calibrate`` measured it before 2026-12-04 (40 single-domain batches cycling through the
   domains) for 10 draws, and on 20 batches of every domain.
2. *Which blend before the score layer?*  Single-domain accuracy (20 batches of every domain)
   with the layers from the score layer on batch statistics (0, 1, 0) and the layers before it
   on batch statistics or on a source-weighted blend (the ``multiple`` blends the earlier
   ``calibrate`` gave them).

    python bench/calibration_checks.py > bench/results/calibration_checks.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels import calibration as cal
from datta_kernels.nn import dabn_layers, first_nonlinear_layer
from datta_kernels.surgery import convert_model

TBN, MIXED_OLD = (0.0, 1.0, 0.0), (0.6, 0.2, 0.2)


def _acc(work, layers, pre, stem, later, batches) -> float:
    cal._configure(layers, pre, stem, (later,) * 3, "instance")
    return 100.0 * float(cal._accuracy(work, batches).mean())


def main() -> None:
    _, model, vdom = setup("Design checks of `calibrate` on the validation set", __doc__)
    for bs in (16, 64):
        work = convert_model(copy.deepcopy(model).eval(), "datta", shrink_k=4.0, cluster=False)
        layers = dabn_layers(work)
        g = torch.Generator().manual_seed(0)
        per_domain = {n: [(x[i], y[i]) for i in (torch.randperm(len(y), generator=g)[:bs] for _ in range(20))]
                      for n, (x, y) in vdom.items()}
        pre = first_nonlinear_layer(work, next(iter(per_domain.values()))[0][0])
        every = [b for v in per_domain.values() for b in v]
        big = _acc(work, layers, pre, MIXED_OLD, (0.0, 0.8, 0.2), every) - \
            _acc(work, layers, pre, MIXED_OLD, TBN, every)
        draws = []
        for seed in range(10):
            val = cal._batches(vdom, bs, 40, torch.Generator().manual_seed(seed))["single"]
            draws.append(_acc(work, layers, pre, MIXED_OLD, (0.0, 0.8, 0.2), val)
                         - _acc(work, layers, pre, MIXED_OLD, TBN, val))
        print(f"## Batch size {bs}\n")
        print("Accuracy of (0, 0.8, 0.2) minus (0, 1, 0), points: "
              f"{len(every)} batches (20 per domain): **{big:+.2f}**; 40 cycling batches, 10 draws: "
              f"mean {np.mean(draws):+.2f}, std {np.std(draws):.2f}, range {min(draws):+.2f} to "
              f"{max(draws):+.2f}\n")
        print("| layers before the score layer | single-domain accuracy % (later layers on (0, 1, 0)) |")
        print("|---|---|")
        for stem in (TBN, MIXED_OLD, (0.2, 0.4, 0.4), (0.8, 0.2, 0.0)):
            print(f"| {stem} | {_acc(work, layers, pre, stem, TBN, every):.1f} |")
        print()


if __name__ == "__main__":
    main()
