"""How optimistic are ``calibrate``'s validation streams about the misfire?  The decision rule on
the validation streams with a class probe that never saw the batch's corruption family.

``calibrate`` chooses the spread cut of its rule (SPEC §6 step 4) on spreads from probes fitted
without each sample's corruption family, because at test time every corruption is unseen.  Its
validation *streams* (steps 4-5: which rule, the statistics of ``skewed`` batches, the output
check, DAFT) ran the deployed probe, fitted on every validation family, until
``calibrate(held_out_streams=True)`` became the default; with it, each stream batch is decided
with the probe fitted without its family.  This script shows what that changes on the
single-domain and the label-sorted validation streams (every validation image once; never test
data), with the demo's calibrated configuration without DAFT (loaded through the demo's
calibration cache) run both ways: with the deployed probe, and with, for each batch, the probe
fitted on ``calibrate``'s own fitting batches without that batch's family (the family of most of
its samples, ties to the family listed first: ``calibrate``'s own rule).  It counts the i.i.d.
batches the rule calls ``skewed`` (*misfires*; before and after the output check), the
label-sorted batches it calls ``skewed`` and those it sends to ``single`` (where DAFT would step
on them), per family, and the streams' accuracy.  Nothing in the library is chosen from it.

    python bench/skew_heldout.py > bench/results/skew_heldout.md
"""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import torch
from _validation_setup import setup, without_daft

from datta_kernels import calibration as cal
from datta_kernels.diversity import ClassProbe
from datta_kernels.eval.cal_cache import cached_calibrate
from datta_kernels.eval.runner import DemoConfig, cal_settings

STREAMS = ("single", "sorted")


def _family_index(vdom) -> tuple[dict[str, int], dict[int, str]]:
    """Domain name -> ``calibrate``'s family index, and family index -> family name."""
    names = list(vdom)
    index = dict(zip(names, cal._families(names)))
    return index, {i: n.split("@", 1)[0] for n, i in index.items()}


def _probes(rep, model, vdom, bs: int, cfg: DemoConfig) -> tuple[dict[str, ClassProbe], float]:
    """Family name -> the probe fitted on ``calibrate``'s fitting batches without that family
    (the second draw of its batches, redrawn here with its generator), and the largest
    difference between a probe refitted on every family and the deployed one (a check that the
    fitting data are ``calibrate``'s)."""
    names = list(vdom)
    settings = cal_settings(cfg, bs)
    g = torch.Generator().manual_seed(settings["seed"])
    groups = cal.mixing_groups(names, settings.get("mixing"))
    cal._batches(vdom, bs, settings["n_batches"], g, None, groups)            # step 1's draw
    fam_of: dict = {}
    fit = cal._batches(vdom, bs, settings["n_batches"], g, fam_of, groups)
    work = without_daft(rep).adapter(copy.deepcopy(model).eval()).model
    x = [b for k in ("single", "mixed") for b, _ in fit[k]]
    y = torch.cat([t for k in ("single", "mixed") for _, t in fit[k]])
    feats = torch.cat(cal._scores(work, x, shift=False)[1])
    fams = torch.cat([f for k in ("single", "mixed") for f in fam_of[k]])
    k = int(y.max()) + 1
    family = _family_index(vdom)[1]
    out = {family[i]: p for i, p in cal._held_out_probes(feats, y, fams, k).items()}   # calibrate's own
    every = ClassProbe.fit(feats, y, k)
    diff = max(float((a - b).abs().max()) for a, b in zip(every.state_dict().values(),
                                                          rep.probe.state_dict().values()))
    return out, diff


def _run(rep, model, vdom, bs: int, cfg: DemoConfig, held_out: dict[str, ClassProbe] | None) -> dict:
    """One pass of each stream: accuracy (%), and per family the batches first called
    ``skewed`` (released ones included), those released and those ending ``single`` (released
    ones included)."""
    index, family = _family_index(vdom)
    x, y, streams = cal._streams(vdom, bs, cfg.seed)
    out = {}
    with torch.no_grad():
        for name in STREAMS:
            adapter = without_daft(rep).adapter(copy.deepcopy(model).eval())
            skewed, released, single, batches = Counter(), Counter(), Counter(), Counter()
            correct = total = 0
            for b, i in zip(streams[name], cal._batch_families(vdom, index, streams[name])):
                fam = family[i]                             # calibrate's own majority rule
                if held_out is not None:
                    adapter.class_probe = held_out[fam]
                logits = adapter(x[b])
                correct += int((logits.argmax(1) == y[b]).sum())
                total += len(b)
                batches[fam] += 1
                if adapter.last_decision == "skewed" or adapter.last_released:
                    skewed[fam] += 1
                released[fam] += bool(adapter.last_released)
                single[fam] += adapter.last_decision == "single"
            out[name] = {"acc": 100.0 * correct / total, "skewed": skewed, "released": released,
                         "single": single, "batches": batches}
    return out


def main() -> None:
    cfg = DemoConfig()
    _, model, vdom = setup("The decision rule on the validation streams with held-out class probes "
                           "(validation set only)", __doc__, per_domain=cfg.validation_per_domain)
    for bs in (16, 64):
        rep, info = cached_calibrate(model, vdom, bs, **cal_settings(cfg, bs))
        probes, diff = _probes(rep, model, vdom, bs, cfg)
        print(f"\n## Batch size {bs}\n\n- calibration: {info['source']}; rule {rep.selector()}, output "
              f"check {rep.output_spread_cut}\n- probe refitted on every family vs the deployed probe: "
              f"largest difference {diff:.2e}\n")
        runs = {"deployed": _run(rep, model, vdom, bs, cfg, None),
                "held out": _run(rep, model, vdom, bs, cfg, probes)}
        print("| probe | single acc | sorted acc | mean | family | i.i.d. batches | misfires (first "
              "called skewed) | released of them | sorted batches | sorted called skewed | sorted "
              "ending single |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for how, r in runs.items():
            s, t = r["single"], r["sorted"]
            for fam in sorted(s["batches"]):
                print(f"| {how} | {s['acc']:.2f} | {t['acc']:.2f} | {np.mean([s['acc'], t['acc']]):.2f} | "
                      f"{fam} | {s['batches'][fam]} | {s['skewed'][fam]} | {s['released'][fam]} | "
                      f"{t['batches'][fam]} | {t['skewed'][fam]} | {t['single'][fam]} |")


if __name__ == "__main__":
    main()
