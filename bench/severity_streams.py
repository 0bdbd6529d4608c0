"""The goal table on validation streams built like the test's, one severity at a time
(validation data only; nothing is chosen here).

The demo's test streams mix corruptions of one severity (13 types at severity 3, or at 5), and
its goal table compares ``datta_cal`` with the best baseline per stream.  ``calibrate`` judges
its candidates on validation streams over every validation domain at once: clean held-out
images and the three validation corruptions at severities 1-5, so a validation ``mixed``
batch pools all severities and the clean images (its source shift near zero), where a test
``mixed`` batch at severity 5 pools only heavily shifted images.  This script builds the
demo's five streams (single, label-sorted, mixed, dynamic, dynamic-random; the demo's
``make_stream`` with its seed) over the three validation corruptions at one severity, for
each severity 1-5 (1000 validation images per corruption, the second half of the Fashion-MNIST
test set), runs the goal's baselines (source, tbn, bn_adapt, tent at the demo's lr, dyn),
``datta_cal`` and ``datta_cal_oracle`` on each in lockstep, and prints per severity the
accuracies and the goal margins.  It answers one question: do the validation data, arranged
as the test streams are, show the losses the test tables show at severity 5?

    python bench/severity_streams.py [--batch-size 16 64]

``datta_cal`` is the demo's: the calibration cache's file for these inputs when there is one
(run the demo first), else ``calibrate`` as the demo runs it.
"""
from __future__ import annotations

import argparse
import copy

from _validation_setup import defined_batches, setup

from datta_kernels.calibration import BLEND_GRID, default_batches, rule_name
from datta_kernels.eval.cal_cache import cached_calibrate
from datta_kernels.eval.corruptions import SEVERITIES
from datta_kernels.eval.runner import METHODS, DemoConfig, cal_rates, run_lockstep
from datta_kernels.eval.streams import STREAMS, make_stream
from datta_kernels.eval.validation import VALIDATION, pool_of

BASELINES = ("source", "tbn", "bn_adapt", "tent", "dyn")
ROWS = BASELINES + ("datta_cal", "datta_cal_oracle")
SHORT = {"single": "single", "single_noniid": "noniid", "mixed": "mixed", "dynamic": "dynamic",
         "dynamic_random": "dyn_rand"}


def margins(acc: dict[str, dict[str, float]], method: str) -> dict[str, tuple[float, str]]:
    """``method``'s goal margin per stream: points against the best baseline (the label-sorted
    stream: against the source model), as the demo's goal table reads the test streams."""
    out = {}
    for s in acc[method]:
        rivals = ("source",) if s == "single_noniid" else BASELINES
        best = max(rivals, key=lambda b: acc[b][s])
        out[s] = (acc[method][s] - acc[best][s], best)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, nargs="+", default=[16, 64])
    args = p.parse_args()
    cfg = DemoConfig()
    _, model, vdom = setup("The goal table on validation streams of one severity", __doc__,
                           per_domain=cfg.validation_per_domain)
    print(f"- baselines as the demo builds them (tent at lr {cfg.lr:g}); every method starts afresh on "
          "each stream; streams: the demo's, seed " f"{cfg.seed}\n")
    summary = []
    for bs in args.batch_size:
        cal, info = cached_calibrate(model, vdom, bs, n_batches=default_batches(bs), lr=cal_rates(cfg.lr),
                                     backend=cfg.backend, seed=cfg.seed, grid=BLEND_GRID)
        where = "the calibration cache" if info["source"] == "cache" else "calibrated"
        print(f"## Batch size {bs}\n\n`datta_cal` ({where}): "
              f"{rule_name(cal.threshold, cal.low, cal.skew_cut, cal.shift_cut)}\n")
        for sev in SEVERITIES:
            pool = pool_of({f"{c}@{sev}": vdom[f"{c}@{sev}"] for c in VALIDATION})
            acc: dict[str, dict[str, float]] = {m: {} for m in ROWS}
            for sname in STREAMS:
                stream = defined_batches(make_stream(pool, sname, bs, cfg.seed))
                kw = {"cal": {bs: cal}}
                adapters = {m: METHODS[m](copy.deepcopy(model), cfg.backend, cfg.lr, kw, stream)
                            for m in ROWS}
                for r in run_lockstep(adapters, stream, pool.batches(stream)):
                    acc[r.method][sname] = 100.0 * r.accuracy
            print(f"### Severity {sev} ({', '.join(pool.names)}; {len(pool.y)} images)\n")
            print("| method | " + " | ".join(SHORT[s] for s in STREAMS) + " |\n|---|" + "---|" * len(STREAMS))
            for m in ROWS:
                print(f"| {m} | " + " | ".join(f"{acc[m][s]:.1f}" for s in STREAMS) + " |")
            for m in ("datta_cal", "datta_cal_oracle"):
                mg = margins(acc, m)
                cells = " | ".join(f"{mg[s][0]:+.1f} ({mg[s][1]})" for s in STREAMS)
                print(f"| {m} margin | {cells} |")
                if m == "datta_cal":
                    met = sum(v >= (0.0 if s == "single_noniid" else -0.5) for s, (v, _) in mg.items())
                    summary.append((bs, sev, met, mg))
            print()
    print("## Summary: `datta_cal`'s goal margins (points) on the validation streams of one severity\n")
    print("| bs | severity | " + " | ".join(SHORT[s] for s in STREAMS) + " | goals met |\n|---|---|"
          + "---|" * (len(STREAMS) + 1))
    for bs, sev, met, mg in summary:
        print(f"| {bs} | {sev} | " + " | ".join(f"{mg[s][0]:+.1f}" for s in STREAMS) + f" | {met} of 5 |")


if __name__ == "__main__":
    main()
