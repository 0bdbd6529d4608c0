"""Whether a large output tensor is faulted in afresh on every call depends on glibc's malloc,
not on the kernel: one ``cpu``-backend DABN forward at 64x16x28x28 (a 3.2 MB output, the demo
model's first block at bs 64), timed with its minor page faults per call, under three glibc
settings, each in its own process:

  default     glibc's own dynamic thresholds (what a user gets); whether the block is
              re-faulted each call depends on the process's allocation history
  mmap        ``mmap_threshold`` fixed at 128 KiB: every large block is a fresh mapping
  heap        ``mmap_threshold`` and ``trim_threshold`` at 1 GiB: every block from the heap,
              never returned to the system

    python bench/malloc_faults.py
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

SETTINGS = {"default": None,
            "mmap": "glibc.malloc.mmap_threshold=131072",
            "heap": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"}


def worker(reps: int = 60) -> dict:
    import torch

    from datta_kernels.ops import kernel_backend
    b = kernel_backend("cpu")
    torch.manual_seed(0)
    n, c, h = 64, 16, 28
    x = torch.randn(n, c, h, h)
    w, bias, sm, sv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    blend = torch.tensor([0.2, 0.6, 0.2])
    for _ in range(5):
        b.dabn_forward(x, w, bias, sm, sv, blend, None, 1e-5)
    ts, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        t0 = time.perf_counter()
        b.dabn_forward(x, w, bias, sm, sv, blend, None, 1e-5)
        ts.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / reps
    return {"us": 1e6 * statistics.median(ts), "faults": faults, "threads": torch.get_num_threads()}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        with open(sys.argv[2], "w") as f:
            json.dump(worker(), f)
        return
    from datta_kernels.benchmarking import provenance, run_worker
    print("# One DABN forward's output: re-faulted or not (glibc malloc)\n")
    print(f"- command: `{provenance()['command']}`\n- commit: {provenance()['commit']}\n")
    print(__doc__.split("\n\n")[0] + "\n")
    print("| glibc setting | median us per call | minor page faults per call |\n|---|---|---|")
    for name, tun in SETTINGS.items():
        r = run_worker(__file__, env={"GLIBC_TUNABLES": tun})
        print(f"| {name} | {r['us']:.0f} | {r['faults']:.0f} |")


if __name__ == "__main__":
    main()
