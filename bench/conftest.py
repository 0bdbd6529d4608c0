"""pytest-benchmark setup for bench/: machine information recorded with every result.

Run: ``pytest bench/bench_dabn.py --benchmark-enable`` (pyproject's addopts disable benchmarks
for the normal test run).  ``python bench/bench_dabn.py --table`` writes bench/results/.
"""
from __future__ import annotations

import json
import os

from datta_kernels.benchmarking import describe_gpu, describe_machine

__all__ = ["describe_gpu", "describe_machine", "save_results"]


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
