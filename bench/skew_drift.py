"""A label-skew signal that does not rest on the class probe (a study for ``datta_cal``'s
``skewed`` decision, SPEC §6-7), on the demo's validation set only (never test data).

The probe's prediction spread calls a batch ``skewed`` when its samples are classified alike.
Under a corruption that hides the classes from the score layer, an i.i.d. batch is classified
alike too, and the spread cannot tell it from a label-sorted one.  What a label-sorted
*stream* does and an i.i.d. one does not is change its class content from batch to batch, so
the batch mean of the score layer's instance means moves, while within an i.i.d. domain it
only moves by sampling noise.  The *class drift* of batch ``t``:
``mean_c (z_t[c] - e_{t-1}[c])^2`` with ``z_t = mean_n (mu_i - mu_s) / sqrt(var_s + eps)`` the
batch's source-standardised mean at the score layer and ``e`` an exponential moving average
of past ``z`` (``e_t = m e_{t-1} + (1 - m) z_t``; ``m = 0`` is the previous batch).  This file
measures, at the demo's validation streams (``calibrate``'s: every validation image once),
how well the drift separates the label-sorted stream's batches from the single-domain and
dynamic streams' i.i.d. ones (AUROC; the first batch of each stream, which has no past, is
left out), per batch size and momentum, (1) over all batches and (2) over the batches the
spread rule would call ``skewed`` (spread below ``calibrate``'s cut): could the drift, as a
second condition, drop the i.i.d. ones among them?  ``calibrate`` runs here on the validation
domains at each batch size (one DAFT rate, 1e-3: DAFT does not touch the score layer's input);
its blend of the layers before the score layer, its class probe and its spread cut are used.

    python bench/skew_drift.py > bench/results/skew_drift.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import setup
from scipy.stats import mannwhitneyu

from datta_kernels import calibrate
from datta_kernels import calibration as cal
from datta_kernels.nn import dabn_layers, first_nonlinear_layer
from datta_kernels.surgery import convert_model

MOMENTA = (0.0, 0.5, 0.9)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half (the Mann-Whitney U statistic)."""
    return float(mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))


def batch_means(work, layer, probe, x: torch.Tensor, batches) -> tuple[np.ndarray, np.ndarray]:
    """``z_t`` of every batch ``(T, C)`` and its prediction spread ``(T,)``."""
    out, spread = [], []
    sd = torch.rsqrt(layer.source_var.float() + layer.eps)
    with torch.no_grad():
        for b in batches:
            work(x[b])
            mean_i, var_i = layer.last_stats
            out.append(((mean_i.float().mean(0) - layer.source_mean.float()) * sd).numpy())
            spread.append(float(probe(mean_i, var_i, layer.source_mean, layer.source_var, layer.eps)))
    return np.stack(out), np.array(spread)


def drift(z: np.ndarray, m: float) -> np.ndarray:
    """Class drift of batches ``1..T-1`` (batch 0 has no past)."""
    e, out = z[0].copy(), []
    for t in range(1, len(z)):
        out.append(float(np.mean((z[t] - e) ** 2)))
        e = m * e + (1 - m) * z[t]
    return np.array(out)


def main() -> None:
    _, model, vdom = setup("A class-drift signal for label-sorted streams (validation set only)", __doc__)
    rows, low_rows = [], []
    for bs in (16, 64):
        c = calibrate(copy.deepcopy(model), vdom, bs, lr=1e-3).calibration
        work = convert_model(copy.deepcopy(model).eval(), "datta", **cal.INSTANCE_MODES[c.instance_mode])
        layers = dabn_layers(work)
        pre = first_nonlinear_layer(work, next(iter(vdom.values()))[0][:bs])
        layer = layers[pre]
        layer.compute_score, layer.score_mode = True, "dispersion"     # keeps last_stats
        cal._configure(layers, pre, c.pre_blend, (c.single_blend,) * 3, c.instance_mode)
        x, _, streams = cal._streams(vdom, bs, 0)
        got = {k: batch_means(work, layer, c.probe, x, streams[k]) for k in ("single", "dynamic", "sorted")}
        low = {k: s[1:] < c.skew_cut for k, (_, s) in got.items()}
        for m in MOMENTA:
            d = {k: drift(z, m) for k, (z, _) in got.items()}
            rows.append(f"| {bs} | {m} | {100 * auroc(d['sorted'], d['single']):.1f} % | "
                        f"{100 * auroc(d['sorted'], d['dynamic']):.1f} % | "
                        + " / ".join(f"{np.median(d[k]):.4f}" for k in ("single", "dynamic", "sorted"))
                        + " |")
            iid = np.concatenate([d[k][low[k]] for k in ("single", "dynamic")])
            srt = d["sorted"][low["sorted"]]
            keep = np.quantile(srt, 0.1) if len(srt) else np.nan     # a cut keeping 90 % of them
            low_rows.append(f"| {bs} | {c.skew_cut:.4g} | {m} | {len(srt)} of {len(d['sorted'])} | "
                            f"{len(iid)} of {sum(len(d[k]) for k in ('single', 'dynamic'))} | "
                            + (f"{100 * auroc(srt, iid):.1f} % | {100 * np.mean(iid < keep):.1f} % |"
                               if len(iid) and len(srt) else "- | - |"))
    print("## 1. All batches\n")
    print("| bs | momentum | AUROC sorted vs single | AUROC sorted vs dynamic | "
          "median drift single / dynamic / sorted |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n## 2. The batches whose spread is below the spread cut (the rule's score cut and shift "
          "range not applied)\n")
    print("| bs | spread cut | momentum | sorted batches | i.i.d. batches (single + dynamic) | "
          "AUROC of the drift, sorted vs i.i.d. | i.i.d. dropped by a drift cut keeping 90 % of "
          "the sorted |\n|---|---|---|---|---|---|---|")
    print("\n".join(low_rows))


if __name__ == "__main__":
    main()
