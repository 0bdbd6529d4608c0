"""Two checks behind ``datta_cal``'s shift limit (SPEC §6 step 5), on the demo's validation set
only (never test data), at batch size 64 with the blends ``calibrate`` chose there in the
demo runs (single (0, 1, 0), multiple (0, 0.8, 0.2), skewed (1, 0, 0), the layers before the
score layer on (1, 0, 0); instance terms per sample with the shrink).

1. *How far from the source are validation batches?*  The signed source shift
   (``datta_kernels.diversity.source_shift(..., signed=True)``: negative when the batch's
   variances lie below the source's, positive above) at the score layer of i.i.d. and
   label-sorted batches of every validation domain (8 of each): the range ``shift_cut`` covers.
2. *Should the stem also leave the source under strong shift?*  Accuracy of single-domain,
   mixed and label-sorted batches of the validation domains of one severity (the later
   layers on each type's blend) with the layers before the score layer on three blends.

    python bench/shift_checks.py > bench/results/shift_checks.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels import calibration as cal
from datta_kernels.diversity import source_shift
from datta_kernels.nn import dabn_layers, first_nonlinear_layer
from datta_kernels.surgery import convert_model

BS = 64
SINGLE, MULTIPLE, SKEWED, PRE = (0.0, 1.0, 0.0), (0.0, 0.8, 0.2), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0)
STEMS = ((1.0, 0.0, 0.0), (0.8, 0.2, 0.0), (0.0, 1.0, 0.0))


def main() -> None:
    _, model, vdom = setup("Checks behind the shift limit of `datta_cal` (validation set only)", __doc__,
                           note=f", batch size {BS}")
    work = convert_model(copy.deepcopy(model).eval(), "datta", **cal.INSTANCE_MODES["instance"])
    layers = dabn_layers(work)
    pre = first_nonlinear_layer(work, next(iter(vdom.values()))[0][:BS])
    score_layer = layers[pre]
    score_layer.compute_score, score_layer.score_mode = True, "dispersion"
    cal._configure(layers, pre, PRE, (SINGLE,) * 3, "instance")
    g = torch.Generator().manual_seed(5)
    print("## 1. Signed source shift at the score layer, per validation domain (8 batches of each kind)\n")
    print("| domain | i.i.d. min | i.i.d. max | label-sorted min | label-sorted max |\n|---|---|---|---|---|")
    with torch.no_grad():
        for name, (x, y) in vdom.items():
            row = []
            for kind in ("iid", "sorted"):
                order = torch.randperm(len(y), generator=g)
                if kind == "sorted":
                    order = order[torch.sort(y[order], stable=True).indices]
                shifts = []
                for k in range(8):
                    idx = order[k * BS:(k + 1) * BS] if kind == "sorted" else \
                        torch.randperm(len(y), generator=g)[:BS]
                    work(x[idx])
                    shifts.append(float(source_shift(*score_layer.last_stats, score_layer.source_mean,
                                                     score_layer.source_var, score_layer.eps, signed=True)))
                row += [min(shifts), max(shifts)]
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    score_layer.compute_score = False
    print("\n## 2. Blend of the layers before the score layer, by validation severity "
          "(accuracy %; 30 batches of each type)\n")
    print("| severity | stem blend | single | mixed | label-sorted |\n|---|---|---|---|---|")
    for sev in (1, 3, 5):
        dom = {k: v for k, v in vdom.items() if k.endswith(f"@{sev}")}
        val = cal._batches(dom, BS, 30, torch.Generator().manual_seed(7))
        for stem in STEMS:
            acc = []
            for kind, later in (("single", SINGLE), ("mixed", MULTIPLE), ("sorted", SKEWED)):
                cal._configure(layers, pre, stem, (later,) * 3, "instance")
                acc.append(100 * float(np.mean(cal._accuracy(work, val[kind]))))
            print(f"| {sev} | {stem} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")


if __name__ == "__main__":
    main()
