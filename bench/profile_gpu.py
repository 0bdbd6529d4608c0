"""Where a DABN call's GPU time goes: per-kernel device time (``torch.profiler``), the call
timed as ``bench_gpu.py`` times it (``triton.testing.do_bench``, L2 flushed: host launch
overhead included when the host is slower than the device), timed inside a CUDA graph
(``triton.testing.do_bench_cudagraph``: device time only), and the host time of one call.

    python bench/profile_gpu.py --out bench/results/h200_profile     # CUDA machine

A call whose ``do_bench`` time is well above its graph time is host-bound (Python, dispatch,
launches); a kernel whose own time is well above bytes / bandwidth is the one to tune.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import BYTES_PER_X, MAIN_SHAPE, make_case, peak_bandwidth  # noqa: E402
from conftest import save_results  # noqa: E402

from datta_kernels.benchmarking import describe_gpu, describe_machine, gpu_time, write_markdown  # noqa: E402
from datta_kernels.testing import make_inputs  # noqa: E402

MODES = ("fwd", "stats", "norm", "bwd")


def host_time(run, reps: int = 200) -> float:
    """Seconds of host time per call, the device left to run behind (one sync at the end)."""
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps


def graph_time(run) -> float | None:
    """Median seconds of one call replayed from a CUDA graph (no host work), or None when the
    call cannot be captured."""
    from triton.testing import do_bench_cudagraph
    try:
        return do_bench_cudagraph(run, rep=50, return_mode="median") * 1e-3
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the other columns still say much
        print(f"    graph capture failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.synchronize()
        return None


def kernel_times(run, iters: int = 10) -> list[tuple[str, float]]:
    """(kernel name, device µs per call), largest first, from ``iters`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None)
        if dev is None:
            dev = ev.self_cuda_time_total
        if dev > 0:
            out.append((ev.key[:90], dev / iters))
    return sorted(out, key=lambda kv: -kv[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output stem (.md and .json)")
    p.add_argument("--backends", default="cuda,triton,batchnorm2d")
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    peak = peak_bandwidth("cuda")
    rows, failures = [], []
    cases = [(torch.float32, "nchw"), (torch.bfloat16, "nchw"), (torch.bfloat16, "channels_last")]
    for dtype, layout in cases:
        inp = make_inputs(MAIN_SHAPE, dtype=dtype, device="cuda", layout=layout)
        for mode in MODES:
            nbytes = BYTES_PER_X[mode] * torch.Size(MAIN_SHAPE).numel() * dtype.itemsize
            for impl in args.backends.split(","):
                try:
                    run = make_case(inp, impl, mode)
                    if run is None:
                        continue
                    bench = gpu_time(run)
                    graph = graph_time(run)
                    host = host_time(run)
                    kernels = kernel_times(run)
                except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                    print(f"{mode} {dtype} {layout} {impl} FAILED {type(e).__name__}: {str(e)[:200]}",
                          flush=True)
                    failures.append(f"{mode} {dtype} {layout} {impl}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                row = {"dtype": str(dtype).removeprefix("torch."), "layout": layout, "mode": mode,
                       "impl": impl, "bench_us": bench * 1e6, "graph_us": graph and graph * 1e6,
                       "host_us": host * 1e6, "roofline_us": nbytes / peak * 1e6,
                       "kernels": [[k, us] for k, us in kernels]}
                rows.append(row)
                print(f"{mode:5s} {row['dtype']:8s} {layout:13s} {impl:11s} bench {bench * 1e6:7.1f} us"
                      f"  graph {graph * 1e6 if graph else float('nan'):7.1f} us  host {host * 1e6:6.1f} us"
                      f"  roofline {row['roofline_us']:6.1f} us", flush=True)
                for k, us in kernels[:6]:
                    print(f"      {us:8.1f} us  {k}", flush=True)
    info = describe_machine()
    info.update(describe_gpu(), peak_bw=peak)
    res = {"shape": list(MAIN_SHAPE), "machine": info, "rows": rows, "failures": failures}

    def md(res, path):
        table = [[r["mode"], r["dtype"], r["layout"], r["impl"], f"{r['bench_us']:.1f}",
                  "-" if r["graph_us"] is None else f"{r['graph_us']:.1f}", f"{r['host_us']:.1f}",
                  f"{r['roofline_us']:.1f}",
                  "; ".join(f"{k.split('(')[0][-48:]} {us:.1f}" for k, us in r["kernels"][:4])]
                 for r in res["rows"]]
        write_markdown(path, f"Where a DABN call's time goes at {'x'.join(map(str, MAIN_SHAPE))}",
                       res["machine"],
                       ["bench: do_bench, L2 flushed (bench_gpu.py's number); graph: do_bench_cudagraph "
                        "(device only); host: host µs per call, device behind; roofline: bytes / peak; "
                        "kernels: torch.profiler device µs per call, largest first"],
                       [(["mode", "dtype", "layout", "impl", "bench µs", "graph µs", "host µs",
                          "roofline µs", "kernels (µs)"], table)])
    save_results(res, args.out, md)


if __name__ == "__main__":
    main()
