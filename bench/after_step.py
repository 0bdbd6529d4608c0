"""What a DAFT step costs the call after it: the demo's ``datta_cal`` and ``tbn``, each timed
right after one of ``datta_cal``'s fine-tuning steps and right after a call of its own.

``bench_cal_stream.py`` found ``datta_cal``'s calls that follow one of its fine-tuned batches
slower than the others.  This separates the cause: if the penalty is ``datta_cal``'s own state,
``tbn`` after the step does not pay it; if it is the machine's (caches, allocator), both do.
Per round, on Fashion-MNIST test batches of the demo's model (the configuration
``demo_sev3.json`` records for the batch size; forced decisions):

  cal after step     a fine-tuning call of datta_cal (forced single) on another batch, then
                     datta_cal on this batch forced multiple (timed)
  cal after cal      that call again at once (timed)
  tbn after step     a fine-tuning call of datta_cal, then tbn on this batch (timed)
  tbn after tbn      that call again at once (timed)

Also the minor page faults of each timed call (``getrusage``), which show whether memory is
faulted in again after the step.  Means and medians over the rounds, ms.

    python bench/after_step.py > bench/results/cpu_after_step.md
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time

import datta_kernels as dk
from datta_kernels.adapt import TBN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cal_step import _calibration, demo_setup, print_header  # noqa: E402


def _timed(fn, x) -> tuple[float, int]:
    """(ms, minor page faults) of one call."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn(x)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    data, model, vdom, recorded = demo_setup()
    print_header("The call after a DAFT step (cpu)", __doc__, 3)
    for bs in (16, 64):
        _table(model, data, _calibration(model, vdom, bs, recorded[str(bs)]), bs, args.rounds)


def _table(model, data, cal, bs: int, rounds: int) -> None:
    cal.daft = True
    a = cal.adapter(copy.deepcopy(model), backend="cpu")
    step_rule = dk.ThresholdSelector(1e9, skew_cut=1e-6, shift_cut=a.selector.shift_cut)   # single
    call_rule = dk.ThresholdSelector(0.0, skew_cut=1e-6, shift_cut=a.selector.shift_cut)   # multiple
    tbn = TBN(copy.deepcopy(model), backend="cpu")
    xs = [data.test_x[i * bs:(i + 1) * bs] for i in range(40)]

    def step(x):
        a.selector = step_rule
        a(x)
        assert a.last_decision == "single"
        a.selector = call_rule
    names = ("cal after step", "cal after cal", "tbn after step", "tbn after tbn")
    times, faults = {k: [] for k in names}, {k: [] for k in names}
    for r in range(rounds + 5):
        x, other = xs[r % 40], xs[(r + 7) % 40]
        got = {}
        step(other)
        got["cal after step"] = _timed(a, x)
        got["cal after cal"] = _timed(a, x)
        step(other)
        got["tbn after step"] = _timed(tbn, x)
        got["tbn after tbn"] = _timed(tbn, x)
        if r >= 5:                           # warm-up rounds left out
            for k, (ms, f) in got.items():
                times[k].append(ms)
                faults[k].append(f)
    mean = {k: statistics.mean(v) for k, v in times.items()}
    print(f"## Batch size {bs} ({rounds} rounds)\n")
    print("| call | ms mean | ms median | minor page faults (mean) |\n|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {mean[k]:.3f} | {statistics.median(v):.3f} | {statistics.mean(faults[k]):.2f} |")
    print(f"\nafter the step / after itself: datta_cal {mean['cal after step'] / mean['cal after cal']:.2f}, "
          f"tbn {mean['tbn after step'] / mean['tbn after tbn']:.2f}\n")


if __name__ == "__main__":
    main()
