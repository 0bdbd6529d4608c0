"""Does the spread of a batch's *output* predictions tell a label-sorted batch from an i.i.d.
one that the rule called ``skewed``?  (Validation set only.)

Never test data.  ``calibrate`` runs at each batch size as the demo runs it but with one DAFT
rate, 1e-3 (DAFT is then switched off: steps 1-4 do not depend on it).  A fresh adapter of that
configuration runs the single-domain and the label-sorted validation streams (every validation
image once); for every batch the rule calls ``skewed``, this records the
:func:`~datta_kernels.prediction_spread` of the adapter's own output logits (what it predicted,
read after the forward: no extra pass) and of a twin adapter's that calls every batch
``single``, with the batch's accuracy under each.  An i.i.d. batch called ``skewed`` is a
*misfire*; a label-sorted one is what the decision exists for.  A signal that ranks the misfires
above the sorted batches (AUROC near 100 %) in every validation family could let a later rule
send a ``skewed`` batch whose output is spread to ``single`` (a second forward, on those batches
only); the signal has no fitted parameter, so the AUROC is read per family and pooled.

    python bench/skew_output.py > bench/results/skew_output.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import image_families, setup, without_daft
from scipy.stats import mannwhitneyu

from datta_kernels import ThresholdSelector, calibrate, prediction_spread
from datta_kernels import calibration as cal


def _rows(c, model, vdom, bs: int) -> dict[str, np.ndarray]:
    off = without_daft(c)
    fam_of = image_families(vdom)
    x, y, streams = cal._streams(vdom, bs, 0)
    out = {k: [] for k in ("stream", "family", "spread", "spread_single", "acc", "acc_single")}
    with torch.no_grad():
        for name in ("single", "sorted"):
            adapter = off.adapter(copy.deepcopy(model).eval())
            single = off.adapter(copy.deepcopy(model).eval(), selector=ThresholdSelector(1e9))
            for b in streams[name]:
                logits = adapter(x[b])
                twin = single(x[b])
                fams = set(fam_of[b.numpy()])
                if adapter.last_decision != "skewed" or len(fams) > 1:
                    continue
                out["stream"].append(name)
                out["family"].append(fams.pop())
                out["spread"].append(float(prediction_spread(logits)))
                out["spread_single"].append(float(prediction_spread(twin)))
                out["acc"].append(float((logits.argmax(1) == y[b]).float().mean()))
                out["acc_single"].append(float((twin.argmax(1) == y[b]).float().mean()))
    return {k: np.array(v) for k, v in out.items()}


def _auroc(pos: np.ndarray, neg: np.ndarray) -> str:
    """AUROC (%) of 'higher = positive' (ties count half), '-' without both classes."""
    if len(pos) == 0 or len(neg) == 0:
        return "-"
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return f"{100 * u / (len(pos) * len(neg)):.1f}"


def _dist(r: dict, m: np.ndarray) -> str:
    v = r["spread"][m]
    return f"{np.median(v):.3f} [{v.min():.3f}, {v.max():.3f}]" if m.any() else "-"


def _accs(r: dict, m: np.ndarray) -> str:
    return f"{100 * r['acc'][m].mean():.1f} -> {100 * r['acc_single'][m].mean():.1f} %" if m.any() else "-"


def main() -> None:
    _, model, vdom = setup("The output's prediction spread of batches called `skewed` (validation set only)",
                           __doc__)
    print("| bs | family | misfires (i.i.d. called skewed) | sorted called skewed | AUROC output spread "
          "(decided) | AUROC output spread (as single) | misfires: spread decided, median [min, max] "
          "| sorted: spread decided, median [min, max] | misfires: accuracy decided -> single "
          "| sorted: accuracy decided -> single |\n|---|---|---|---|---|---|---|---|---|---|")
    for bs in (16, 64):
        c = calibrate(copy.deepcopy(model), vdom, bs, lr=1e-3).calibration
        r = _rows(c, model, vdom, bs)
        for fam in sorted(set(r["family"])) + ["pooled"]:
            sel = np.ones(len(r["family"]), bool) if fam == "pooled" else r["family"] == fam
            mis, srt = sel & (r["stream"] == "single"), sel & (r["stream"] == "sorted")
            print(f"| {bs} | {fam} | {int(mis.sum())} | {int(srt.sum())} | "
                  f"{_auroc(r['spread'][mis], r['spread'][srt])} | "
                  f"{_auroc(r['spread_single'][mis], r['spread_single'][srt])} | {_dist(r, mis)} | "
                  f"{_dist(r, srt)} | {_accs(r, mis)} | {_accs(r, srt)} |")


if __name__ == "__main__":
    main()
