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

    python bench/severity_streams.py [--batch-size 16 64] [--mixing all severity]

``datta_cal`` is the demo's: the calibration cache's file for these inputs when there is one
(run the demo first), else ``calibrate`` as the demo runs it.  ``--mixing``: one row (and its
oracle) per ``calibrate(mixing=...)`` setting (``datta_cal`` for ``all``, the demo's default;
``datta_cal_<mixing>`` for the others), each calibrated as the demo with
``--validation-mixing`` calibrates it.
"""
from __future__ import annotations

import argparse
import copy

from _validation_setup import defined_batches, setup

from datta_kernels.calibration import BLEND_GRID, default_batches, rule_name
from datta_kernels.eval.cal_cache import cached_calibrate
from datta_kernels.eval.corruptions import SEVERITIES
from datta_kernels.eval.report import GOAL_BASELINES, goal_for
from datta_kernels.eval.runner import METHODS, DemoConfig, cal_rates, run_lockstep
from datta_kernels.eval.streams import STREAMS, make_stream
from datta_kernels.eval.validation import VALIDATION, pool_of

SHORT = {"single": "single", "single_noniid": "noniid", "mixed": "mixed", "dynamic": "dynamic",
         "dynamic_random": "dyn_rand"}


def margins(acc: dict[str, dict[str, float]], method: str) -> dict[str, tuple[float, str]]:
    """``method``'s goal margin per stream: points against the best baseline (the label-sorted
    stream: against the source model), as the demo's goal table reads the test streams."""
    out = {}
    for s in acc[method]:
        rivals = goal_for(s)[0]
        best = max(rivals, key=lambda b: acc[b][s])
        out[s] = (acc[method][s] - acc[best][s], best)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, nargs="+", default=[16, 64])
    p.add_argument("--mixing", nargs="+", default=["all"], choices=["all", "severity"])
    args = p.parse_args()
    names = {mix: "datta_cal" if mix == "all" else f"datta_cal_{mix}" for mix in args.mixing}
    cal_rows = [r for n in names.values() for r in (n, f"{n}_oracle")]
    rows = GOAL_BASELINES + tuple(cal_rows)
    cfg = DemoConfig()
    _, model, vdom = setup("The goal table on validation streams of one severity", __doc__,
                           per_domain=cfg.validation_per_domain)
    print(f"- baselines as the demo builds them (tent at lr {cfg.lr:g}); every method starts afresh on "
          "each stream; streams: the demo's, seed " f"{cfg.seed}\n")
    summary = []
    for bs in args.batch_size:
        print(f"## Batch size {bs}\n")
        cals = {}
        for mix, name in names.items():
            settings = dict(n_batches=default_batches(bs), lr=cal_rates(cfg.lr), backend=cfg.backend,
                            seed=cfg.seed, grid=BLEND_GRID) | ({} if mix == "all" else {"mixing": mix})
            cals[name], info = cached_calibrate(model, vdom, bs, **settings)     # the demo's settings
            where = "the calibration cache" if info["source"] == "cache" else "calibrated"
            c = cals[name]
            print(f"- `{name}` (mixing {mix}; {where}): multiple {c.multiple_blend}, pre blend "
                  f"{c.pre_blend}, {rule_name(c.threshold, c.low, c.skew_cut, c.shift_cut)}, DAFT "
                  + (f"lr {c.lr:g}" if c.daft else "off"))
        print()
        for sev in SEVERITIES:
            pool = pool_of({f"{c}@{sev}": vdom[f"{c}@{sev}"] for c in VALIDATION})
            acc: dict[str, dict[str, float]] = {m: {} for m in rows}
            for sname in STREAMS:
                stream = defined_batches(make_stream(pool, sname, bs, cfg.seed))
                adapters = {}
                for m in rows:
                    cal = next((c for n, c in cals.items() if m in (n, f"{n}_oracle")), None)
                    kind = "datta_cal_oracle" if m.endswith("_oracle") else "datta_cal" if cal else m
                    adapters[m] = METHODS[kind](copy.deepcopy(model), cfg.backend, cfg.lr, {"cal": {bs: cal}},
                                                stream)
                for r in run_lockstep(adapters, stream, pool.batches(stream)):
                    acc[r.method][sname] = 100.0 * r.accuracy
            print(f"### Severity {sev} ({', '.join(pool.names)}; {len(pool.y)} images)\n")
            print("| method | " + " | ".join(SHORT[s] for s in STREAMS) + " |\n|---|" + "---|" * len(STREAMS))
            for m in rows:
                print(f"| {m} | " + " | ".join(f"{acc[m][s]:.1f}" for s in STREAMS) + " |")
            for m in cal_rows:
                mg = margins(acc, m)
                cells = " | ".join(f"{mg[s][0]:+.1f} ({mg[s][1]})" for s in STREAMS)
                print(f"| {m} margin | {cells} |")
                if not m.endswith("_oracle"):
                    met = sum(v >= goal_for(s)[1] for s, (v, _) in mg.items())
                    summary.append((m, bs, sev, met, mg))
            print()
    print("## Summary: goal margins (points) on the validation streams of one severity\n")
    print("| row | bs | severity | " + " | ".join(SHORT[s] for s in STREAMS) + " | mean | goals met |\n"
          "|---|---|---|" + "---|" * (len(STREAMS) + 2))
    for m, bs, sev, met, mg in sorted(summary, key=lambda r: (r[0], r[1], r[2])):
        mean = sum(v for v, _ in mg.values()) / len(mg)
        print(f"| {m} | {bs} | {sev} | " + " | ".join(f"{mg[s][0]:+.1f}" for s in STREAMS)
              + f" | {mean:+.2f} | {met} of 5 |")


if __name__ == "__main__":
    main()
