"""The experiment behind ``datta-kernels demo``: every method on every stream, through the
public adapter API (``datta_kernels.DATTA`` and the baselines of ``datta_kernels.adapt``).

One run = a fresh copy of the source model wrapped by one method, fed one stream batch by batch
(predict, then maybe update), never reset inside the stream (continual adaptation).  The methods
run on a stream in lockstep (:func:`run_lockstep`): each batch through every method before the
next, so their per-batch times are measured side by side.
"""
from __future__ import annotations

import copy
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from .. import DATTA, __version__, backends
from ..adapt import baseline
from ..benchmarking import provenance
from ..calibration import BLEND_GRID, DAFT_OBJECTIVES, default_batches
from ..diversity import ThresholdSelector
from . import progress_bar
from .cal_cache import cached_calibrate
from .corruptions import CORRUPTIONS, DEFAULT_SEVERITY, SEVERITIES, check_severities
from .datasets import load_fashion_mnist
from .models import TrainConfig, copy_note, evaluate, load_or_train
from .numerics import check_mode as check_numerics
from .numerics import pin as pin_numerics
from .oracle import OracleSelector
from .streams import STREAMS, DomainPool, Stream, make_stream
from .validation import (
    VALIDATION,
    calibrate_threshold_on,
    check_validation,
    reported_corruptions,
    test_pool,
    validation_domains,
)

#: ``datta_cal`` chooses its DAFT rate on the validation streams among these multiples of
#: ``--lr`` (the rate every other method uses), SPEC §6 step 5
CAL_RATE_FACTORS = (0.5, 1.0, 2.0)


def cal_rates(lr: float) -> tuple[float, ...]:
    """The DAFT rates ``calibrate`` tries for ``datta_cal`` (``CAL_RATE_FACTORS`` x ``lr``)."""
    return tuple(f * lr for f in CAL_RATE_FACTORS)


def cal_settings(cfg: DemoConfig, batch_size: int) -> dict:
    """The keyword arguments the demo passes :func:`~datta_kernels.calibrate` (and with them
    :func:`~datta_kernels.eval.cal_cache.cached_calibrate`'s key) for ``datta_cal`` at one batch
    size, so a study that calibrates as the demo does shares its choices and its cache."""
    return dict(n_batches=cfg.calibration_batches or default_batches(batch_size), lr=cal_rates(cfg.lr),
                backend=cfg.backend, seed=cfg.seed, grid=cfg.calibration_grid or BLEND_GRID,
                **({} if cfg.validation_mixing == "all" else {"mixing": cfg.validation_mixing}),
                **({} if cfg.daft_objective == "mean" else {"daft_objective": cfg.daft_objective}),
                **({} if cfg.stream_probes == "held_out" else {"held_out_streams": False}))


__all__ = ["METHODS", "ORACLES", "DemoConfig", "RunResult", "backend_check", "detector_metrics", "run_demo",
           "run_lockstep", "run_stream", "timed_call"]


def _baseline_row(name: str) -> Callable[[nn.Module, str, float, dict, Stream], nn.Module]:
    """A :data:`METHODS` entry for one of :data:`~datta_kernels.adapt.BASELINES`."""
    return lambda m, b, lr, kw, s: baseline(name, m, lr=lr, backend=b)


#: Method name -> factory ``(model, backend, lr, kw, stream) -> adapter``. Tent and DATTA
#: share one lr so their entropy steps are comparable; ``kw`` (``score_layer``, ``score_mode``)
#: only concerns the DATTA rows with the SPEC score; ``stream`` only the oracle, which reads its
#: true batch types (``*_oracle``: the row named before it deciding from the truth, not from
#: the score, with the same score layer and the same layers before it) and ``datta_disp`` /
#: ``datta_cal``, which read what was calibrated for their batch size on the validation
#: domains (``kw["disp_thresholds"]``, ``kw["cal"]``; see :mod:`.validation`).
METHODS: dict[str, Callable[[nn.Module, str, float, dict, Stream], nn.Module]] = {
    **{n: _baseline_row(n) for n in ("source", "tbn", "bn_adapt", "tent")},
    "datta": lambda m, b, lr, kw, s: DATTA(m, backend=b, lr=lr, **_spec(kw)),
    "datta_icme": lambda m, b, lr, kw, s: DATTA.released(m, backend=b, **_spec(kw)),   # the authors' code
    "datta_noft": lambda m, b, lr, kw, s: DATTA(m, daft=False, backend=b, lr=lr, **_spec(kw)),
    "datta_oracle": lambda m, b, lr, kw, s: DATTA(m, selector=OracleSelector(s.kinds), backend=b, lr=lr,
                                                  **_spec(kw)),
    "datta_disp": lambda m, b, lr, kw, s: DATTA(
        m, score_mode="dispersion", selector=_disp_selector(kw, s.batch_size), backend=b, lr=lr),
    "datta_disp_oracle": lambda m, b, lr, kw, s: DATTA(
        m, score_mode="dispersion", selector=OracleSelector(s.kinds), backend=b, lr=lr),
    "dyn": _baseline_row("dyn"),
    "datta_cal": lambda m, b, lr, kw, s: kw["cal"][s.batch_size].adapter(m, backend=b),
    "datta_cal_oracle": lambda m, b, lr, kw, s: kw["cal"][s.batch_size].adapter(
        m, selector=OracleSelector(_skewed_kinds(s)), backend=b),
}
#: ``DemoConfig.stream_probes``'s values (``--stream-probes``)
STREAM_PROBES = ("held_out", "deployed")
#: ``DemoConfig.validation_mixing``'s values (``--validation-mixing``)
MIXINGS = ("all", "severity")
#: Methods that need something calibrated per batch size (computed before the streams run).
CALIBRATED = ("datta_disp", "datta_disp_oracle", "datta_cal", "datta_cal_oracle")


def _skewed_kinds(stream: Stream) -> list[str]:
    """The true decision of each batch for a rule that knows ``skewed``: a label-sorted
    stream's batches are skewed, the others as the stream says."""
    return ["skewed" if stream.name == "single_noniid" else k for k in stream.kinds]


def _disp_selector(kw: dict, batch_size: int):
    """The threshold calibrated for ``batch_size`` on validation data, or (a runner without
    validation data, e.g. ``datta-kernels run``) the KDE rule."""
    t = kw.get("disp_thresholds", {}).get(batch_size)
    return ThresholdSelector(t) if t is not None else None


def _spec(kw: dict) -> dict:
    """The DATTA keyword arguments of the rows that use the configured (SPEC) score."""
    return {k: kw[k] for k in ("score_layer", "score_mode")}
#: Methods whose decision is not the detector's (left out of the detector table).
ORACLES = ("datta_oracle", "datta_disp_oracle", "datta_cal_oracle")
#: streams whose every batch holds one domain (the demo's names and ``run``'s): their rows report
#: the accuracy per domain and, for the rows that decide, the decisions per domain
PER_DOMAIN_STREAMS = ("single", "single_noniid", "continual", "correlated", "gradual")


@dataclass
class DemoConfig:
    """Everything one demo run depends on (recorded verbatim in ``results.json``)."""

    data_dir: str | None = None
    per_domain: int = 1000
    #: the test corruptions reported on (None: every corruption that is not one of
    #: ``validation_corruptions``; :func:`run_demo` records the resolved tuple)
    corruptions: tuple[str, ...] | None = None
    #: allow reporting on a validation corruption (its numbers are then labelled as validation)
    report_validation: bool = False
    #: the corruptions that decide (calibrate ``datta_disp`` / ``datta_cal``) and are never reported
    #: on (default :data:`~.validation.VALIDATION`: speckle_noise, gaussian_blur, spatter)
    validation_corruptions: tuple[str, ...] = VALIDATION
    severity: int = DEFAULT_SEVERITY
    streams: tuple[str, ...] = STREAMS
    batch_sizes: tuple[int, ...] = (16, 64)
    methods: tuple[str, ...] = tuple(METHODS)
    lr: float = 1e-3
    backend: str = "auto"
    #: where DATTA measures diversity: None = the first BatchNorm (SPEC §2), or a module name.
    score_layer: str | None = None
    score_mode: str = "pixel"
    #: validation batches of each type per batch size that calibrate ``datta_disp`` and
    #: ``datta_cal`` (None: ``datta_kernels.calibration.default_batches``, ~3,000 images a type)
    calibration_batches: int | None = None
    #: images per validation domain (clean held-out + validation corruptions at each of
    #: ``validation_severities``)
    validation_per_domain: int = 1000
    #: severities of the validation corruptions (default all five: the choices do not depend on
    #: the test severity; ``(severity,)`` calibrates for a deployment of known severity, as the
    #: literature's held-out-corruption protocols do)
    validation_severities: tuple[int, ...] = SEVERITIES
    #: what a mixed validation batch of ``datta_cal``'s calibration pools: ``"all"`` the
    #: validation domains together, ``"severity"`` the validation corruptions of one severity
    #: (as the test's mixed batches pool the corruptions of one), clean images apart
    #: (``calibrate(mixing=...)``, SPEC §6)
    validation_mixing: str = "all"
    #: how ``datta_cal``'s calibration ranks DAFT's settings (``calibrate(daft_objective=...)``,
    #: SPEC §6 step 5): ``"mean"`` over the validation streams, or ``"margin"``, the smallest
    #: margin over them against the best plain alternative (source, tbn, bn_adapt, tent, dyn)
    daft_objective: str = "mean"
    #: which class probe decides the batches of ``datta_cal``'s validation streams
    #: (``calibrate(held_out_streams=...)``, SPEC §6 step 4): ``"held_out"``, the one fitted
    #: without the batch's corruption family (the default), or ``"deployed"``, the one fitted on
    #: every family (how the demo calibrated before 2026-12-08)
    stream_probes: str = "held_out"
    #: candidate blends of ``datta_cal`` (None: ``datta_kernels.calibration.BLEND_GRID``)
    calibration_grid: tuple | None = None
    seed: int = 0
    check_batches: int = 30
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: bool = False
    #: calibrate ``datta_cal`` again even when the cache holds its choices for these inputs
    recalibrate: bool = False
    #: model and calibration cache (None: ``$XDG_CACHE_HOME/datta_kernels``)
    cache_dir: str | None = None
    progress: bool = True
    #: ``"portable"``: the run computes on :mod:`.numerics`' portable numerics (the same bits
    #: across vector widths and core counts, on one CPU maker; :func:`run_demo` pins them,
    #: which holds when no tensor operation ran before in the process) and ``train.numerics``
    #: should match; ``"native"``:
    #: as torch found the machine (faster on wide CPUs; numbers specific to the machine)
    numerics: str = "portable"

    @property
    def test_corruptions(self) -> tuple[str, ...]:
        """The corruptions reported on: ``corruptions``, or (None) every corruption that is not a
        validation corruption."""
        if self.corruptions is None:
            return reported_corruptions(self.validation_corruptions)
        return tuple(self.corruptions)

    @property
    def reported_on_validation(self) -> list[str]:
        """The test corruptions that are validation corruptions (allowed by ``report_validation``
        only, and labelled as validation numbers)."""
        return [c for c in self.test_corruptions if c in self.validation_corruptions]

    def validate(self) -> None:
        check_validation(self.validation_corruptions)
        for name, chosen, known in (("corruption", self.test_corruptions, CORRUPTIONS),
                                    ("stream", self.streams, STREAMS), ("method", self.methods, METHODS)):
            bad = [c for c in chosen if c not in known]
            if bad:
                raise ValueError(f"unknown {name}(s) {bad}; choose from {list(known)}")
        if self.per_domain < 2:
            raise ValueError(f"per_domain must be >= 2, got {self.per_domain}")
        largest = max(self.batch_sizes, default=2)
        if self.validation_per_domain < largest:
            raise ValueError(f"validation_per_domain ({self.validation_per_domain}) must be at least the "
                             f"largest batch size ({largest}): calibration draws whole "
                             "batches from each validation domain")
        check_severities(self.validation_severities, "validation_severities")
        if self.validation_mixing not in MIXINGS:
            raise ValueError(f"validation_mixing must be one of {MIXINGS}, got {self.validation_mixing!r}")
        if self.daft_objective not in DAFT_OBJECTIVES:
            raise ValueError(f"daft_objective must be one of {DAFT_OBJECTIVES}, got {self.daft_objective!r}")
        if self.stream_probes not in STREAM_PROBES:
            raise ValueError(f"stream_probes must be one of {STREAM_PROBES}, got {self.stream_probes!r}")
        check_numerics(self.numerics)
        leaked = self.reported_on_validation
        if leaked and not self.report_validation:
            raise ValueError(f"{leaked} are validation corruptions (they decide methods and are never "
                             "reported on); pass --report-validation to report on them anyway, "
                             "labelled as validation numbers")


@dataclass
class RunResult:
    """One method on one stream: per-batch records plus the summary."""

    method: str
    stream: str
    batch_size: int
    correct: list[int]
    sizes: list[int]
    ms: list[float]
    scores: list[float | None]
    decisions: list[str | None]
    kinds: list[str]
    domains: list[str]
    #: batches the adapter's selector answers "multiple" unconditionally (0 without one).
    warmup: int = 0
    #: per batch, why the KDE selector decided what it did (``KDEInfo.reason``; None otherwise).
    reasons: list[str | None] = field(default_factory=list)
    #: per batch, whether the adapter took a parameter update (fine-tuned) on it
    updated: list[bool] = field(default_factory=list)
    #: per batch, whether DATTA's output check released a ``skewed`` batch to ``single`` (SPEC §4)
    released: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, sum(self.sizes))

    @property
    def ms_per_batch(self) -> float:
        """Mean adapter time per batch, leaving out the first (one-off kernel/thread-pool start-up)."""
        ms = self.ms[1:] or self.ms
        return sum(ms) / max(1, len(ms))

    @property
    def ms_per_batch_no_update(self) -> float | None:
        """Mean adapter time over the batches it did not fine-tune (the first batch left out);
        None when there are none."""
        ms = [t for i, (t, u) in enumerate(zip(self.ms, self.updated)) if i > 0 and not u]
        return sum(ms) / len(ms) if ms else None

    def accuracy_by(self, labels: list[str]) -> dict[str, float]:
        """Accuracy grouped by a per-batch label (``self.domains`` or ``self.kinds``)."""
        return _ratio_by(labels, self.correct, self.sizes)

    def decisions_by(self, labels: list[str]) -> dict[str, dict[str, float]]:
        """Per label (e.g. ``self.domains``), the share of its batches given each decision
        (``"single"``, ``"multiple"``, ``"skewed"``: only those that occur); batches without a
        decision (adapters without a selector) are left out."""
        out: dict[str, dict[str, int]] = {}
        for lab, d in zip(labels, self.decisions):
            if d is not None:
                counts = out.setdefault(lab, {})
                counts[d] = counts.get(d, 0) + 1
        return {lab: {d: c / sum(counts.values()) for d, c in counts.items()} for lab, counts in out.items()}

    def row(self) -> dict:
        row = {"method": self.method, "stream": self.stream, "batch_size": self.batch_size,
               "accuracy": self.accuracy, "ms_per_batch": self.ms_per_batch,
               "batches": len(self.sizes), "samples": sum(self.sizes),
               "ms_per_batch_no_update": self.ms_per_batch_no_update,
               "updated_fraction": sum(self.updated) / max(1, len(self.updated))}
        deciding = any(d is not None for d in self.decisions)
        if self.stream in PER_DOMAIN_STREAMS:
            row["per_corruption"] = self.accuracy_by(self.domains)
            if deciding:        # which corruptions the detector misreads (every batch is single-domain)
                row["decisions_per_corruption"] = self.decisions_by(self.domains)
        if self.stream.startswith("dynamic"):
            row["by_batch_type"] = self.accuracy_by(self.kinds)
        if deciding:
            row["single_fraction"] = sum(d == "single" for d in self.decisions) / len(self.decisions)
        if any(self.released):      # the output check released some skewed batches (SPEC §4)
            row["released_fraction"] = sum(self.released) / len(self.released)
            if self.stream in PER_DOMAIN_STREAMS:
                # per corruption, the share of its batches released
                row["released_per_corruption"] = _ratio_by(self.domains, self.released,
                                                           [1] * len(self.released))
        return row


def _ratio_by(labels: list[str], num: list, den: list) -> dict[str, float]:
    """Per label, the sum of ``num`` over the sum of ``den`` of its batches."""
    out: dict[str, list] = {}
    for lab, a, b in zip(labels, num, den):
        acc = out.setdefault(lab, [0, 0])
        acc[0] += a
        acc[1] += b
    return {k: a / b for k, (a, b) in out.items()}


def timed_call(adapter: nn.Module, x: Tensor, y: Tensor, res: RunResult,
               sync: Callable[[], object] | None = None) -> Tensor:
    """One adapter call on the batch ``(x, y)``, timed (only the call; ``sync`` before and after
    it, e.g. ``torch.cuda.synchronize``) and recorded in ``res``; returns the logits."""
    before = getattr(adapter, "n_updates", 0)
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    logits = adapter(x)
    if sync is not None:
        sync()
    res.ms.append((time.perf_counter() - t0) * 1e3)
    res.updated.append(getattr(adapter, "n_updates", 0) != before)
    res.correct.append(int((logits.argmax(1) == y).sum()))
    res.sizes.append(len(y))
    res.scores.append(getattr(adapter, "last_score", None))
    res.decisions.append(getattr(adapter, "last_decision", None))
    res.released.append(bool(getattr(adapter, "last_released", False)))
    info = getattr(getattr(adapter, "selector", None), "last_info", None)
    res.reasons.append(getattr(info, "reason", None))
    return logits


def run_lockstep(adapters: dict[str, nn.Module], stream: Stream, batches: Iterable[tuple[Tensor, Tensor]],
                 bar=None, sync: Callable[[], object] | None = None) -> list[RunResult]:
    """Every adapter on ``stream`` in lockstep: each batch of ``batches`` (``stream``'s, in order)
    goes through every adapter before the next batch, the adapters taking turns in an order that
    rotates by one each batch.  Each adapter still sees the whole stream in order (its results
    are those of a run on its own), but their timings are taken side by side: a slow spell of a
    shared machine lands on every method alike, and no method always follows the same other
    one (whose memory traffic it would inherit).  ``bar`` is advanced once per call."""
    names = list(adapters)
    runs = {m: RunResult(m, stream.name, stream.batch_size, [], [], [], [], [], stream.kinds, stream.domains,
                         getattr(getattr(a, "selector", None), "warmup", 0)) for m, a in adapters.items()}
    for i, (x, y) in enumerate(batches):
        k = i % len(names)
        for m in names[k:] + names[:k]:
            timed_call(adapters[m], x, y, runs[m], sync)
            if bar is not None:
                bar.update(1)
    return [runs[m] for m in names]


def run_stream(adapter: nn.Module, method: str, pool: DomainPool, stream: Stream, bar=None) -> RunResult:
    """Feed ``stream`` through ``adapter`` batch by batch; time only the adapter call."""
    return run_lockstep({method: adapter}, stream, pool.batches(stream), bar)[0]


def _auroc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a random positive < score of a random negative), ties counted half
    (the Mann-Whitney form of the ROC area, for "low score means single")."""
    if not pos or not neg:
        return None
    neg_t = torch.tensor(neg, dtype=torch.float64)
    wins = sum(float((neg_t > p).sum() + 0.5 * (neg_t == p).sum()) for p in pos)
    return wins / (len(pos) * len(neg))


def detector_metrics(res: RunResult) -> dict:
    """Precision / recall of ``decision == "single"`` against the true batch type, on batches
    after the selector's warm-up (it answers "multiple" unconditionally before), plus the
    score's threshold-free AUROC over all batches, and how often each KDE rule decided
    (``kde_reasons``: ``one_peak``, ``ratio``, ``valley``, ... after the warm-up)."""
    warmup = res.warmup
    pairs = [(d == "single", k == "single") for d, k in zip(res.decisions[warmup:], res.kinds[warmup:])]
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    reasons: dict[str, int] = {}
    for r in res.reasons[warmup:]:
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    single = [s for s, k in zip(res.scores, res.kinds) if k == "single" and s is not None]
    mixed = [s for s, k in zip(res.scores, res.kinds) if k != "single" and s is not None]
    return {"method": res.method, "stream": res.stream, "batch_size": res.batch_size,
            "warmup": warmup, "batches": len(pairs),
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "score_auroc": _auroc(single, mixed),
            "skewed": sum(d == "skewed" for d in res.decisions) / max(1, len(res.decisions)),
            "kde_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def backend_check(model: nn.Module, pool: DomainPool, stream: Stream, n_batches: int, lr: float,
                  backend: str, **datta_kw) -> dict:
    """Default DATTA on ``backend`` vs on ``"reference"``, over the first ``n_batches`` of
    ``stream``: prediction agreement, decision agreement and the largest logit difference."""
    fused = DATTA(copy.deepcopy(model), backend=backend, lr=lr, **datta_kw)
    ref = DATTA(copy.deepcopy(model), backend="reference", lr=lr, **datta_kw)
    agree = total = same_decision = 0
    max_diff = 0.0
    batches = stream.batches[:n_batches]
    for idx in batches:
        a, b = fused(pool.x[idx]), ref(pool.x[idx])
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(idx)
        same_decision += fused.last_decision == ref.last_decision
        max_diff = max(max_diff, float((a - b).abs().max()))
    return {"backend": backend, "against": "reference", "stream": stream.name,
            "batch_size": stream.batch_size, "batches": len(batches), "samples": total,
            "prediction_agreement": agree / max(1, total),
            "decision_agreement": same_decision / max(1, len(batches)), "max_abs_logit_diff": max_diff}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "datta_kernels": __version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_demo(cfg: DemoConfig, command: str = "", log=print) -> dict:
    """Load data and model, corrupt, build the streams, run every method; return the results
    document (see ``report.write_outputs``) plus, under ``"_runs"``, the raw :class:`RunResult`s."""
    cfg.validate()
    cfg = replace(cfg, corruptions=cfg.test_corruptions)   # recorded as run
    t_start = time.perf_counter()
    numerics = pin_numerics(cfg.numerics, log)  # first: the switches hold only before any CPU kernel
    commit = provenance()["commit"]     # the code this run imported (a later commit would not be)
    data = load_fashion_mnist(cfg.data_dir)
    log(f"data: Fashion-MNIST from {data.root} ({len(data.train_y)} train, {len(data.test_y)} test)")
    model, model_info = load_or_train(cfg.train, data.train_x, data.train_y, cache=cfg.cache_dir,
                                      retrain=cfg.retrain, progress=cfg.progress)
    clean_acc = evaluate(model, data.test_x, data.test_y)
    model_info["clean_test_accuracy"] = clean_acc
    how = "loaded from cache" if model_info["source"] == "cache" else \
        f"trained in {model_info['train_seconds']:.0f} s"
    log(f"model: SmallResNet {how} ({model_info['path']}); clean test accuracy {clean_acc:.1%}")
    if (note := copy_note(cfg.train, model_info["weights_sha256"])) is not None:
        log(note)

    n = min(cfg.per_domain, len(data.test_y))
    t0 = time.perf_counter()
    pool = test_pool(data, n, cfg.severity, cfg.seed, cfg.test_corruptions, cfg.report_validation,
                     cfg.validation_corruptions)
    y = pool.y[pool.indices(0)]
    source_acc = {name: evaluate(model, pool.x[pool.indices(d)], y) for d, name in enumerate(pool.names)}
    log(f"corruptions: {len(pool.names)} types x {n} test images, severity {cfg.severity} "
        f"({time.perf_counter() - t0:.1f} s)")

    resolved = backends.resolve(cfg.backend, "cpu", torch.float32)
    streams = [make_stream(pool, s, bs, cfg.seed) for bs in cfg.batch_sizes for s in cfg.streams]
    total = sum(len(s) for s in streams) * len(cfg.methods)
    runs: list[RunResult] = []
    score_kw = {"score_layer": cfg.score_layer, "score_mode": cfg.score_mode}
    calibration, cal_reports, cal_cache = {}, {}, {}
    if any(m in CALIBRATED for m in cfg.methods):
        t0 = time.perf_counter()
        vdom = validation_domains(data, cfg.validation_per_domain, cfg.seed, tuple(cfg.validation_severities),
                                  train=cfg.train, corruptions=cfg.validation_corruptions)
        for bs in cfg.batch_sizes:
            n_cal = cfg.calibration_batches or default_batches(bs)
            calibration[bs] = calibrate_threshold_on(model, vdom, bs, n_cal, cfg.seed,
                                                     score_mode="dispersion", backend=cfg.backend)
            if any(m.startswith("datta_cal") for m in cfg.methods):
                cal_reports[bs], cal_cache[str(bs)] = cached_calibrate(
                    model, vdom, bs, cache=cfg.cache_dir, refresh=cfg.recalibrate, **cal_settings(cfg, bs))
                if cal_cache[str(bs)]["source"] == "cache":
                    log(f"datta_cal for batch size {bs}: calibrate's choices for these inputs loaded "
                        f"from the calibration cache ({cal_cache[str(bs)]['path']})")
                log(str(cal_reports[bs]))
        score_kw["disp_thresholds"] = {bs: c["threshold"] for bs, c in calibration.items()}
        score_kw["cal"] = cal_reports
        log(f"calibration on {len(vdom)} validation domains ({', '.join(vdom)}): datta_disp thresholds "
            f"{score_kw['disp_thresholds']}; datta_cal {len(cal_reports)} batch sizes "
            f"({time.perf_counter() - t0:.1f} s)")
    with progress_bar(total=total, desc="adapt", unit="batch", disable=not cfg.progress) as bar:
        for stream in streams:      # the methods in lockstep on each stream (run_lockstep)
            bar.set_postfix_str(f"{stream.name} / bs{stream.batch_size}", refresh=False)
            adapters = {m: METHODS[m](copy.deepcopy(model), cfg.backend, cfg.lr, score_kw, stream)
                        for m in cfg.methods}
            runs += run_lockstep(adapters, stream, pool.batches(stream), bar)

    detectors = [detector_metrics(r) for r in runs if r.stream.startswith("dynamic")
                 and r.method not in ORACLES and any(d is not None for d in r.decisions)]

    check = None
    if cfg.check_batches > 0:
        dyn = next((s for s in streams if s.name == "dynamic"), streams[0])
        check = backend_check(model, pool, dyn, cfg.check_batches, cfg.lr, resolved, **_spec(score_kw))
        if resolved == "reference":
            check["note"] = ("auto resolved to the reference backend (compiled kernels unavailable), "
                             "so this compares the reference with itself")

    return {
        "meta": {"command": command, "commit": commit, "machine": _machine(),
                 "numerics": numerics, "backend": resolved,
                 "backend_requested": cfg.backend, "seeds": {"data": cfg.seed, "streams": cfg.seed,
                                                            "corruptions": cfg.seed,
                                                            "training": cfg.train.seed},
                 "config": asdict(cfg),
                 "wall_seconds": time.perf_counter() - t_start},
        "model": model_info,
        "source_accuracy_per_corruption": source_acc,
        "results": [r.row() for r in runs],
        "detector": detectors,
        "calibration": {str(bs): {"threshold": c["threshold"], "domains": c["domains"],
                                  "single_scores": c["single"], "mixed_scores": c["mixed"]}
                        for bs, c in calibration.items()},
        "datta_cal": {str(bs): rep.as_dict() for bs, rep in cal_reports.items()},
        "datta_cal_cache": cal_cache,
        "reported_on_validation": cfg.reported_on_validation,
        "backend_check": check,
        "_runs": runs,
    }
