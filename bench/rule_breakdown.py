"""Where ``datta_cal``'s decision rule loses on its own validation streams (validation set only).

Never test data.  Each batch of the streams ``calibrate`` judges the rule on (single, dynamic,
label-sorted; every validation image once) by what decided it — the score cut (``multiple``),
a high prediction spread (``single``), the source shift outside the validated range
(``single``), or ``skewed`` — with the batches' accuracy without DAFT.  ``calibrate`` runs
here at each batch size with one DAFT rate (1e-3; DAFT is then switched off for the breakdown).

    python bench/rule_breakdown.py > bench/results/rule_breakdown.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import setup, without_daft

from datta_kernels import calibrate
from datta_kernels import calibration as cal


def main() -> None:
    _, model, vdom = setup("Where the decision rule loses on the validation streams (validation set only)",
                           __doc__)
    print("| bs | stream | batches | accuracy | decided by | batches | their accuracy | their shift |\n"
          "|---|---|---|---|---|---|---|---|")
    for bs in (16, 64):
        c = calibrate(copy.deepcopy(model), vdom, bs, lr=1e-3).calibration
        lo, hi = c.shift_cut
        adapter = without_daft(c).adapter(copy.deepcopy(model).eval())
        x, y, streams = cal._streams(vdom, bs, 0)
        for name in ("single", "dynamic", "sorted"):
            rows = []
            with torch.no_grad():
                for b in streams[name]:
                    hit = (adapter(x[b]).argmax(1) == y[b]).float().mean()
                    rows.append([float(v) for v in (adapter._last_score, adapter.last_spread,
                                                    adapter.last_shift, hit)])
            r = np.array(rows)
            score, spread, shift, acc = r.T
            mult = score >= c.threshold
            low = ~mult & (spread < c.skew_cut)
            cats = {"score: multiple": mult, "spread high: single": ~mult & ~low,
                    "shift above the range: single": low & (shift > hi),
                    "shift below the range: single": low & (shift < lo),
                    "skewed": low & (shift >= lo) & (shift <= hi)}
            head = f"| {bs} | {name} | {len(r)} | {100 * acc.mean():.1f} % |"
            for k, m in cats.items():
                if m.any():
                    print(f"{head} {k} | {int(m.sum())} | {100 * acc[m].mean():.1f} % | "
                          f"{shift[m].min():.3f} to {shift[m].max():.3f} |")
                    head = "| | | | |"
        print(f"| {bs} | rule | | | score cut {c.threshold:.4g}, spread cut {c.skew_cut:.4g}, "
              f"shift range [{lo:.4g}, {hi:.4g}] | | | |")


if __name__ == "__main__":
    main()
