"""Decision time of the KDE selector (SPEC §2) per batch.

    pytest bench/bench_selector.py --benchmark-enable

Compares, for one ``update`` (one new score, one decision):

* ``KDESelector(window=1000)`` — factored Gaussian sums (one matrix product, ~n·(G/B + B)
  exponentials) over a bounded window: constant cost per batch, goal <= 1 ms on a CPU core;
* the naive growing-history version — SciPy ``gaussian_kde`` refitted on the whole stream each
  batch, as the authors' code does — at 1000 and 5000 scores (its cost grows with the stream).

Nothing here moves tensor data: the numbers are host-side Python/NumPy time.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import argrelextrema
from scipy.stats import gaussian_kde

from datta_kernels.diversity import KDESelector


def stream(n: int, seed: int = 0) -> np.ndarray:
    """Bimodal score stream: single-domain scores near 0.02, mixed near 0.06."""
    rng = np.random.default_rng(seed)
    low = rng.random(n) < 0.5
    return np.where(low, rng.normal(0.02, 0.003, n), rng.normal(0.06, 0.008, n))


class NaiveGrowing:
    """The authors' rule as usually written: refit SciPy's KDE on the full history."""

    def __init__(self, history: np.ndarray):
        self.history = list(history)

    def update(self, score: float) -> str:
        self.history.append(score)
        grid = np.linspace(min(self.history), max(self.history), 1000)
        density = gaussian_kde(self.history)(grid)
        peaks = argrelextrema(density, np.greater)[0]
        mins = argrelextrema(density, np.less)[0]
        if len(peaks) < 2:
            return "multiple"
        i1, i2 = sorted(sorted(peaks, key=lambda i: density[i])[-2:])
        if not 0.5 <= density[i1] / density[i2] <= 2:
            return "multiple"
        between = [m for m in mins if i1 < m < i2]
        cut = grid[min(between, key=lambda m: density[m])] if between else grid[i1]
        return "single" if score < cut else "multiple"


@pytest.mark.parametrize("window", [1000, 200])
def test_kde_selector_update(benchmark, window):
    scores = stream(window + 500)
    sel = KDESelector(window=window)
    for s in scores[:window]:
        sel.update(s)
    it = iter(np.tile(scores[window:], 1000))
    benchmark.extra_info["window"] = window
    benchmark(lambda: sel.update(next(it)))


@pytest.mark.parametrize("history", [1000, 5000])
def test_naive_growing_update(benchmark, history):
    scores = stream(history + 500)
    naive = NaiveGrowing(scores[:history])
    it = iter(np.tile(scores[history:], 1000))
    benchmark.extra_info["history"] = history
    benchmark.pedantic(lambda: naive.update(next(it)), rounds=20, iterations=1)
