"""The CPU in-cache forward (no batch statistics) against the two-pass one, each followed by
the ReLU a model puts after it, on the demo model's BatchNorm shapes.

A layer whose blend has no batch-statistics weight (``w_b = 0``: the ``source`` preset,
DATTA's ``skewed`` blends in the demo) normalises each block of planes right after its moments
(``csrc/cpu/dabn_cpu.cpp``, ``forward_in_cache``; DESIGN "The in-cache forward splits its work
as the next op will"). ``tbn``'s blend (batch statistics) takes the two-pass forward. Per shape
and blend: the median of interleaved calls of ``FusedDABN`` forward + in-place ReLU (no grad,
float32 NCHW), its ratio to ``tbn``'s, and the planes the first thread normalises, with the
blocks of a fixed 256 KiB the forward used before (commit 0d2f1f5) and with the blocks it uses
now (equal, as many as a multiple of the threads): ``at::parallel_for`` gives each thread a
contiguous run of blocks, so that share is computed, not measured.

    python bench/bench_in_cache.py > bench/results/cpu_in_cache.md
"""
from __future__ import annotations

import argparse
import math

import torch
from bench_cal_step import print_header

import datta_kernels as dk
from datta_kernels.benchmarking import time_contestants

CACHE_BLOCK = 256 * 1024      # config::kCacheBlockBytes
BLENDS = {"tbn (0, 1, 0)": (0.0, 1.0, 0.0), "source (1, 0, 0)": (1.0, 0.0, 0.0),
          "skewed bs 16 (0.4, 0, 0.6)": (0.4, 0.0, 0.6)}
SHAPES = [(bs, c, hw, hw) for bs in (16, 64) for c, hw in ((16, 28), (32, 14), (64, 7))]


def first_thread_share(planes: int, plane_bytes: int, threads: int, balanced: bool) -> int:
    """Planes of the first of ``threads`` threads (``at::parallel_for``: contiguous chunks of
    ``ceil(blocks / threads)`` blocks; the grain never binds at these shapes)."""
    cap = max(1, CACHE_BLOCK // plane_bytes)
    if balanced:
        blocks0 = min(planes, math.ceil(math.ceil(planes / cap) / threads) * threads)
        block = math.ceil(planes / blocks0)
    else:
        block = cap
    blocks = math.ceil(planes / block)
    return min(planes, math.ceil(blocks / threads) * block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=301)
    args = ap.parse_args()
    print_header("The CPU in-cache forward and the ReLU after it", __doc__, 1)
    threads = torch.get_num_threads()
    print(f"| shape | blend | forward + ReLU µs | / tbn | planes on thread 0 of {threads}: "
          "fixed blocks (before) → equal blocks (now) |\n|---|---|---|---|---|")
    torch.manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape)
        runs = {}
        for name, blend in BLENDS.items():
            layer = dk.FusedDABN(shape[1], backend="cpu", shrink_k=None,
                                 weights=(blend, blend)).eval()

            def run(layer=layer, x=x):
                with torch.no_grad():
                    return torch.relu_(layer(x))
            runs[name] = run
        sec = time_contestants(runs, "cpu", reps=args.reps)
        planes, plane_bytes = shape[0] * shape[1], shape[2] * shape[3] * 4
        for name, blend in BLENDS.items():
            split = "two passes, even split" if blend[1] else (
                f"{first_thread_share(planes, plane_bytes, threads, False)} → "
                f"{first_thread_share(planes, plane_bytes, threads, True)} of {planes}")
            print(f"| {'x'.join(map(str, shape))} | {name} | {sec[name] * 1e6:.1f} | "
                  f"{sec[name] / sec['tbn (0, 1, 0)']:.2f} | {split} |")


if __name__ == "__main__":
    main()
