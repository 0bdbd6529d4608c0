"""How firm are the demo's goal margins?  ``datta_cal`` and the goal's baselines on redrawn test
sets, with paired standard errors.

The demo reports one draw of its test set (``--seed 0``: which 1000 of the first 5000
Fashion-MNIST test images, the corruption noise, the stream orders).  This script keeps
everything the validation data decided fixed (``calibrate`` runs once per batch size exactly as
the demo runs it, validation seed 0, through the demo's calibration cache, so its configuration
is the demo's) and redraws only the test side: for each test seed it builds the demo's test pool
and five streams at severity 3 and 5 and runs ``source``, ``tbn``, ``bn_adapt``, ``tent``,
``dyn`` and ``datta_cal`` in lockstep (the demo's loop).  For each cell it reports
``datta_cal``'s goal margin (points against the best of the five baselines; the label-sorted
stream against ``source``) and the paired standard error of that margin over the stream's
batches, ``sqrt(n_b * var(d)) / N * 100`` with ``d`` the per-batch difference of correct
predictions (image sampling noise only; batches of one continual stream are not independent, so
it is a guide, not a test).  Nothing is chosen from these numbers.  Seed 0 is the demo's own
draw: its rows are checked against the demo's ``results.json`` files when given
(``--demo-json``), so the script also shows that the demo reproduces.

    python bench/demo_seeds.py --seeds 0,1,2 --demo-json bench/results/demo_sev3.json \
        bench/results/demo_sev5.json --json bench/results/demo_seeds.json > bench/results/demo_seeds.md
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels.eval.cal_cache import cached_calibrate
from datta_kernels.eval.report import GOAL_BASELINES, goal_for, short_name
from datta_kernels.eval.runner import METHODS, DemoConfig, cal_settings, run_lockstep
from datta_kernels.eval.streams import STREAMS, make_stream
from datta_kernels.eval.validation import test_pool

#: the rows run on every stream: the goal's baselines and ``datta_cal``
ROWS = (*GOAL_BASELINES, "datta_cal")


def paired_margin(cal: list[int], base: list[int], sizes: list[int]) -> tuple[float, float]:
    """``(margin, se)`` in accuracy points: ``cal``'s accuracy minus ``base``'s over one stream
    (per-batch correct counts, ``sizes`` the batch sizes) and the paired standard error of that
    difference, the per-batch differences taken as independent draws."""
    d = np.asarray(cal, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    n = float(np.sum(sizes))
    if len(d) < 2:
        raise ValueError("a paired standard error needs at least two batches")
    return 100.0 * d.sum() / n, 100.0 * math.sqrt(len(d) * d.var(ddof=1)) / n


def goal_margin(correct: dict[str, list[int]], sizes: list[int], stream: str) -> tuple[str, float, float]:
    """``(baseline, margin, se)``: ``datta_cal`` against the goal's baseline on one stream (the
    best by accuracy of the rows ``goal_for`` holds it to)."""
    best = max(goal_for(stream)[0], key=lambda m: sum(correct[m]))
    return (best, *paired_margin(correct["datta_cal"], correct[best], sizes))


def goal_cell(model, cals: dict, cfg: DemoConfig, pool, name: str, bs: int,
              seed: int) -> tuple[dict, dict[str, float]]:
    """One cell of the goal table: :data:`ROWS` in lockstep (the demo's loop) on stream ``name``
    of ``pool`` at batch size ``bs`` (stream seed ``seed``; ``datta_cal`` from ``cals``, batch
    size -> Calibration).  Returns the cell (``batch_size``, ``stream``, each row's
    ``accuracy`` in %, the ``best`` baseline, ``datta_cal``'s goal ``margin`` and its paired
    ``se``, whether it ``met`` the goal) and each row's accuracy as a fraction."""
    stream = make_stream(pool, name, bs, seed)
    adapters = {m: METHODS[m](copy.deepcopy(model), cfg.backend, cfg.lr, {"cal": cals}, stream) for m in ROWS}
    runs = run_lockstep(adapters, stream, pool.batches(stream))
    acc = {r.method: r.accuracy for r in runs}
    best, margin, se = goal_margin({r.method: r.correct for r in runs}, runs[0].sizes, name)
    return ({"batch_size": bs, "stream": name, "accuracy": {m: 100 * a for m, a in acc.items()}, "best": best,
             "margin": margin, "se": se, "met": bool(margin >= goal_for(name)[1])}, acc)


def progress(where: str, cell: dict, t0: float) -> None:
    """One cell's margin as an HTML comment (it survives in the Markdown output, unrendered)."""
    print(f"<!-- {where}: margin {cell['margin']:+.2f} +- {cell['se']:.2f} vs {cell['best']} "
          f"({time.perf_counter() - t0:.0f} s) -->", flush=True)


def demo_rows(docs: dict[str, dict]) -> dict:
    """``(severity, method, stream, bs) -> accuracy`` of the demo runs' results.json documents."""
    return {(doc["meta"]["config"]["severity"], r["method"], r["stream"], r["batch_size"]): r["accuracy"]
            for doc in docs.values() for r in doc["results"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--severities", default="3,5")
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--demo-json", nargs="*", default=[])
    ap.add_argument("--json", default=None, help="write every cell's numbers here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sevs = [int(s) for s in args.severities.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = DemoConfig()
    data, model, vdom = setup("How firm are the demo's goal margins: redrawn test sets", __doc__,
                              per_domain=cfg.validation_per_domain)
    docs = {p: json.load(open(p)) for p in args.demo_json}
    demo = demo_rows(docs)
    t0 = time.perf_counter()
    cals, sources = {}, {}
    for bs in sizes:       # the demo's settings and cache: a demo run's choices are loaded, not redone
        cals[bs], info = cached_calibrate(model, vdom, bs, **cal_settings(cfg, bs))
        sources[bs] = info["source"]
    print(f"- calibration (validation seed {cfg.seed}, as the demo; "
          f"{', '.join(f'bs {bs}: {s}' for bs, s in sources.items())}): {time.perf_counter() - t0:.0f} s")
    for p, doc in docs.items():
        for bs in sizes:
            mine = json.dumps(json.loads(json.dumps(cals[bs].as_dict())), sort_keys=True)
            theirs = json.dumps(doc["datta_cal"][str(bs)], sort_keys=True)
            print(f"- bs {bs}: configuration equal to `{p}`'s `datta_cal`: "
                  f"{'yes' if mine == theirs else 'NO'}")
    print(f"- test seeds {seeds}; severities {sevs}; methods {', '.join(GOAL_BASELINES)}, datta_cal\n",
          flush=True)
    cells, mismatches, checked = [], [], 0
    for sev in sevs:
        for seed in seeds:
            pool = test_pool(data, cfg.per_domain, sev, seed, cfg.test_corruptions, False)
            for bs in sizes:
                for name in STREAMS:
                    cell, acc = goal_cell(model, cals, cfg, pool, name, bs, seed)
                    if seed == cfg.seed:
                        for m, a in acc.items():
                            if (sev, m, name, bs) in demo:
                                checked += 1
                                if demo[sev, m, name, bs] != a:
                                    mismatches.append((sev, m, name, bs, demo[sev, m, name, bs], a))
                    cells.append({"severity": sev, "seed": seed} | cell)
                    progress(f"sev {sev} seed {seed} bs {bs} {name}", cell, t0)
    if args.demo_json:
        print(f"\n- seed-{cfg.seed} rows checked against the demo runs: {checked}, "
              + ("all equal to the last digit" if not mismatches
                 else f"{len(mismatches)} differ: {mismatches}"))
    report(cells, seeds, sevs, sizes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": seeds, "cells": cells,
                       "calibration": {bs: cals[bs].as_dict() for bs in sizes}}, f, indent=1, default=str)


def report(cells: list[dict], seeds: list[int], sevs: list[int], sizes: list[int]) -> None:
    print("\n`datta_cal`'s goal margin per test seed (points; ± its paired standard error; the "
          "baseline it is held to in brackets; goal >= -0.5, label-sorted >= 0):\n")
    print("| severity | bs | stream | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean | met (of seeds) |")
    print("|---|---|---|" + "---|" * (len(seeds) + 2))
    at = {(c["severity"], c["seed"], c["batch_size"], c["stream"]): c for c in cells}
    met_by_seed = {(sev, s): 0 for sev in sevs for s in seeds}
    for sev in sevs:
        for bs in sizes:
            for name in STREAMS:
                row = [at[sev, s, bs, name] for s in seeds]
                for s, c in zip(seeds, row):
                    met_by_seed[sev, s] += c["met"]
                print(f"| {sev} | {bs} | {short_name(name)} | "
                      + " | ".join(f"{c['margin']:+.2f} ± {c['se']:.2f} ({c['best']})" for c in row)
                      + f" | {np.mean([c['margin'] for c in row]):+.2f} | {sum(c['met'] for c in row)} |")
    print("\nGoals met (of " + str(len(sizes) * len(STREAMS)) + ") per severity and test seed:\n")
    print("| severity | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for sev in sevs:
        print(f"| {sev} | " + " | ".join(str(met_by_seed[sev, s]) for s in seeds) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
