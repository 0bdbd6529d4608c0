"""DABN forward and forward+backward on CPU: fused ``cpu`` backend vs eager reference,
``torch.compile(reference.dabn)`` and ``nn.BatchNorm2d`` (train mode).

    pytest bench/bench_dabn.py --benchmark-enable       # pytest-benchmark, GB/s in extra_info
    python bench/bench_dabn.py --table                  # -> bench/results/cpu_dabn.*

Minimal bytes moved (B = x.nbytes), what the fused kernels actually do:
  forward           3 B: pass 1 reads x (instance moments), pass 2 reads x and writes y.
  forward+backward  8 B: the forward's 3 B, then backward pass 1 reads x and dy (per-(n, c)
                    sums) and pass 2 reads x and dy and writes dx (5 B).  Parameter-sized
                    traffic is ignored.
Every contestant allocates its outputs through PyTorch's CPU allocator.  Whether large blocks are
advised for transparent huge pages is PyTorch's switch ``THP_MEM_ALLOC_ENABLE`` (read once, when
torch starts), so ``--table`` measures every setting of ``--thp`` in its own subprocess, all
contestants under the same setting, and writes them into one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from datta_kernels import functional as F
from datta_kernels import reference as ref
from datta_kernels.benchmarking import (
    cpu_time_interleaved,
    describe_machine,
    gbps,
    provenance,
    run_worker,
    write_markdown,
)
from datta_kernels.testing import make_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import save_results  # noqa: E402

SHAPES = [(64, 64, 56, 56), (64, 256, 14, 14), (128, 16, 32, 32), (16, 3, 224, 224)]
BLEND = (0.6, 0.4, 0.0)   # datta "single": batch statistics, so the forward needs both passes
BYTES_PER_X = {"fwd": 3, "fwd_bwd": 8}
IMPLS = ("cpu", "reference", "compiled_reference", "batchnorm2d")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_COMPILED = {}
# one compiled graph per shape x mode x thread count (dynamo guards on the thread count)
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 256


def make_case(shape, impl: str, mode: str):
    """A zero-argument callable running one forward (or forward+backward) of `impl`."""
    inp = make_inputs(shape)
    x, c = inp.x, shape[1]
    grad = mode == "fwd_bwd"
    blend = torch.tensor(BLEND)
    w = inp.weight.clone().requires_grad_(grad)
    b = inp.bias.clone().requires_grad_(grad)
    x = x.clone().requires_grad_(grad)
    dy = torch.randn_like(inp.x)
    if impl == "batchnorm2d":
        bn = torch.nn.BatchNorm2d(c).train()
        bn.weight.data.copy_(inp.weight)
        bn.bias.data.copy_(inp.bias)
        fn = bn
    elif impl == "cpu":
        def fn(t):
            return F.dabn(t, w, b, inp.source_mean, inp.source_var, blend, backend="cpu")
    else:
        def eager(t, w_, b_):
            return ref.dabn(t, w_, b_, inp.source_mean, inp.source_var, blend)
        if impl == "compiled_reference":
            key = (shape, mode)
            _COMPILED.setdefault(key, torch.compile(eager, dynamic=False))
            body = _COMPILED[key]
        else:
            body = eager
        def fn(t):
            return body(t, w, b)

    def run():
        if not grad:
            with torch.no_grad():
                return fn(x)
        y = fn(x)
        y.backward(dy)
        return y
    return run, inp.x.nbytes * BYTES_PER_X[mode]


# ------------------------------------------------------------------ pytest-benchmark
@pytest.mark.parametrize("mode", list(BYTES_PER_X))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dabn(benchmark, shape, impl, mode):
    run, nbytes = make_case(shape, impl, mode)
    run()  # warm-up (and compilation)
    benchmark.group = f"dabn-{mode}-{'x'.join(map(str, shape))}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (CI's run-once smoke test)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(bytes=nbytes, gbps=gbps(nbytes, median))


# ------------------------------------------------------------------ table
def table(reps: int, impls: tuple[str, ...], threads: list[int]) -> dict:
    """Every row in this process (one THP_MEM_ALLOC_ENABLE setting: torch's at import)."""
    rows = []
    load_start = os.getloadavg()[0]
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    for nt, mode, shape in [(t, m, s) for t in threads for m in BYTES_PER_X for s in SHAPES]:
        torch.set_num_threads(nt)
        row = {"thp": thp, "threads": nt, "mode": mode, "shape": list(shape), "ms": {}, "gbps": {}}
        cases = {impl: make_case(shape, impl, mode) for impl in impls}
        slow = {impl: impl == "reference" or (mode == "fwd_bwd" and impl != "cpu") for impl in impls}
        t = cpu_time_interleaved({k: run for k, (run, _) in cases.items()},
                                 {k: max(3, reps // 2) if slow[k] else reps for k in impls})
        for impl, (_, nbytes) in cases.items():
            row["ms"][impl] = t[impl] * 1e3
            row["gbps"][impl] = gbps(nbytes, t[impl])
            print(f"THP={thp} {nt} {mode:8s} {str(shape):18s} {impl:20s} {t[impl] * 1e3:9.2f} ms "
                  f"{gbps(nbytes, t[impl]):6.1f} GB/s", flush=True)
        cpu = row["ms"]["cpu"]
        row["speedup_vs"] = {k: v / cpu for k, v in row["ms"].items() if k != "cpu"}
        rows.append(row)
    machine = {**describe_machine(), "loadavg_1min_start": load_start}
    return {"machine": machine, "blend": BLEND, "bytes_per_x": BYTES_PER_X, "rows": rows}


def table_per_thp(reps: int, impls: tuple[str, ...], threads: list[int], thp: list[str],
                  no_compile: bool) -> dict:
    """:func:`table` once per THP_MEM_ALLOC_ENABLE value, each in a fresh interpreter (torch
    reads the variable when it starts); rows of all settings, the machine of the first."""
    merged: dict = {}
    for value in thp:
        args = ["--reps", str(reps), "--threads", ",".join(map(str, threads))] + \
            (["--no-compile"] if no_compile else [])
        res = run_worker(__file__, args, {"THP_MEM_ALLOC_ENABLE": value})
        if not merged:
            merged = res
            merged["machine"]["loadavg_1min_by_thp"] = {}
        else:
            merged["rows"] += res["rows"]
        merged["machine"]["loadavg_1min_by_thp"][value] = (res["machine"]["loadavg_1min_start"],
                                                           res["machine"]["loadavg_1min"])
    merged["machine"]["thp_mem_alloc_enable"] = ",".join(thp)
    merged["machine"].update(provenance())  # this command, not the workers'
    return merged


def write_table(res: dict, path: str) -> None:
    m = res["machine"]
    impls = list(res["rows"][0]["ms"])
    loads = "; ".join(f"THP={k}: {a:.2f} at the start, {b:.2f} at the end"
                      for k, (a, b) in m["loadavg_1min_by_thp"].items())
    notes = [
        f"1-min load average {loads}",
        f"float32, NCHW, blend {tuple(res['blend'])} (batch statistics: two-pass forward); "
        "median wall time of one call (after an untimed one: caches warm), contestants taking turns "
        "in one process",
        "bytes: forward 3·x.nbytes (2 reads + 1 write), forward+backward 8·x.nbytes "
        "(+ backward: 2 reads of x and dy for the sums, 2 reads + 1 write for dx)",
        "THP: the value of PyTorch's `THP_MEM_ALLOC_ENABLE` for that row's process; all "
        "contestants of a row ran under it (with 1, the CPU allocator advises blocks of 2 MiB "
        "or more for transparent huge pages)",
    ]
    rows = []
    for r in res["rows"]:
        sp = r["speedup_vs"]
        rows.append([r["thp"], r["threads"], r["mode"], "x".join(map(str, r["shape"]))]
                    + [f"{r['ms'][i]:.2f} ({r['gbps'][i]:.1f})" for i in impls]
                    + [f"{sp[k]:.1f}x" if k in sp else "-"
                       for k in ("reference", "compiled_reference", "batchnorm2d")])
    columns = (["THP", "threads", "mode", "shape"] + [f"{i} ms (GB/s)" for i in impls]
               + ["cpu speed-up vs reference", "vs compiled", "vs BatchNorm2d"])
    write_markdown(path, "DABN on CPU: fused `cpu` backend vs baselines", m, notes,
                   [(columns, rows)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table", action="store_true", help="run everything, write bench/results/")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    p.add_argument("--thp", default="0,1",
                   help="comma list of THP_MEM_ALLOC_ENABLE values, one subprocess each")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--out", default=os.path.join(RESULTS, "cpu_dabn"))
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    impls = tuple(i for i in IMPLS if not (args.no_compile and i == "compiled_reference"))
    threads = [int(t) for t in args.threads.split(",")]
    if args.worker:
        with open(args.worker, "w") as f:
            json.dump(table(args.reps, impls, threads), f)
        return
    if not args.table:
        p.print_help()
        return
    res = table_per_thp(args.reps, impls, threads, args.thp.split(","), args.no_compile)
    save_results(res, args.out, write_table)


if __name__ == "__main__":
    main()
