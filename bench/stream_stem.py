"""A stem on the stream statistics, on the validation streams (validation data only; nothing is
chosen here).

The layers before the score layer normalise every batch with one blend (``calibrate`` step 2b),
anchored on the source statistics.  In a deployment whose whole stream is far from the source
(corruption severity 5), that anchor stays where the source model was trained, however long
the stream; the later layers' batch statistics then correct from a badly normalised stem.  The
stream statistics of SPEC §3c (an exponential moving average of the batch statistics, RoTTA's
robust BN) follow the deployment: at the stem every batch would fold into them and the pre
blend would take them in the source's place.  This script measures that on the validation
streams ``calibrate`` ranks by: ``calibrate`` runs as the demo runs it (one DAFT rate, lr 2e-3,
to save time: DAFT is switched off below, and steps 1-4 do not depend on the rate), then its
adapter without DAFT runs the four validation streams and the hard stream, the stem on its
calibrated blend and on the same weights anchored on the stream statistics at a few momenta,
each with the calibrated rule and with the oracle rule (the true batch type; label-sorted
batches ``skewed``).  The cuts were calibrated with the source-anchored stem, and the score
layer's input moves with the stem, so the calibrated-rule rows carry that mismatch; the
oracle rows do not.

    python bench/stream_stem.py [--batch-size 64] > bench/results/stream_stem.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import calibrated_study, validation_streams

from datta_kernels.calibration import STREAM_KINDS, _hard_domains
from datta_kernels.eval.oracle import OracleSelector
from datta_kernels.nn import dabn_layers, set_decisions

MOMENTA = (0.05, 0.2)


def stream_runs(domains, bs: int, seed: int, kinds=None) -> dict:
    """name -> (x, y, batches, true decisions) of the validation streams ``calibrate`` builds."""
    pool, streams = validation_streams(domains, bs, seed, kinds)
    return {key: (pool.x, pool.y, s.batches, ["skewed" if key == "sorted" else k for k in s.kinds])
            for key, s in streams.items()}


@torch.no_grad()
def accuracy(adapter, x, y, batches) -> float:
    correct = total = 0
    for idx in batches:
        correct += int((adapter(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
    return 100.0 * correct / total


def build(rep, model, backend, momentum, truth):
    """The calibrated adapter (no DAFT); with ``momentum`` the layers before the score layer on
    the pre blend's weights with the stream statistics in the source's place, folded every batch."""
    adapter = rep.adapter(copy.deepcopy(model), selector=None if truth is None else OracleSelector(truth),
                          backend=backend)
    if momentum is not None:
        pre = dabn_layers(adapter.model)[:adapter._score_at]
        for layer in pre:
            layer.set_stream(momentum)
        # "skewed" folds the batch into the stream and anchors the blend on it (SPEC §3c); the
        # pre layers carry the pre blend under every decision, so their weights are unchanged
        set_decisions(pre, "skewed")
        adapter._pre_ready = adapter._score_at      # DATTA keeps a decision written by hand
    return adapter


def main() -> None:
    args, cfg, model, vdom, rep = calibrated_study("A stem on the stream statistics", __doc__)
    bs = args.batch_size
    print(f"- batch size {bs}; calibrated stem blend {rep.pre_blend} (on the source statistics); "
          f"skewed batches from the score layer on: "
          + ("the source statistics" if rep.stream_momentum is None
             else f"the stream at {rep.stream_momentum:g}"))
    runs = stream_runs(vdom, bs, cfg.seed)
    hard = _hard_domains(lambda: rep.adapter(copy.deepcopy(model), backend=cfg.backend), vdom, bs, cfg.seed)
    runs["hard"] = stream_runs({k: vdom[k] for k in hard}, bs, cfg.seed, ("single",))["single"]
    print(f"- hard stream: {', '.join(hard)}\n")
    print("| stem | rule | " + " | ".join(runs) + " | mean of the four | mean of the five |")
    print("|---|---|" + "---|" * (len(runs) + 2))
    for momentum in (None, *MOMENTA):
        label = "source (calibrated)" if momentum is None else f"stream, momentum {momentum:g}"
        for rule in ("calibrated", "oracle"):
            acc = {}
            for name, (x, y, batches, truth) in runs.items():
                adapter = build(rep, model, cfg.backend, momentum, None if rule == "calibrated" else truth)
                acc[name] = accuracy(adapter, x, y, batches)
            four = np.mean([acc[k] for k in STREAM_KINDS])
            print(f"| {label} | {rule} | " + " | ".join(f"{acc[k]:.2f}" for k in runs)
                  + f" | {four:.2f} | {np.mean(list(acc.values())):.2f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
