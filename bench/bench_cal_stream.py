"""``datta_cal`` vs ``tbn`` per batch *in the demo's streams*, the two side by side (the time
goal of issue 20: on the batches ``datta_cal`` does not fine-tune, at most 1.1x tbn's time).

``bench_cal_step.py`` times one call on one repeated batch with the decision forced; this runs
the demo's test streams (single, label-sorted, mixed, dynamic at severity 3, bs 16 and 64) through ``tbn``
and ``datta_cal`` in lockstep (``datta_kernels.eval.runner.run_lockstep``, the demo's own
loop: turns alternating each batch), so ``datta_cal`` decides, fine-tunes when it says
``single`` and is timed on everything else, with the real mix of decisions, inputs and the
memory traffic of the fine-tuning steps in between.  Timing only: the accuracies are not
looked at and nothing is chosen here.

Each ``THP_MEM_ALLOC_ENABLE`` value (PyTorch's switch that advises CPU blocks of 2 MiB or more
for transparent huge pages; read when torch starts) runs in its own subprocess, both methods
under it.  The configuration (blends, cuts, shift range, the stream statistics of ``skewed``
batches with their momentum and reset, DAFT rate) is the one
``demo_sev3.json`` records for that batch size; the class probe is refitted on a few
validation batches (it changes a few decisions, not the cost of one).

    python bench/bench_cal_stream.py > bench/results/cpu_cal_stream.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

from datta_kernels.adapt import TBN
from datta_kernels.benchmarking import describe_machine, provenance, run_worker
from datta_kernels.eval.datasets import load_fashion_mnist
from datta_kernels.eval.models import TrainConfig, load_or_train
from datta_kernels.eval.runner import DemoConfig, run_lockstep
from datta_kernels.eval.streams import make_stream
from datta_kernels.eval.validation import test_pool, validation_domains

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cal_step import RESULTS, _calibration  # noqa: E402

STREAMS = ("single", "single_noniid", "mixed", "dynamic")


def measure(severity: int) -> list[dict]:
    """Every stream x batch size in this process (one THP setting)."""
    data = load_fashion_mnist()
    model, _ = load_or_train(TrainConfig(), data.train_x, data.train_y, progress=False)
    vdom = validation_domains(data, 200, 0, train=TrainConfig(), severities=(3,))
    recorded = json.load(open(os.path.join(RESULTS, "demo_sev3.json")))["datta_cal"]
    pool = test_pool(data, DemoConfig().per_domain, severity, 0, DemoConfig().test_corruptions, False)
    rows = []
    for bs in (16, 64):
        cal = _calibration(model, vdom, bs, recorded[str(bs)])
        for name in STREAMS:
            stream = make_stream(pool, name, bs, 0)
            adapters = {"tbn": TBN(copy.deepcopy(model)),
                        "datta_cal": cal.adapter(copy.deepcopy(model), backend="cpu")}
            tbn, own = run_lockstep(adapters, stream, pool.batches(stream))
            keep = [i for i in range(1, len(own.ms)) if not own.updated[i]]   # first call left out
            t_all = tbn.ms[1:]
            cal_ms = [own.ms[i] for i in keep]
            tbn_same = [tbn.ms[i] for i in keep]
            rows.append({"bs": bs, "stream": name, "batches": len(own.ms), "not_fine_tuned": len(keep),
                         "tbn_mean": statistics.mean(t_all), "tbn_median": statistics.median(t_all),
                         "cal_mean": statistics.mean(cal_ms) if keep else None,
                         "cal_median": statistics.median(cal_ms) if keep else None,
                         "tbn_same_mean": statistics.mean(tbn_same) if keep else None})
            print(f"  THP={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} bs {bs} {name}: done",
                  file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thp", default="0,1",
                    help="comma list of THP_MEM_ALLOC_ENABLE values, one subprocess each")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump({"rows": measure(args.severity), "load_end": os.getloadavg()[0]}, f)
        return
    prov, m = provenance(), describe_machine()
    res, loads = {}, []
    for value in args.thp.split(","):
        start = os.getloadavg()[0]
        got = run_worker(__file__, ["--severity", str(args.severity)], {"THP_MEM_ALLOC_ENABLE": value})
        res[value] = got["rows"]
        loads.append(f"THP={value}: {start:.2f} at the start, {got['load_end']:.2f} at the end")
    print("# `datta_cal` vs `tbn` per batch in the demo's streams (cpu)\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1-min load {'; '.join(loads)}\n")
    print(__doc__.split("\n\n")[1] + "\n")
    print(__doc__.split("\n\n")[2] + "\n")
    print(f"Test streams at severity {args.severity}, {DemoConfig().per_domain} images x "
          f"{len(DemoConfig().test_corruptions)} corruptions. ms = wall time of one adapter call; `tbn` over "
          "every batch, `datta_cal` over the batches it did not fine-tune (the first call of each left "
          "out); ratio of means, ratio of medians, and the ratio against `tbn`'s mean on those same "
          "batches.\n")
    print("| THP | bs | stream | batches | not fine-tuned | tbn ms mean / median | datta_cal ms mean / "
          "median | ratio (means) | ratio (medians) | ratio (same batches) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = {}
    for value, rows in res.items():
        for r in rows:
            if r["cal_mean"] is None:
                print(f"| {value} | {r['bs']} | {r['stream']} | {r['batches']} | 0 | {r['tbn_mean']:.2f} / "
                      f"{r['tbn_median']:.2f} | - | - | - | - |")
                continue
            q = (r["cal_mean"] / r["tbn_mean"], r["cal_median"] / r["tbn_median"],
                 r["cal_mean"] / r["tbn_same_mean"])
            worst[value] = max(worst.get(value, 0.0), q[0])
            print(f"| {value} | {r['bs']} | {r['stream']} | {r['batches']} | {r['not_fine_tuned']} | "
                  f"{r['tbn_mean']:.2f} / {r['tbn_median']:.2f} | "
                  f"{r['cal_mean']:.2f} / {r['cal_median']:.2f} | "
                  f"{q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} |")
    print()
    print("Worst ratio of means (goal <= 1.1): " + ", ".join(
        f"THP={k}: {v:.2f} ({'met' if v <= 1.1 else 'MISSED'})" for k, v in worst.items()))


if __name__ == "__main__":
    main()
