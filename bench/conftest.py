"""pytest-benchmark setup for bench/: machine information recorded with every result.

Run: ``pytest bench/bench_dabn.py --benchmark-enable`` (pyproject's addopts disable benchmarks
for the normal test run).  ``python bench/bench_dabn.py --table`` writes bench/results/.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

from datta_kernels import _ext


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, object]:
    """CPU, cores, threads, load, torch version and how datta_kernels._C was built."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "datta_build": _ext.build_info(),
        "python": platform.python_version(),
    }


def describe_gpu() -> dict[str, object]:
    """GPU name, CUDA runtime, triton and driver versions (call only with a CUDA device)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        driver = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
            "triton": triton_version, "driver": driver}


def time_interleaved(runs: dict, reps: int | dict, warmup: int = 2) -> dict:
    """Median wall seconds of one call per contestant (``runs``: name -> callable), the
    contestants taking turns rep by rep so that load changes on a shared machine hit all of
    them alike.  Each timed call follows an untimed call of the same contestant: every one is
    measured with its own data warm in cache, as when it runs alone.  ``reps`` is one count
    for all or a count per contestant."""
    reps = reps if isinstance(reps, dict) else dict.fromkeys(runs, reps)
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in runs}
    for i in range(max(reps.values())):
        for k, run in runs.items():
            if i < reps[k]:
                run()
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def save_results(res: dict, stem: str, write_markdown) -> None:
    """Write ``stem.json`` (the raw result) and ``stem.md`` (``write_markdown(res, path)``),
    then print the markdown."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, stem + ".md")
    print(open(stem + ".md").read())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["datta"] = describe_machine()
