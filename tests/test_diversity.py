"""Selectors (SPEC §2) against a straightforward SciPy implementation, the score against the
reference, and state round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde

import datta_kernels as dk
from datta_kernels import reference as ref
from datta_kernels.diversity import KDESelector, ThresholdSelector, _local_extrema, kde_decision, scott_kde
from datta_kernels.testing import make_inputs, tol


def naive_decision(history: list[float], score: float, warmup: int = 50) -> str:
    """SPEC §2 written the obvious way (the authors' tools: gaussian_kde + find_peaks)."""
    if len(history) < warmup or np.std(history) == 0:
        return "multiple"
    grid = np.linspace(min(history), max(history), 1000)
    density = gaussian_kde(history)(grid)
    peaks = find_peaks(density)[0]
    mins = find_peaks(-density)[0]
    if len(peaks) < 2:
        return "multiple"
    top2 = sorted(peaks, key=lambda i: density[i])[-2:]
    i1, i2 = sorted(top2)
    ratio = density[i1] / density[i2]
    if ratio > 2 or ratio < 0.5:
        return "multiple"
    between = [m for m in mins if i1 < m < i2]
    if between:
        valley = grid[min(between, key=lambda m: density[m])]
        return "single" if score < valley else "multiple"
    return "single" if score < grid[i1] else "multiple"


def _segments(rng, n, lo, hi):
    """Alternate single-domain (low-score) and mixed (high-score) segments of random length."""
    out, single = [], True
    while len(out) < n:
        length = int(rng.integers(1, 12))
        mu, sd = (lo, 0.15 * lo) if single else (hi, 0.12 * hi)
        out.extend(rng.normal(mu, sd, length))
        single = not single
    return np.asarray(out[:n])


def make_stream(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "bimodal":
        return _segments(rng, n, 0.02, 0.06)
    if kind == "unimodal":
        return rng.normal(0.05, 0.01, n)
    if kind == "drifting":
        return _segments(rng, n, 0.02, 0.05) + np.linspace(0.0, 0.03, n)
    if kind == "skewed":      # unequal peaks: exercises the ratio rule
        return np.where(rng.random(n) < 0.8, rng.normal(0.02, 0.003, n), rng.normal(0.06, 0.006, n))
    if kind == "quantised":   # many repeated values
        return np.round(_segments(rng, n, 0.02, 0.06), 3)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["bimodal", "unimodal", "drifting", "skewed", "quantised"])
def test_kde_selector_matches_scipy(kind):
    window, warmup, n = 150, 50, 400
    stream = make_stream(kind, n, seed=len(kind))
    sel = KDESelector(window=window, warmup=warmup)
    got = [sel.update(float(s)) for s in stream]
    # SciPy on every 3rd batch (it is ~20x slower than the selector) and every warm-up edge
    checked = [t for t in range(n) if t % 3 == 0 or warmup - 2 <= t <= warmup]
    want = [naive_decision(list(stream[max(0, t + 1 - window):t + 1]), stream[t], warmup)
            for t in checked]
    assert [got[t] for t in checked] == want
    assert all(d == "multiple" for d in got[:warmup - 1])
    if kind in ("bimodal", "quantised"):
        assert got.count("single") > 50 and got.count("multiple") > 100


def test_kde_selector_default_window_long_stream():
    """Window 1000 over 1300 batches (the ring buffer wraps); SciPy checked every 20th batch."""
    stream = make_stream("drifting", 1300, seed=3)
    sel = KDESelector()
    for t, s in enumerate(stream):
        d = sel.update(s)
        if t % 40 == 39 or t == 49:
            assert d == naive_decision(list(stream[max(0, t - 999):t + 1]), s), t
    assert sel.count == 1300 and sel.history().size == 1000
    np.testing.assert_array_equal(sel.history(), stream[-1000:])


def test_kde_selector_window_none_keeps_all():
    stream = make_stream("bimodal", 300, seed=5)
    sel = KDESelector(window=None, warmup=20)
    got = [sel.update(s) for s in stream]
    assert sel.history().size == 300
    assert got[-30:] == [naive_decision(list(stream[:t + 1]), stream[t], 20) for t in range(270, 300)]


@pytest.mark.parametrize("history", [
    np.random.default_rng(0).normal(size=1000),
    np.r_[np.random.default_rng(1).normal(0, 1, 500), np.random.default_rng(2).normal(5, 0.5, 500)],
    np.random.default_rng(3).normal(size=7),
    # one far outlier: range/bandwidth ~ 126, the factored evaluation must shrink its block
    np.r_[np.random.default_rng(4).normal(0, 0.01, 999), 100.0],
    np.r_[np.zeros(998), -1.0, 1.0],
], ids=["normal", "bimodal", "tiny", "outlier", "spikes"])
def test_scott_kde_matches_scipy(history):
    grid, density = scott_kde(history)
    want = gaussian_kde(history)(grid)
    np.testing.assert_allclose(grid, np.linspace(history.min(), history.max(), 1000))
    # relative to the peak everywhere; relative to itself wherever it is not underflowing
    np.testing.assert_allclose(density, want, rtol=0, atol=1e-13 * want.max())
    big = want > 1e-200 * want.max()
    np.testing.assert_allclose(density[big], want[big], rtol=1e-10)


def test_kde_degenerate_and_nonfinite():
    sel = KDESelector(window=100, warmup=5)
    assert [sel.update(0.03) for _ in range(20)] == ["multiple"] * 20
    assert sel.last_info.reason == "degenerate"
    assert kde_decision(np.array([1.0]), 1.0, warmup=1).reason == "degenerate"
    n = sel.count
    assert sel.update(float("nan")) == "multiple" and sel.count == n  # not recorded
    assert sel.update(torch.tensor(0.01)) in ("single", "multiple")  # 0-dim tensors accepted


def test_selector_validation():
    with pytest.raises(ValueError, match="window"):
        KDESelector(window=10, warmup=50)
    with pytest.raises(ValueError, match="window"):
        KDESelector(window=0)
    with pytest.raises(ValueError, match="warmup"):
        KDESelector(warmup=0)
    with pytest.raises(ValueError, match="finite"):
        ThresholdSelector(float("inf"))
    with pytest.raises(ValueError, match="scalar"):
        KDESelector().update(torch.zeros(3))


@pytest.mark.parametrize("window", [60, None])
def test_kde_state_round_trip(window):
    stream = make_stream("bimodal", 260, seed=7)
    a = KDESelector(window=window, warmup=30)
    for s in stream[:150]:
        a.update(s)
    state = json.loads(json.dumps(a.state_dict()))  # plain Python: JSON-serialisable
    b = KDESelector(window=1000, warmup=50)          # the saved configuration wins
    b.load_state_dict(state)
    assert (b.window, b.warmup, b.count) == (window, 30, 150)
    np.testing.assert_array_equal(a.history(), b.history())
    assert [a.update(s) for s in stream[150:]] == [b.update(s) for s in stream[150:]]
    np.testing.assert_array_equal(a.history(), b.history())
    with pytest.raises(ValueError, match="KDESelector"):
        b.load_state_dict(ThresholdSelector(0.1).state_dict())


def test_threshold_selector():
    sel = ThresholdSelector(0.04)
    assert sel.update(0.03) == "single" and sel.update(0.05) == "multiple"
    assert sel.decide_tensor(torch.tensor(0.03)).item() is True
    other = ThresholdSelector(1.0)
    other.load_state_dict(json.loads(json.dumps(sel.state_dict())))
    assert other.threshold == 0.04 and other.last_decision == "multiple"


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("mode", ["pixel", "instance"])
@pytest.mark.parametrize("stat", ["std", "var"])
@pytest.mark.parametrize("shape", [(8, 16, 7, 9), (1, 3, 5, 5), (5, 4, 1, 1)])
def test_diversity_score_vs_reference(backend, mode, stat, shape):
    inp = make_inputs(shape, seed=11)
    score, angles = dk.diversity_score(inp.x, inp.source_mean, mode=mode, stat=stat, backend=backend)
    want_score, want_angles = ref.diversity_score(inp.x, inp.source_mean, mode=mode, stat=stat)
    assert score.shape == () and angles.shape == (shape[0],)
    torch.testing.assert_close(angles, want_angles, **tol(torch.float32, 10))
    torch.testing.assert_close(score, want_score, **tol(torch.float32, 10))
    assert 0 <= float(angles.min()) and float(angles.max()) <= np.pi


@pytest.mark.parametrize("seed", range(20))
def test_extrema_match_find_peaks_on_plateaus(seed):
    """Flat runs (ties between neighbouring grid values) count as one extremum at their middle,
    as in find_peaks; runs touching an end never count.  argrelextrema would miss them."""
    rng = np.random.default_rng(seed)
    d = np.repeat(rng.integers(0, 5, 40).astype(np.float64), rng.integers(1, 5, 40))
    peaks, mins = _local_extrema(d)
    np.testing.assert_array_equal(peaks, find_peaks(d)[0])
    np.testing.assert_array_equal(mins, find_peaks(-d)[0])


def test_plateau_peak_is_a_peak():
    d = np.array([0.0, 1.0, 3.0, 3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 0.5])
    peaks, mins = _local_extrema(d)
    assert peaks.tolist() == [2, 6]          # (2 + 3) // 2 and (5 + 7) // 2
    assert mins.tolist() == [4]              # the trailing 0.5-run touches the end: not a minimum
