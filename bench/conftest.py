"""pytest-benchmark setup for bench/: machine information recorded with every result.

Run: ``pytest bench/bench_dabn.py --benchmark-enable`` (pyproject's addopts disable benchmarks
for the normal test run).  ``python bench/bench_dabn.py --table`` writes bench/results/.
"""
from __future__ import annotations

from datta_kernels.benchmarking import describe_gpu, describe_machine, save_results

__all__ = ["describe_gpu", "describe_machine", "save_results"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["datta"] = describe_machine()
