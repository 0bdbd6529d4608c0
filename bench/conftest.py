"""pytest-benchmark setup for bench/: machine information recorded with every result.

Run: ``pytest bench/bench_dabn.py --benchmark-enable`` (pyproject's addopts disable benchmarks
for the normal test run).  ``python bench/bench_dabn.py --table`` writes bench/results/.
"""
from __future__ import annotations

import json
import os
import platform

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
