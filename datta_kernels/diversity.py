"""DD — Diversity Discrimination: the diversity score and the selectors (SPEC §2).

The score itself is :func:`datta_kernels.diversity_score` (re-exported here); this module
turns a stream of scores into ``"single"`` / ``"multiple"`` decisions.

Selectors are plain, stateful Python objects::

    sel = KDESelector(window=1000, warmup=50)
    decision = sel.update(score)          # score: float or 0-dim tensor (one host sync)
    state = sel.state_dict()              # lists/floats/strings only (JSON- and torch.save-safe)
    sel.load_state_dict(state)

``KDESelector`` reproduces the authors' released rule (SciPy ``gaussian_kde`` with Scott's
bandwidth evaluated on a 1000-point grid, extrema as ``scipy.signal.find_peaks`` finds them,
flat plateaus included) without SciPy and at a cost bounded by the window (well under 1 ms at
window 1000, see ``bench/bench_selector.py``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from . import ops
from . import reference as ref
from .functional import diversity_score

__all__ = ["diversity_score", "prediction_spread", "source_shift", "ClassProbe", "Selector", "KDESelector",
           "ThresholdSelector", "KDEInfo", "kde_decision", "scott_kde", "calibrate_threshold",
           "SINGLE", "MULTIPLE", "SKEWED"]

SINGLE = "single"
MULTIPLE = "multiple"
#: a batch less diverse than one i.i.d. domain (label-sorted): only from a selector with a low cut
SKEWED = "skewed"

#: Grid size of the authors' KDE (``np.linspace(min, max, 1000)``).
GRID_SIZE = 1000
#: Ratio rule: the two highest peaks must have comparable densities, ``1/2 <= d1/d2 <= 2``.
PEAK_RATIO = 2.0
#: Largest exponent magnitude allowed in the factored KDE terms (see :func:`scott_kde`);
#: e^300 is far from float64 overflow (e^709) and from the subnormal range (e^-708).
_MAX_EXPONENT = 300.0
_BLOCKS = (32, 16, 8, 4, 2, 1)
#: History points per matrix product.  A (32 x 1000) @ (1000 x 32) product is big enough for
#: OpenBLAS to spread over threads, and on a busy machine that took 40 ms instead of 75 us
#: (measured); products of 200 points (32*32*200 < 2^18 multiply-adds) stay single-threaded.
_CHUNK = 200
#: the compiled extension's score-layer ops are there (ClassProbe.forward, ThresholdSelector.decide_stats
#: and DATTA._score_forward on CPU)
_HAS_SCORE_OPS = ops.HAS_KERNEL_OPS


def _as_float(score: float | Tensor) -> float:
    """The score as a Python float (a 0-dim tensor costs one host sync, by design)."""
    if isinstance(score, Tensor):
        if score.numel() != 1:
            raise ValueError(f"score must be a scalar, got a tensor of shape {tuple(score.shape)}")
        return float(score.detach().reshape(()).item())
    return float(score)


def prediction_spread(logits: Tensor) -> Tensor:
    """How differently a batch's samples are classified: ``sum_k std_n p[n, k] / sqrt(K - 1)``
    with ``p = softmax(logits)`` ``(N, K)`` and the population std over the batch, a 0-dim
    float32 tensor in [0, 1] (SPEC §6).  1 when every sample gets a confident prediction and the
    classes are equally frequent; low when the samples share their class probabilities, as in a
    label-sorted batch (and 0 for ``N = 1``).  Unlike the entropy of the batch-mean prediction it
    does not fall when a domain shift pushes every sample towards the same class while they
    still differ.  On the device, no host sync.  ``DATTA`` takes the logits of a
    :class:`ClassProbe` at its score layer (before any decision)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError("logits must be a float (N, K) tensor")
    n, k = logits.shape
    if n == 0 or k < 2:
        raise ValueError(f"prediction spread needs N >= 1 and K >= 2 classes, got {tuple(logits.shape)}")
    p = torch.softmax(logits.detach().float(), dim=1)
    return p.std(dim=0, unbiased=False).sum() / math.sqrt(k - 1)


def source_shift(mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                 eps: float, signed: bool = False) -> Tensor:
    """How far a batch's statistics at a layer are from the source's: the symmetric KL
    divergence between the per-channel Gaussians of the batch and of the source, averaged over
    channels, a 0-dim float32 tensor >= 0 (SPEC §6).  The batch's moments pool its instance
    statistics ``(N, C)``: mean ``m_b = mean_n mu_i``, variance ``v_b = mean_n var_i +
    var_n mu_i`` (population); with ``a = v_b + eps``, ``b = var_s + eps``, per channel
    ``(a / b + b / a) / 2 - 1 + (m_b - mu_s)^2 (1 / a + 1 / b) / 2``.  0 when the batch has
    the source's moments.  ``signed``: the same magnitude with the sign of ``mean_c log(a /
    b)`` (``+`` at 0): negative when the batch's variances lie below the source's on average
    (as under blur), positive above (as under noise), so a limit can treat the two directions
    apart.  On the device, no host sync.  On CPU tensors with the compiled extension: one C++
    op (``datta::_source_shift``, the same formula in double; its ~10 PyTorch ops cost ~50 us
    a batch on a 2-core CPU); elsewhere :func:`source_shift_reference`."""
    if mean_i.device.type == "cpu" and _HAS_SCORE_OPS:
        return torch.ops.datta._source_shift(mean_i.detach(), var_i.detach(), source_mean.detach(),
                                             source_var.detach(), float(eps), bool(signed))
    return source_shift_reference(mean_i, var_i, source_mean, source_var, eps, signed)


def source_shift_reference(mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                           eps: float, signed: bool = False) -> Tensor:
    """:func:`source_shift` by its PyTorch ops (float32)."""
    m = mean_i.detach().float()
    v = var_i.detach().float().mean(0) + m.var(0, unbiased=False)
    vs = source_var.detach().float()
    shift = ref.gaussian_sym_kl(m.mean(0), v, source_mean.detach().float(), vs, eps)
    if signed:
        shift = torch.where(torch.log((v + eps) / (vs + eps)).mean() < 0, -shift, shift)
    return shift


class ClassProbe(nn.Module):
    """A linear class probe on a layer's instance statistics, giving the batch's
    :func:`prediction_spread` at that layer, before the model's own prediction exists
    (SPEC §6).

    Features per sample (``2C``): the source-standardised instance mean and log standard
    deviation, ``(mu_i - mu_s) / sqrt(var_s + eps)`` and ``log((var_i + eps) / (var_s + eps)) / 2``
    (the parts of the dispersion score, SPEC §2), **centred on the batch** (each column minus
    its mean over the batch's samples), then scaled by the fitting data's moments; logits
    ``features @ weight + bias``.  Centring on the batch removes what a domain shift does to
    every sample alike, so a strongly shifted i.i.d. batch does not collapse onto a few probe
    classes the way a label-sorted batch does (on the demo's validation set it raised the
    held-out-family AUROC of i.i.d. vs label-sorted batches, ``bench/results/skew_signal.md``).
    Its class accuracy need not be high: the samples of a batch that share a class get similar
    probe predictions, those of an i.i.d. batch different ones.  :meth:`fit` trains it
    (multinomial logistic regression, L-BFGS) on labelled validation features computed batch
    by batch; ``datta_kernels.calibrate`` does this at the score layer.
    Its buffers follow ``.to()`` and are saved in ``state_dict`` (version 2: a probe saved by
    an earlier version, fitted on uncentred features, is refused on load).
    """

    #: 2: batch-centred features (``state_dict`` metadata; version 1 probes are refused)
    _version = 2

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        if channels < 1 or num_classes < 2:
            raise ValueError(f"need channels >= 1 and num_classes >= 2, got {channels}, {num_classes}")
        self.register_buffer("center", torch.zeros(2 * channels))
        self.register_buffer("scale", torch.ones(2 * channels))
        self.register_buffer("weight", torch.zeros(2 * channels, num_classes))
        self.register_buffer("bias", torch.zeros(num_classes))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version")
        if version is not None and version < 2:
            name = prefix.rstrip(".") or "ClassProbe"
            error_msgs.append(f"{name}: this probe was saved by datta_kernels with "
                              f"ClassProbe version {version} (features not centred on the batch); its "
                              "weights do not fit the current features: re-run datta_kernels.calibrate")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def features(mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                 eps: float, centred: bool = True) -> Tensor:
        """``(N, 2C)`` float32 features of one batch's instance statistics ``(N, C)``, centred on
        the batch (``centred=False``: the per-sample source-standardised values, for studies)."""
        sv = source_var.detach().float() + eps
        z_mean = (mean_i.detach().float() - source_mean.detach().float()) * torch.rsqrt(sv)
        z_std = 0.5 * (torch.log(var_i.detach().float().clamp_min(0) + eps) - torch.log(sv))
        f = torch.cat([z_mean, z_std], dim=1)
        return f - f.mean(0, keepdim=True) if centred else f

    def logits(self, feats: Tensor) -> Tensor:
        if feats.dim() != 2 or feats.shape[1] != self.center.numel():
            raise ValueError(f"expected (N, {self.center.numel()}) features, got {tuple(feats.shape)}")
        return ((feats - self.center) / self.scale) @ self.weight + self.bias

    def forward(self, mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                eps: float) -> Tensor:
        """The batch's prediction spread (0-dim, on the device, no host sync).  On CPU tensors
        with the compiled extension: one C++ op (``datta::_probe_spread``, the same formula in
        double; its ~20 PyTorch ops cost ~0.2 ms a batch on a small CPU model); elsewhere
        :meth:`spread_reference`."""
        if mean_i.device.type == "cpu" and self.weight.device.type == "cpu" and _HAS_SCORE_OPS:
            return torch.ops.datta._probe_spread(
                mean_i.detach(), var_i.detach(), source_mean.detach(), source_var.detach(), float(eps),
                self.center, self.scale, self.weight, self.bias)
        return self.spread_reference(mean_i, var_i, source_mean, source_var, eps)

    def spread_reference(self, mean_i: Tensor, var_i: Tensor, source_mean: Tensor, source_var: Tensor,
                         eps: float) -> Tensor:
        """:meth:`forward` by its PyTorch ops: :meth:`features`, :meth:`logits`,
        :func:`prediction_spread` (float32)."""
        return prediction_spread(self.logits(self.features(mean_i, var_i, source_mean, source_var, eps)))

    @classmethod
    def fit(cls, feats: Tensor, labels: Tensor, num_classes: int, *, l2: float = 1e-3,
            max_iter: int = 200) -> ClassProbe:
        """Fit on ``feats`` ``(N, 2C)`` (:meth:`features` of i.i.d. batches, batch by batch,
        concatenated) and integer ``labels`` ``(N,)``:
        mean cross-entropy + ``l2 * |weight|^2``, L-BFGS with a strong-Wolfe line search."""
        if feats.dim() != 2 or feats.shape[1] % 2 or labels.shape != feats.shape[:1]:
            raise ValueError("feats must be (N, 2C) and labels (N,)")
        if not torch.isfinite(feats).all():
            raise ValueError("probe features are not finite")
        probe = cls(feats.shape[1] // 2, num_classes)
        x = feats.detach().float().cpu()
        y = labels.detach().long().cpu()
        probe.center.copy_(x.mean(0))
        probe.scale.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
        x = (x - probe.center) / probe.scale
        w = torch.zeros_like(probe.weight, requires_grad=True)
        b = torch.zeros_like(probe.bias, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        probe.weight.copy_(w.detach())
        probe.bias.copy_(b.detach())
        return probe


class KDEInfo(NamedTuple):
    """Why the KDE rule decided what it decided (for logging and plots).

    ``reason`` is one of ``"warmup"``, ``"degenerate"`` (fewer than 2 distinct scores),
    ``"one_peak"``, ``"ratio"``, ``"valley"``, ``"peak"`` (no minimum between the peaks,
    compared with ``p1``).  Positions are in score units; densities are the normalised KDE.
    """

    decision: str
    reason: str
    p1: float = math.nan
    p2: float = math.nan
    d1: float = math.nan
    d2: float = math.nan
    valley: float = math.nan


def scott_kde(history: np.ndarray, grid_size: int = GRID_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian KDE of ``history`` (n,) with Scott's bandwidth on ``linspace(min, max, grid_size)``.

    Returns ``(grid, density)``, both ``(grid_size,)`` float64, equal to
    ``scipy.stats.gaussian_kde(history)(grid)`` up to rounding (~1e-14 relative; terms below
    e^-600 of the kernel peak may flush to 0, as SciPy's own flush below e^-745).
    Needs ``std(history) > 0``.

    Math: ``h = std(history, ddof=1) * n^(-1/5)`` (Scott), ``density(g) = sum_i exp(-z_i(g)^2)
    / (n h sqrt(2 pi))`` with ``z_i(g) = (g - x_i) / (h sqrt 2)``.  On the uniform grid the
    step is ``d = Delta / (h sqrt 2)`` in z units.  Write the grid index ``j = j0 + B q' + r``
    (``j0 = B q0`` a block start near the middle, ``q' = q - q0``, ``0 <= r < B``),
    ``a_i = z_i(g_j0)`` and ``A_iq = a_i + B q' d``.  Expanding ``(A_iq + r d)^2``:

        exp(-z^2) = exp(-A_iq^2) * exp(-2 a_i r d) * exp(-2 B q' r d^2 - r^2 d^2)
                  =   E[i, q]    *     P[i, r]     *           C[q, r]

    so ``density[q, r] = C[q, r] * (E^T P)[q, r]``: one matrix product and
    ``n (G/B + B)`` exponentials instead of ``n G``.  ``B`` is the largest block keeping the
    exponents of ``P`` and ``C`` within ``+-300`` (always 16 or 32 at window 1000; 1, the
    direct formula, for absurd range/bandwidth ratios).  Every factor is an ``exp`` of an
    O(1)-conditioned argument, so the accuracy is that of direct evaluation.
    """
    x = np.asarray(history, dtype=np.float64)
    n = x.size
    h = float(np.std(x, ddof=1)) * n ** (-0.2)
    lo, hi = float(x.min()), float(x.max())
    grid = np.linspace(lo, hi, grid_size)
    step = (hi - lo) / (grid_size - 1)
    inv = 1.0 / (h * math.sqrt(2.0))
    d = step * inv
    for b in _BLOCKS:
        n_blocks = -(-grid_size // b)
        q0 = n_blocks // 2
        a = (lo + b * q0 * step - x) * inv                   # (n,)
        p_max = 2.0 * float(np.abs(a).max()) * (b - 1) * d
        c_max = 2.0 * b * max(q0, n_blocks - 1 - q0) * (b - 1) * d * d
        if max(p_max, c_max) <= _MAX_EXPONENT:
            break
    r = np.arange(b, dtype=np.float64)
    qs = np.arange(n_blocks, dtype=np.float64) - q0
    e = np.add.outer(a, (b * d) * qs)                        # A_iq: (n, n_blocks)
    np.square(e, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)
    p = np.exp(np.multiply.outer(a, -2.0 * d * r))           # (n, b)
    c = np.exp(np.multiply.outer(qs, -2.0 * b * d * d * r) - np.square(r * d))  # (n_blocks, b)
    dens = np.zeros((n_blocks, b))
    for k in range(0, n, _CHUNK):
        dens += e[k:k + _CHUNK].T @ p[k:k + _CHUNK]
    dens *= c                                                # (n_blocks, b): index j = b q + r
    density = dens.reshape(-1)[:grid_size] * (1.0 / (n * h * math.sqrt(2.0 * math.pi)))
    return grid, density


def _local_extrema(density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of local maxima and minima with ``scipy.signal.find_peaks`` semantics (what the
    authors call, on ``density`` and ``-density``): a sample, or a flat run of equal samples,
    whose neighbours on both sides are strictly lower (maxima) / higher (minima); a flat run
    reports its middle index ``(first + last) // 2``; runs touching either end never count.

    Unlike ``argrelextrema(d, np.greater)`` (strict comparisons), a peak whose top is two or
    more equal grid values is found, not missed.  Real KDE densities rarely tie, so the two
    agree on almost every stream; tests/test_diversity.py pins the plateau case to find_peaks.
    """
    starts = np.flatnonzero(np.r_[True, density[1:] != density[:-1]])  # first index of each run
    ends = np.r_[starts[1:], density.size] - 1                        # last index of each run
    vals = density[starts]
    mid, left, right = vals[1:-1], vals[:-2], vals[2:]
    centre = (starts[1:-1] + ends[1:-1]) // 2
    return centre[(mid > left) & (mid > right)], centre[(mid < left) & (mid < right)]


def kde_decision(history: np.ndarray, score: float, warmup: int = 50) -> KDEInfo:
    """The SPEC §2 KDE rule on a history ``(n,)`` that already contains ``score``.

    - ``n < warmup``: ``multiple`` (the first ``warmup - 1`` batches).
    - Degenerate history (fewer than 2 points or all equal: ``std = 0`` so Scott's bandwidth is
      0 and SciPy's ``gaussian_kde`` would raise a singular-matrix error): ``multiple``.  A
      constant score stream carries no evidence of two regimes, and ``multiple`` is the safe
      side (no fine-tuning, mostly source statistics).
    - Otherwise take the two highest density peaks ordered by position (``p1 < p2``), the
      lowest local minimum strictly between them (``valley``); ``multiple`` if fewer than two
      peaks or ``d1/d2`` outside ``[1/2, 2]``; else ``single`` iff ``score < valley``
      (``score < p1`` when no minimum lies between the peaks).
    """
    n = history.size
    if n < warmup:
        return KDEInfo(MULTIPLE, "warmup")
    if n < 2 or not history.max() > history.min():
        return KDEInfo(MULTIPLE, "degenerate")
    grid, density = scott_kde(history)
    peaks, mins = _local_extrema(density)
    if peaks.size < 2:
        return KDEInfo(MULTIPLE, "one_peak")
    # highest two by density (stable sort: on an exact tie the later index ranks higher,
    # as with np.argsort(...)[-2:]), then ordered by position
    i1, i2 = np.sort(peaks[np.argsort(density[peaks], kind="stable")[-2:]])
    p1, p2, d1, d2 = float(grid[i1]), float(grid[i2]), float(density[i1]), float(density[i2])
    ratio = d1 / d2
    if ratio > PEAK_RATIO or ratio < 1.0 / PEAK_RATIO:
        return KDEInfo(MULTIPLE, "ratio", p1, p2, d1, d2)
    between = mins[(mins > i1) & (mins < i2)]
    if between.size:
        valley = float(grid[between[np.argmin(density[between])]])
        decision = SINGLE if score < valley else MULTIPLE
        return KDEInfo(decision, "valley", p1, p2, d1, d2, valley)
    return KDEInfo(SINGLE if score < p1 else MULTIPLE, "peak", p1, p2, d1, d2)


class Selector:
    """Base class: ``update(score) -> "single" | "multiple"`` plus ``state_dict`` round trips."""

    #: True when the decision can be taken on the device (``decide_tensor``) with no host sync.
    sync_free = False
    #: True when ``update`` / ``decide_tensor`` read ``spread=``, the batch's
    #: :func:`prediction_spread` (DATTA passes it only then).
    uses_spread = False
    #: True when ``update`` / ``decide_tensor`` read ``shift=``, the batch's
    #: :func:`source_shift` at the score layer (DATTA passes it only then).
    uses_shift = False

    def update(self, score: float | Tensor) -> str:
        raise NotImplementedError

    def skewed_tensor(self, score: Tensor) -> Tensor | None:
        """Device-side ``"skewed"`` flag of a sync-free selector (None: it never answers it)."""
        return None

    def decide_tensors(self, score: Tensor, **extra) -> tuple[Tensor, Tensor | None]:
        """``(decide_tensor(...), skewed_tensor(...))`` of a sync-free selector in one call
        (a selector may share the work between the two)."""
        return self.decide_tensor(score, **extra), self.skewed_tensor(score, **extra)

    def reset(self) -> None:
        """Forget the stream (history, counters); keep the configuration."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _shift_range(cut) -> tuple[float, float] | None:
    """``ThresholdSelector``'s shift limit as a range ``(lo, hi)``: None stays None, a number
    ``c >= 0`` is ``(-c, c)``, a pair must have ``-inf < lo <= 0 <= hi < inf``."""
    if cut is None:
        return None
    try:
        lo, hi = (-float(cut), float(cut)) if not isinstance(cut, (tuple, list)) else map(float, cut)
    except (TypeError, ValueError):
        raise ValueError(f"shift_cut must be None, a number >= 0 or a pair (lo <= 0 <= hi), "
                         f"got {cut!r}") from None
    if not (-math.inf < lo <= 0.0 <= hi < math.inf):
        raise ValueError(f"shift_cut must be None, a finite number >= 0 or a pair of finite numbers "
                         f"lo <= 0 <= hi (a source shift range), got {cut!r}")
    return lo, hi


class ThresholdSelector(Selector):
    """``multiple`` when ``score >= threshold``; otherwise ``skewed`` when ``score < low`` or
    the batch's ``spread`` is below ``skew_cut``, else ``single``.

    ``low`` (default -inf) and ``skew_cut`` (default None: unused) catch batches *less*
    diverse than a single i.i.d. domain, e.g. label-sorted ones whose batch statistics
    mislead: ``low`` from the diversity score alone, ``skew_cut`` from the batch's prediction
    spread (:func:`prediction_spread` of a :class:`ClassProbe` at the score layer, which
    :class:`~datta_kernels.DATTA` passes as ``spread=``; without one, nothing is skewed by it).
    ``shift_cut`` (default None: unused) limits ``skewed`` to batches whose
    :func:`source_shift` (``shift=``) lies within it: ``skewed`` normalises with the source
    statistics, and a batch farther from them than the cut is ``single`` instead.  A number
    ``c`` is the range ``[-c, c]`` (a shift of at most ``c`` either way); a pair ``(lo, hi)``
    with ``lo <= 0 <= hi`` the range of a signed shift (``source_shift(signed=True)``, which
    :class:`~datta_kernels.DATTA` passes), so the two directions (variances below / above the
    source's) get limits of their own.
    ``datta_kernels.calibrate`` sets the cuts from validation batches.  Stateless apart from
    its cuts, so it can also decide on the device (:meth:`decide_tensor`,
    :meth:`skewed_tensor`) without a host sync.  A NaN score, spread or shift never gives
    ``single`` or ``skewed``: the batch is ``multiple``."""

    sync_free = True

    def __init__(self, threshold: float, low: float = -math.inf, skew_cut: float | None = None,
                 shift_cut: float | tuple[float, float] | None = None):
        self.threshold = float(threshold)
        self.low = float(low)
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        if math.isnan(self.low) or self.low == math.inf or self.low >= self.threshold:
            raise ValueError(f"low must be -inf or a number < threshold ({self.threshold}), got {low!r}")
        if skew_cut is not None and not (0.0 < float(skew_cut) <= 1.0):
            raise ValueError(f"skew_cut must be None or in (0, 1] (a prediction spread), got {skew_cut!r}")
        self.skew_cut = None if skew_cut is None else float(skew_cut)
        self.shift_cut = _shift_range(shift_cut)
        self.last_decision: str | None = None

    @property
    def uses_spread(self) -> bool:
        """True when the decision reads the batch's prediction spread."""
        return self.skew_cut is not None

    @property
    def uses_shift(self) -> bool:
        """True when the decision reads the batch's source shift."""
        return self.shift_cut is not None

    def update(self, score: float | Tensor, spread: float | Tensor | None = None,
               shift: float | Tensor | None = None) -> str:
        s = _as_float(score)
        sp = None if self.skew_cut is None or spread is None else _as_float(spread)
        can_skew = self.low != -math.inf or sp is not None      # this call can answer skewed
        sh = None if self.shift_cut is None or shift is None or not can_skew else _as_float(shift)
        if s >= self.threshold or math.isnan(s) or (sp is not None and math.isnan(sp)) \
                or (sh is not None and math.isnan(sh)):
            self.last_decision = MULTIPLE
        elif (s < self.low or (sp is not None and sp < self.skew_cut)) \
                and (sh is None or self.shift_cut[0] <= sh <= self.shift_cut[1]):
            self.last_decision = SKEWED
        else:
            self.last_decision = SINGLE
        return self.last_decision

    def decide_stats(self, score: Tensor, mean_i: Tensor, var_i: Tensor, source_mean: Tensor,
                     source_var: Tensor, eps: float, probe: ClassProbe | None = None, *,
                     on_device: bool = False) -> tuple[Any, Tensor | None, Tensor | None]:
        """The rule from a score layer's instance statistics ``(N, C)``: the spread of
        ``probe`` (``probe(mean_i, var_i, source_mean, source_var, eps)``, read when the
        selector has a spread cut and a probe is given) and the signed :func:`source_shift`
        (when it has a shift cut) are computed here.  Returns ``(decision, spread, shift)``,
        the last two 0-dim tensors or None when not read; ``decision`` is :meth:`update`'s
        string (one host sync), or with ``on_device`` :meth:`decide_tensors`' pair of 0-dim
        bool tensors (none).  On CPU tensors with the compiled extension, in eager mode, all
        of it is one C++ op (``datta::_threshold_decide``: the same formulas and rule, each
        value rounded to float32 before it is compared, as here); otherwise the torch ops."""
        use_probe = self.skew_cut is not None and probe is not None
        stats = (mean_i.detach(), var_i.detach(), source_mean.detach(), source_var.detach())
        if (type(self) is ThresholdSelector and _HAS_SCORE_OPS and score.device.type == "cpu"
                and mean_i.device.type == "cpu" and (not use_probe or probe.weight.device.type == "cpu")
                and not torch.compiler.is_compiling()):
            spread, shift, flags = torch.ops.datta._threshold_decide(
                score.detach(), *stats, float(eps), *self._op_args(probe if use_probe else None))
            decision = self._from_flags(flags, on_device)
        else:
            spread = probe(*stats, eps) if use_probe else None
            shift = source_shift(*stats, eps, signed=True) if self.shift_cut is not None else None
            decision = (self.decide_tensors if on_device else self.update)(score, spread, shift)
        return (decision, spread if use_probe else None,
                shift if self.shift_cut is not None else None)

    def _op_args(self, probe: ClassProbe | None) -> tuple:
        """The C++ rule's arguments (``datta::_threshold_decide``, ``_dabn_decide_forward``):
        the probe's four tensors (None without one), threshold, low, skew cut, shift range."""
        lo, hi = self.shift_cut if self.shift_cut is not None else (None, None)
        tensors = (probe.center, probe.scale, probe.weight, probe.bias) if probe is not None else (None,) * 4
        return (*tensors, self.threshold, self.low, self.skew_cut, lo, hi)

    def _from_flags(self, flags: Tensor, on_device: bool):
        """The decision from the C++ rule's ``(single, skewed)`` flags: :meth:`update`'s string
        (recorded as ``last_decision``), or with ``on_device`` the two 0-dim bool tensors."""
        if on_device:
            return flags.unbind()
        single, skewed = flags.tolist()
        self.last_decision = SINGLE if single else SKEWED if skewed else MULTIPLE
        return self.last_decision

    def decide_tensor(self, score: Tensor, spread: Tensor | None = None,
                      shift: Tensor | None = None) -> Tensor:
        """Device-side decision: a 0-dim bool tensor, True for ``single`` (no host sync)."""
        return self.decide_tensors(score, spread, shift)[0]

    def skewed_tensor(self, score: Tensor, spread: Tensor | None = None,
                      shift: Tensor | None = None) -> Tensor | None:
        """Device-side ``skewed`` flag (None when this selector never answers it)."""
        return self.decide_tensors(score, spread, shift)[1]

    def decide_tensors(self, score: Tensor, spread: Tensor | None = None,
                       shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The device-side rule, both flags at once (``single``, ``skewed``; ``skewed`` None when
        this selector never answers it), as :meth:`update`: with ``below = score < threshold``
        and ``ok`` = no NaN spread or shift, ``skewed`` iff ``below``, ``ok``, (``score < low``
        or ``spread < skew_cut``) and ``shift`` within ``shift_cut``; ``single`` iff ``below``, ``ok``
        and not ``skewed`` (a spread or shift is read only with its cut, a shift only by a
        call that can answer ``skewed``: a low cut, or a spread cut and a spread).  Shared comparisons:
        5 tiny device ops with a spread cut and nothing else (12 as two separate rules; at a
        small batch on a CPU each costs a few microseconds of a ~4 ms step)."""
        s = score.detach().reshape(())
        below = s < self.threshold
        has_spread = self.skew_cut is not None and spread is not None
        has_shift = self.shift_cut is not None and shift is not None
        if not has_spread and self.low == -math.inf:
            return below, (None if self.skew_cut is None and self.shift_cut is None
                           else torch.zeros_like(below))
        skew = s < self.low if self.low != -math.inf else None
        if has_spread:
            sp = spread.detach().reshape(())
            keep, low_spread = sp >= self.skew_cut, sp < self.skew_cut   # both False for a NaN spread
            skew = low_spread if skew is None else skew | low_spread
            below = below & (keep | low_spread)                          # a NaN spread: multiple
        if has_shift:
            sh = shift.detach().reshape(())
            lo, hi = self.shift_cut
            near = (sh >= lo) & (sh <= hi)
            below = below & (near | (sh < lo) | (sh > hi))              # a NaN shift: multiple
            skew = skew & near
        skewed = below & skew
        return below & ~skew, skewed

    def reset(self) -> None:
        self.last_decision = None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "threshold", "threshold": self.threshold, "low": self.low,
                "skew_cut": self.skew_cut,
                "shift_cut": None if self.shift_cut is None else list(self.shift_cut),
                "last_decision": self.last_decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "threshold":
            raise ValueError(f"not a ThresholdSelector state (kind={state.get('kind')!r})")
        self.threshold = float(state["threshold"])
        self.low = float(state.get("low", -math.inf))
        cut = state.get("skew_cut")
        self.skew_cut = None if cut is None else float(cut)
        self.shift_cut = _shift_range(state.get("shift_cut"))
        self.last_decision = state.get("last_decision")

    def __repr__(self) -> str:
        low = "" if self.low == -math.inf else f", low={self.low}"
        cut = "" if self.skew_cut is None else f", skew_cut={self.skew_cut}"
        shift = "" if self.shift_cut is None else f", shift_cut={self.shift_cut!r}"
        return f"ThresholdSelector(threshold={self.threshold}{low}{cut}{shift})"


class KDESelector(Selector):
    """The authors' KDE valley rule (SPEC §2) over a sliding window of scores.

    ``window``: history length (the current score included); ``None`` keeps every score (the
    cost then grows with the stream).  ``warmup``: the first ``warmup - 1`` updates return
    ``multiple``.  Non-finite scores (a NaN batch) are not recorded and return ``multiple``.
    ``last_info`` holds the :class:`KDEInfo` of the latest decision.
    """

    def __init__(self, window: int | None = 1000, warmup: int = 50):
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"window must be a positive integer or None, got {window!r}")
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        if window is not None and window < warmup:
            raise ValueError(f"window ({window}) < warmup ({warmup}): the history would never "
                             "leave the warm-up and every decision would be 'multiple'")
        self.window = None if window is None else int(window)
        self.warmup = int(warmup)
        self.reset()

    def reset(self) -> None:
        # A ring buffer of the last `window` scores (the KDE does not depend on their order);
        # with window=None it grows by doubling.
        self._buf = np.empty(self.window if self.window is not None else 64, dtype=np.float64)
        self._count = 0                      # scores recorded since reset
        self.last_info: KDEInfo | None = None

    @property
    def count(self) -> int:
        """Number of scores recorded since the last reset."""
        return self._count

    def history(self) -> np.ndarray:
        """The scores in the window, oldest first: ``(min(count, window),)`` float64."""
        if self.window is None or self._count <= self.window:
            return self._buf[:self._count].copy()
        head = self._count % self.window
        return np.concatenate([self._buf[head:], self._buf[:head]])

    def _push(self, value: float) -> None:
        if self.window is None:
            if self._count == self._buf.size:
                self._buf = np.concatenate([self._buf, np.empty_like(self._buf)])
            self._buf[self._count] = value
        else:
            self._buf[self._count % self.window] = value
        self._count += 1

    def _window_view(self) -> np.ndarray:
        n = self._count if self.window is None else min(self._count, self.window)
        return self._buf[:n]

    def update(self, score: float | Tensor) -> str:
        value = _as_float(score)
        if not math.isfinite(value):
            self.last_info = KDEInfo(MULTIPLE, "nonfinite")
            return MULTIPLE
        self._push(value)
        self.last_info = kde_decision(self._window_view(), value, self.warmup)
        return self.last_info.decision

    def density(self) -> tuple[np.ndarray, np.ndarray]:
        """``(grid, density)`` of the current window, for plots (needs 2+ distinct scores)."""
        hist = self._window_view()
        if hist.size < 2 or not hist.max() > hist.min():
            raise ValueError("the KDE needs at least two distinct scores")
        return scott_kde(hist)

    def state_dict(self) -> dict[str, Any]:
        info = self.last_info._asdict() if self.last_info is not None else None
        return {"kind": "kde", "window": self.window, "warmup": self.warmup,
                "history": self.history().tolist(), "count": self._count, "last_info": info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore configuration and history (the saved window/warmup replace the current)."""
        if state.get("kind") != "kde":
            raise ValueError(f"not a KDESelector state (kind={state.get('kind')!r})")
        self.__init__(state["window"], state["warmup"])
        for v in state["history"]:
            self._push(float(v))
        # the ring position only matters modulo the window; keep the true count for reporting
        skipped = int(state.get("count", self._count)) - self._count
        if skipped > 0 and self.window is not None:
            hist = self.history()
            self._count += skipped
            head = self._count % self.window
            self._buf[head:] = hist[: self.window - head]
            self._buf[:head] = hist[self.window - head:]
        info = state.get("last_info")
        self.last_info = KDEInfo(**info) if info is not None else None

    def __repr__(self) -> str:
        return f"KDESelector(window={self.window}, warmup={self.warmup})"


def calibrate_threshold(single_scores, mixed_scores) -> float:
    """A :class:`ThresholdSelector` threshold from scores of batches whose type is known
    (validation data, never the test stream): the cut that maximises balanced accuracy
    ``(TPR + TNR) / 2`` of "single iff score < t", placed at the middle of the widest gap of
    equally good cuts.  Both lists need at least one finite score.
    """
    s = np.asarray([v for v in map(float, single_scores) if math.isfinite(v)])
    m = np.asarray([v for v in map(float, mixed_scores) if math.isfinite(v)])
    if s.size == 0 or m.size == 0:
        raise ValueError("calibrate_threshold needs finite scores of both single and mixed batches")
    values = np.unique(np.concatenate([s, m]))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    tpr = (s[None, :] < cuts[:, None]).mean(axis=1)
    tnr = (m[None, :] >= cuts[:, None]).mean(axis=1)
    bal = (tpr + tnr) / 2
    best = np.flatnonzero(bal >= bal.max() - 1e-12)
    # equally good cuts form runs; take the middle of the widest run of adjacent ones
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    run = max(runs, key=lambda r: cuts[r[-1]] - cuts[r[0]])
    return float((cuts[run[0]] + cuts[run[-1]]) / 2)


def make_selector(selector: Selector | str | float | None) -> Selector:
    """``None`` / ``"kde"`` -> ``KDESelector()``; a number -> ``ThresholdSelector(number)``."""
    if selector is None or selector == "kde":
        return KDESelector()
    if isinstance(selector, Selector):
        return selector
    if isinstance(selector, (int, float)) and not isinstance(selector, bool):
        return ThresholdSelector(float(selector))
    raise TypeError(f"selector must be a Selector, 'kde', a threshold number or None, "
                    f"got {selector!r}")

