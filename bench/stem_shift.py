"""Would a shift range at the stem (the first BatchNorm, before any adaptation) stop the
``skewed`` misfire on unseen corruptions better than the range at the score layer?
(Validation set only.)

Never test data.  ``calibrate`` runs at each batch size (one DAFT rate, 1e-3; DAFT is then
switched off).  For every batch of its single-domain and label-sorted validation streams (every
validation image once): the signed :func:`~datta_kernels.diversity.source_shift` at the stem
layer's input and at the score layer's, the rule's decision, the batch's accuracy under it and
under ``single``.  Each validation family in turn is held out, as a test corruption is unseen:
the range of each shift is taken from the batches of the other families (clean held-out
included), and the held-out family's batches the rule calls ``skewed`` are counted inside and
outside it.  A useful range would put the i.i.d. batches called ``skewed`` (misfires) outside it
and the label-sorted ones inside.

    python bench/stem_shift.py > bench/results/stem_shift.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import image_families, setup, without_daft

from datta_kernels import ThresholdSelector, calibrate, ops
from datta_kernels import calibration as cal
from datta_kernels.diversity import source_shift
from datta_kernels.nn import dabn_layers


def _rows(c, model, vdom, bs: int) -> dict[str, np.ndarray]:
    off = without_daft(c)
    adapter = off.adapter(copy.deepcopy(model).eval())
    single = off.adapter(copy.deepcopy(model).eval(), selector=ThresholdSelector(1e9))
    stem = dabn_layers(adapter.model)[0]
    seen = {}

    def hook(layer, inputs):
        mean_i, var_i = ops.run_instance_stats(inputs[0].detach(), "cpu")
        seen["stem"] = float(source_shift(mean_i, var_i, layer.source_mean, layer.source_var,
                                          layer.eps, signed=True))
    stem.register_forward_pre_hook(hook)
    fam_of = image_families(vdom)
    x, y, streams = cal._streams(vdom, bs, 0)
    out = {k: [] for k in ("stream", "family", "stem", "score", "skewed", "acc", "acc_single")}
    with torch.no_grad():
        for name in ("single", "sorted"):
            for b in streams[name]:
                acc = float((adapter(x[b]).argmax(1) == y[b]).float().mean())
                fams = set(fam_of[b.numpy()])
                if len(fams) > 1:      # a batch across two domains: no family to hold out
                    continue
                shift = float(adapter.last_shift)
                out["stream"].append(name)
                out["family"].append(fams.pop())
                out["stem"].append(seen["stem"])
                out["score"].append(shift)
                out["skewed"].append(adapter.last_decision == "skewed")
                out["acc"].append(acc)
                out["acc_single"].append(float((single(x[b]).argmax(1) == y[b]).float().mean()))
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    _, model, vdom = setup("A shift range at the stem against the `skewed` misfire (validation set only)",
                           __doc__)
    print("| bs | held-out family | layer | range from the other families | i.i.d. batches called skewed: "
          "outside the range / all (accuracy as decided -> as single) | sorted batches called skewed: "
          "outside / all (accuracy as decided -> as single) |\n|---|---|---|---|---|---|")
    for bs in (16, 64):
        c = calibrate(copy.deepcopy(model), vdom, bs, lr=1e-3).calibration
        r = _rows(c, model, vdom, bs)
        for fam in sorted(set(r["family"]) - {"clean_heldout"}):
            held, rest = r["family"] == fam, r["family"] != fam
            for layer in ("stem", "score"):
                v = r[layer]
                lo, hi = min(0.0, v[rest].min()), max(0.0, v[rest].max())
                outside = (v < lo) | (v > hi)
                cells = []
                for name in ("single", "sorted"):
                    called = held & r["skewed"] & (r["stream"] == name)
                    hit = called & outside
                    acc = (f" ({100 * r['acc'][hit].mean():.1f} -> {100 * r['acc_single'][hit].mean():.1f} %)"
                           if hit.any() else "")
                    cells.append(f"{int(hit.sum())} / {int(called.sum())}{acc}")
                print(f"| {bs} | {fam} | {layer} | [{lo:.3f}, {hi:.3f}] | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
