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

import numpy as np
import torch
from _validation_setup import setup, validation_streams

from datta_kernels import Calibration
from datta_kernels.adapt import TBN
from datta_kernels.eval.runner import run_lockstep


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
    pool, streams = validation_streams(vdom, bs, 0, tuple(args.streams.split(",")))
    print("| stream | adapter | batches not fine-tuned | mean ms | median ms | fine-tuned | mean ms |")
    print("|---|---|---|---|---|---|---|")
    for name, stream in streams.items():
        ads = {"tbn": TBN(copy.deepcopy(model), backend="cpu"),
               "datta_cal, daft_pre_single": new.adapter(copy.deepcopy(model), backend="cpu"),
               "datta_cal without it": old.adapter(copy.deepcopy(model), backend="cpu")}
        for res in run_lockstep(ads, stream, pool.batches(stream)):
            t, u = np.array(res.ms[1:]), np.array(res.updated[1:])      # the first batch left out
            no = t[~u]
            print(f"| {name} | {res.method} | {len(no)} | {res.ms_per_batch_no_update or float('nan'):.2f} | "
                  f"{np.median(no) if len(no) else float('nan'):.2f} | {int(u.sum())} | "
                  + (f"{t[u].mean():.2f} |" if u.any() else "- |"))


if __name__ == "__main__":
    main()
