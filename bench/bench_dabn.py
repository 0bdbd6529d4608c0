"""DABN forward and forward+backward on CPU: fused ``cpu`` backend vs eager reference,
``torch.compile(reference.dabn)`` and ``nn.BatchNorm2d`` (train mode).

    pytest bench/bench_dabn.py --benchmark-enable       # pytest-benchmark, GB/s in extra_info
    python bench/bench_dabn.py --table                  # one process -> bench/results/cpu_dabn.*

Minimal bytes moved (B = x.nbytes), what the fused kernels actually do:
  forward           3 B: pass 1 reads x (instance moments), pass 2 reads x and writes y.
  forward+backward  8 B: the forward's 3 B, then backward pass 1 reads x and dy (per-(n, c)
                    sums) and pass 2 reads x and dy and writes dx (5 B).  Parameter-sized
                    traffic is ignored.
Every contestant allocates its outputs.  Fresh blocks above glibc's mmap threshold (32 MiB)
are mapped and page-faulted in on every call: the baselines fault them in 4 KiB pages (~20 ms
for the 51 MB tensors of 64x64x56x56), the ``cpu`` backend maps its y / dx in transparent huge
pages (where THP is enabled), so on that shape much of its lead is allocation, not kernels.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from datta_kernels import functional as F
from datta_kernels import reference as ref
from datta_kernels.testing import make_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import describe_machine, save_results, time_interleaved  # noqa: E402

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
        benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / median / 1e9)


# ------------------------------------------------------------------ one-process table
def table(reps: int, impls: tuple[str, ...], threads: list[int]) -> dict:
    rows = []
    load_start = os.getloadavg()[0]
    for nt, mode, shape in [(t, m, s) for t in threads for m in BYTES_PER_X for s in SHAPES]:
        torch.set_num_threads(nt)
        row = {"threads": nt, "mode": mode, "shape": list(shape), "ms": {}, "gbps": {}}
        cases = {impl: make_case(shape, impl, mode) for impl in impls}
        slow = {impl: impl == "reference" or (mode == "fwd_bwd" and impl != "cpu") for impl in impls}
        t = time_interleaved({k: run for k, (run, _) in cases.items()},
                             {k: max(3, reps // 2) if slow[k] else reps for k in impls})
        for impl, (_, nbytes) in cases.items():
            row["ms"][impl] = t[impl] * 1e3
            row["gbps"][impl] = nbytes / t[impl] / 1e9
            print(f"{nt} {mode:8s} {str(shape):18s} {impl:20s} {t[impl] * 1e3:9.2f} ms "
                  f"{nbytes / t[impl] / 1e9:6.1f} GB/s", flush=True)
        cpu = row["ms"]["cpu"]
        row["speedup_vs"] = {k: v / cpu for k, v in row["ms"].items() if k != "cpu"}
        rows.append(row)
    machine = {**describe_machine(), "loadavg_1min_start": load_start}
    return {"machine": machine, "blend": BLEND, "bytes_per_x": BYTES_PER_X, "rows": rows}


def write_markdown(res: dict, path: str) -> None:
    m = res["machine"]
    impls = list(res["rows"][0]["ms"])
    lines = [
        "# DABN on CPU: fused `cpu` backend vs baselines",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"1-min load average {m['loadavg_1min_start']:.2f} at the start, {m['loadavg_1min']:.2f} at "
        "the end (other jobs share these 2 cores; with 2 threads an OpenMP region then waits a "
        "scheduler tick, ~8 ms, for the busy core: 1-thread rows measure the kernels)",
        f"- torch {m['torch']} (ATen CPU capability {m['torch_cpu_capability']}), "
        f"python {m['python']}",
        f"- datta_kernels._C: {m['datta_build']}",
        f"- float32, NCHW, blend {tuple(res['blend'])} (batch statistics: two-pass forward); "
        "median wall time of one call (after an untimed one: caches warm), contestants taking turns "
        "in one process",
        "- bytes: forward 3·x.nbytes (2 reads + 1 write), forward+backward 8·x.nbytes "
        "(+ backward: 2 reads of x and dy for the sums, 2 reads + 1 write for dx)",
        "- outputs of 32 MiB or more (64x64x56x56 only) are page-faulted in on every call; the "
        "baselines take ~12k 4 KiB faults (~20 ms), `cpu` maps y / dx in transparent huge pages: "
        "on that shape much of its lead is allocation, not kernels",
        "- reading: the 1-thread rows are the trustworthy ones (contestants take turns, so load "
        "changes hit all alike; noise a few %); 2-thread rows under load are quantised by the "
        "scheduler (16.0 / 24.0 / 40.0 ms = multiples of its ~8 ms tick) and say nothing about "
        "the kernels",
        "",
        "| threads | mode | shape | " + " | ".join(f"{i} ms (GB/s)" for i in impls)
        + " | cpu speed-up vs reference | vs compiled | vs BatchNorm2d |",
        "|---|---|---|" + "---|" * (len(impls) + 3),
    ]
    for r in res["rows"]:
        cells = [f"{r['ms'][i]:.2f} ({r['gbps'][i]:.1f})" for i in impls]
        sp = r["speedup_vs"]
        ratios = [f"{sp[k]:.1f}x" if k in sp else "-" for k in
                  ("reference", "compiled_reference", "batchnorm2d")]
        head = f"| {r['threads']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | "
        lines.append(head + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table", action="store_true", help="run everything, write bench/results/")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--out", default=os.path.join(RESULTS, "cpu_dabn"))
    args = p.parse_args(argv)
    if not args.table:
        p.print_help()
        return
    impls = tuple(i for i in IMPLS if not (args.no_compile and i == "compiled_reference"))
    res = table(args.reps, impls, [int(t) for t in args.threads.split(",")])
    save_results(res, args.out, write_markdown)


if __name__ == "__main__":
    main()
