"""Timing: does ``daft_pre_single`` cost the batches ``datta_cal`` does not fine-tune anything?

``DATTA(daft_pre_single=True)`` (SPEC §4) acts only inside the second forward of a batch that is
fine-tuned; the batches that are not fine-tuned should run exactly as before.  This script runs
``tbn`` and a saved ``datta_cal`` calibration with and without ``pre_single_blend`` in lockstep
(each batch through all three, the turn order rotating) on ``calibrate``'s validation streams
(validation data only), and reports the mean and median ms per batch over the batches each
adapter did not fine-tune (the first batch left out), and over those it fine-tuned.

    python bench/pre_single_timing.py --calibration FILE [--streams single,mixed,dynamic]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from _validation_setup import setup

import datta_kernels.calibration as cal_mod
from datta_kernels import Calibration
from datta_kernels.adapt import TBN


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calibration", required=True, help="a saved Calibration with pre_single_blend set")
    p.add_argument("--streams", default="single,mixed,dynamic")
    args = p.parse_args()
    new = Calibration.load(args.calibration)
    if new.pre_single_blend is None:
        raise SystemExit(f"{args.calibration}: its pre_single_blend is None (nothing to compare)")
    old = dataclasses.replace(new, pre_single_blend=None)
    bs = new.batch_size
    _, model, vdom = setup("`daft_pre_single` and the batches not fine-tuned (timing)", __doc__)
    print(f"- calibration `{args.calibration}` (batch size {bs}); torch threads {torch.get_num_threads()}\n")
    xs, _, streams = cal_mod._streams(vdom, bs, 0)
    print("| stream | adapter | batches not fine-tuned | mean ms | median ms | fine-tuned | mean ms |")
    print("|---|---|---|---|---|---|---|")
    for name in args.streams.split(","):
        ads = {"tbn": TBN(copy.deepcopy(model), backend="cpu"),
               "datta_cal, daft_pre_single": new.adapter(copy.deepcopy(model), backend="cpu"),
               "datta_cal without it": old.adapter(copy.deepcopy(model), backend="cpu")}
        times = {k: [] for k in ads}
        tuned = {k: [] for k in ads}
        keys = list(ads)
        for i, idx in enumerate(streams[name]):
            x = xs[idx].contiguous()
            for k in keys[i % 3:] + keys[:i % 3]:
                a = ads[k]
                before = getattr(a, "n_updates", 0)
                t0 = time.perf_counter()
                a(x)
                times[k].append(time.perf_counter() - t0)
                tuned[k].append(getattr(a, "n_updates", 0) > before)
        for k in keys:
            t, u = 1e3 * np.array(times[k][1:]), np.array(tuned[k][1:])
            no = t[~u]
            print(f"| {name} | {k} | {len(no)} | {no.mean():.2f} | {np.median(no):.2f} | {int(u.sum())} | "
                  + (f"{t[u].mean():.2f} |" if u.any() else "- |"))


if __name__ == "__main__":
    main()
