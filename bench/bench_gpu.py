"""DABN kernels on a GPU: the ``triton`` and ``cuda`` backends vs the eager reference,
``torch.compile(reference.dabn)`` and ``nn.BatchNorm2d`` (train mode), in GB/s and % of the
device's peak memory bandwidth.

    python bench/bench_gpu.py --table     # CUDA machine -> bench/results/<gpu>_dabn.{md,json}
    python bench/bench_gpu.py --quick     # CUDA machine: the goal shape only, no torch.compile
    python bench/bench_gpu.py --smoke     # any machine: tiny shape, every contestant once (CI)

A contestant that raises is a failure, not a skip: its cell reads FAILED, the error is kept
in the results, and the script exits 1 after writing them.

Minimal bytes moved (B = x.nbytes; parameter- and (N, C)-sized traffic ignored):
  fwd    3 B  pass 1 reads x (per-(n, c) moments), pass 2 reads x and writes y
  stats  1 B  the forward's pass 1 alone (``instance_stats``)
  norm   2 B  the forward's pass 2 alone (``dabn(..., stats=)``: moments given)
  bwd    5 B  pass 1 reads x and dy (per-(n, c) Σdy, Σdy·x̂), pass 2 reads x, dy, writes dx
  score  2 B  the pixel-mode diversity score on its own: instance statistics (one read of x,
              giving μ_B) and the angles (one more read); inside a DATTA forward the first
              read is shared with the layer's statistics, so the score costs 1 B extra
  copy   2 B  ``dst.copy_(x)``: what this device really sustains (the practical roofline)

Timing: ``datta_kernels.benchmarking.gpu_time`` (``triton.testing.do_bench``: median, the L2
cache flushed before every timed call, so small shapes are measured from memory as in a
network).  Goals at (64, 256, 56, 56), fp32 and bf16: fwd >= 85 % and bwd >= 75 % of peak,
fwd >= 3x the eager reference and faster than torch.compile(reference) and BatchNorm2d.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

import datta_kernels as dk
from datta_kernels import backends
from datta_kernels import reference as ref
from datta_kernels.benchmarking import cpu_time_interleaved, describe_gpu, describe_machine, gbps, gpu_time
from datta_kernels.benchmarking import write_markdown as write_result
from datta_kernels.testing import make_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import save_results  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAIN_SHAPE = (64, 256, 56, 56)
#: ResNet-50-like layer shapes: early, mid, late (HW = 49) stages, a 3-channel input, CIFAR
OTHER_SHAPES = [(64, 64, 56, 56), (64, 256, 14, 14), (64, 2048, 7, 7), (16, 3, 224, 224),
                (128, 16, 32, 32)]
SMOKE_SHAPE = (2, 3, 5, 7)
BLEND = (0.6, 0.4, 0.0)      # datta "single": uses batch statistics
BYTES_PER_X = {"fwd": 3, "stats": 1, "norm": 2, "bwd": 5, "score": 2, "copy": 2}
#: modes only DATTA's own backends (and the reference) have
OWN_MODES = ("score", "stats", "norm")
#: theoretical peak memory bandwidth (bytes/s) by device name, from the vendors' data sheets
PEAK_BW = [(r"H200", 4.8e12), (r"H100.*PCIe", 2.0e12), (r"H100", 3.35e12),
           (r"A100.*80GB", 2.039e12), (r"A100", 1.555e12), (r"L40S", 0.864e12)]
GOALS = {"fwd": 0.85, "bwd": 0.75}
_COMPILED: dict = {}
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 256


def peak_bandwidth(device: str) -> float | None:
    """Theoretical peak bytes/s of the device, from the table above or the reported memory
    clock and bus width (double data rate); None on CPU or when unknown."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for pattern, bw in PEAK_BW:
        if re.search(pattern, name):
            return bw
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = (getattr(props, a, 0) for a in ("memory_clock_rate", "memory_bus_width"))
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def kernel_backends(device: str, dtype: torch.dtype) -> list[str]:
    """The fused backends usable here (``reference`` is a contestant of its own)."""
    why = backends.explain(device, dtype)
    return [b for b in ("cuda", "triton", "cpu") if b in why and not why[b]]


def time_one(run, device: str, reps: int, warmup: int) -> float:
    """Seconds per call: :func:`gpu_time` on CUDA, the CPU timer elsewhere (the smoke run)."""
    if device == "cuda":
        return gpu_time(run)
    return cpu_time_interleaved({"run": run}, reps, warmup=warmup)["run"]


def make_case(inp, impl: str, mode: str):
    """A zero-argument callable for one ``mode`` call of contestant ``impl`` on the inputs
    ``inp`` (``testing.make_inputs``), or None when the contestant does not apply."""
    x, w, b = inp.x, inp.weight, inp.bias
    shape, dtype, device = tuple(x.shape), x.dtype, x.device.type
    blend = torch.tensor(BLEND, device=device)
    if mode == "copy":
        if impl != "torch":
            return None
        dst = torch.empty_like(x)
        return lambda: dst.copy_(x)
    if mode in OWN_MODES:  # DATTA's own backends only (contestants(): fused ones + reference)
        if impl in ("batchnorm2d", "compiled_reference", "torch"):
            return None
        if mode != "score" and impl == "reference":
            return None            # the passes alone: the fused backends only (bench time)
        if mode == "score":
            return lambda: dk.diversity_score(x, inp.source_mean, backend=impl)
        if mode == "stats":
            return lambda: dk.instance_stats(x, backend=impl)
        stats = dk.instance_stats(x, backend=impl)

        def norm():
            with torch.no_grad():
                return dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend, backend=impl, stats=stats)
        return norm
    if impl == "torch":
        return None
    if impl == "batchnorm2d":  # what a train-mode nn.BatchNorm2d forward calls
        def fwd(t, w_, b_):
            return torch.nn.functional.batch_norm(t, None, None, w_, b_, True, 0.0, 1e-5)
    elif impl in ("reference", "compiled_reference"):
        def eager(t, w_, b_):
            return ref.dabn(t, w_, b_, inp.source_mean, inp.source_var, blend)
        fwd = eager
        if impl == "compiled_reference":
            key = (shape, dtype, x.is_contiguous(), mode)
            fwd = _COMPILED.setdefault(key, torch.compile(eager, dynamic=False))
    else:
        def fwd(t, w_, b_):
            return dk.dabn(t, w_, b_, inp.source_mean, inp.source_var, blend, backend=impl)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(x, w, b)
        return run
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fwd(xg, wg, bg)
    dy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)


def contestants(device: str, dtype: torch.dtype, compiled: bool) -> list[str]:
    """Fused backends, eager reference, torch.compile(reference) (compiling takes ~20 s a
    case: only at the goal shape), BatchNorm2d and the copy roofline."""
    compiled = ["compiled_reference"] if compiled else []
    return kernel_backends(device, dtype) + ["reference"] + compiled + ["batchnorm2d", "torch"]


def cases(smoke: bool, quick: bool = False) -> list[tuple]:
    """(shape, dtype, layout) rows: the goal shape in every dtype x layout, the others in
    fp32 and bf16 NCHW (``quick``: the goal shape in fp32 and bf16, NCHW and bf16
    channels_last)."""
    if smoke:
        return [(SMOKE_SHAPE, torch.float32, "nchw"), (SMOKE_SHAPE, torch.bfloat16, "channels_last")]
    if quick:
        return [(MAIN_SHAPE, torch.float32, "nchw"), (MAIN_SHAPE, torch.bfloat16, "nchw"),
                (MAIN_SHAPE, torch.bfloat16, "channels_last")]
    main = [(MAIN_SHAPE, dt, lay) for dt in (torch.float32, torch.bfloat16)
            for lay in ("nchw", "channels_last")] + [(MAIN_SHAPE, torch.float16, "nchw")]
    return main + [(s, dt, "nchw") for s in OTHER_SHAPES for dt in (torch.float32, torch.bfloat16)]


def table(device: str, reps: int, smoke: bool, compile_main: bool = True, quick: bool = False) -> dict:
    peak, rows, errors = peak_bandwidth(device), [], []
    for shape, dtype, layout in cases(smoke, quick):
        inp = make_inputs(shape, dtype=dtype, device=device, layout=layout)
        compiled = compile_main and not smoke and shape == MAIN_SHAPE and dtype != torch.float16
        for mode in BYTES_PER_X:
            row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                   "layout": layout, "mode": mode, "ms": {}, "gbps": {}, "pct_peak": {}, "errors": {}}
            nbytes = BYTES_PER_X[mode] * torch.Size(shape).numel() * dtype.itemsize
            for impl in contestants(device, dtype, compiled):
                try:
                    run = make_case(inp, impl, mode)
                    if run is None:  # the contestant does not do this mode
                        continue
                    t = time_one(run, device, 1 if smoke else reps, warmup=1 if smoke else 3)
                except Exception as e:  # noqa: BLE001 - a crash is a failure: recorded, reported, exit 1
                    msg = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    row["errors"][impl] = msg
                    errors.append(f"{mode} {tuple(shape)} {row['dtype']} {layout} {impl}: {msg}")
                    print(f"{mode:6s} {str(tuple(shape)):18s} {row['dtype']:9s} {layout:13s} {impl:18s}"
                          f" FAILED {msg}", flush=True)
                    continue
                row["ms"][impl] = t * 1e3
                row["gbps"][impl] = gbps(nbytes, t)
                if peak:
                    row["pct_peak"][impl] = 100 * nbytes / t / peak
                print(f"{mode:6s} {str(tuple(shape)):18s} {row['dtype']:9s} {layout:13s} {impl:18s}"
                      f" {t * 1e3:9.3f} ms {gbps(nbytes, t):8.1f} GB/s", flush=True)
            rows.append(row)
    info = describe_machine()
    if device == "cuda":
        info.update(describe_gpu(), peak_bw=peak)
    return {"device": device, "machine": info, "blend": BLEND, "bytes_per_x": BYTES_PER_X,
            "rows": rows, "errors": errors}


def goal_lines(res: dict) -> list[str]:
    """One line per fused backend: the bandwidth and speed goals at MAIN_SHAPE, met or not."""
    lines = []
    for r in res["rows"]:
        if tuple(r["shape"]) != MAIN_SHAPE or r["dtype"] not in ("float32", "bfloat16"):
            continue
        if r["mode"] not in GOALS:
            continue
        for b in ("cuda", "triton"):
            if b not in r["ms"]:
                continue
            checks = []
            if r["pct_peak"]:
                pct = r["pct_peak"][b]
                checks.append(f"{pct:.0f} % of peak (goal {GOALS[r['mode']] * 100:.0f} %: "
                              f"{'met' if pct >= GOALS[r['mode']] * 100 else 'NOT met'})")
            for other, need in (("reference", 3.0), ("compiled_reference", 1.0), ("batchnorm2d", 1.0)):
                if other in r["ms"]:
                    ratio = r["ms"][other] / r["ms"][b]
                    verdict = (f" ({'met' if ratio > need else 'NOT met'})" if r["mode"] == "fwd"
                               else "")  # the speed-up goals are forward goals
                    checks.append(f"{ratio:.2f}x {other}{verdict}")
            lines.append(f"- {b} {r['mode']} {r['dtype']} {r['layout']}: " + "; ".join(checks))
    return lines


def write_markdown(res: dict, path: str) -> None:
    m = res["machine"]
    impls = sorted({i for r in res["rows"] for i in (*r["ms"], *r.get("errors", {}))})
    notes = [(f"peak memory bandwidth {m['peak_bw'] / 1e12:.2f} TB/s" if m.get("peak_bw")
              else "no peak bandwidth known for this device")
             + ("" if res["device"] == "cuda" else " (smoke run on the CPU: timings meaningless)"),
             f"blend {tuple(res['blend'])}; bytes per call = factor x x.nbytes, factors "
             f"{res['bytes_per_x']}; "
             + ("median of `triton.testing.do_bench`, L2 flushed before each call"
                if res["device"] == "cuda" else "median wall time")]
    rows = []
    for r in res["rows"]:
        cells = []
        for i in impls:
            if i in r.get("errors", {}):
                cells.append("FAILED")
                continue
            if i not in r["ms"]:
                cells.append("-")
                continue
            pct = f", {r['pct_peak'][i]:.0f} %" if i in r["pct_peak"] else ""
            cells.append(f"{r['ms'][i]:.3f} ({r['gbps'][i]:.0f}{pct})")
        rows.append([r["mode"], "x".join(map(str, r["shape"])), r["dtype"], r["layout"], *cells])
    failed = [f"- {e}" for e in res.get("errors", [])]
    tables = ["\n\n".join(["## Goals at 64x256x56x56", "\n".join(goal_lines(res))]),
              *(["\n\n".join(["## FAILED contestants", "\n".join(failed)])] if failed else []),
              "## All rows: ms (GB/s, % of peak)",
              (["mode", "shape", "dtype", "layout", *impls], rows)]
    write_result(path, f"DABN kernels on {res['device']}", m, notes, tables)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--table", action="store_true", help="full table on the CUDA device")
    g.add_argument("--quick", action="store_true", help="the goal shape only, no torch.compile (CUDA)")
    g.add_argument("--smoke", action="store_true", help="tiny shapes, one call each, any device")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/<device>_dabn)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (args.table or args.quick) and device != "cuda":
        p.error("--table / --quick need a CUDA device (CPU numbers: bench/bench_dabn.py --table)")
    res = table(device, args.reps, args.smoke, compile_main=not (args.no_compile or args.quick),
                quick=args.quick)
    stem = args.out or os.path.join(
        RESULTS, re.sub(r"[^a-z0-9]+", "_", res["machine"].get("gpu", device).lower()).strip("_") + "_dabn")
    save_results(res, stem, write_markdown)
    if res["errors"]:
        print(f"FAILED: {len(res['errors'])} contestant calls raised:", *res["errors"], sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
