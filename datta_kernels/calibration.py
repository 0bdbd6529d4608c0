"""``calibrate``: DATTA configured for a user's model from labelled validation domains (SPEC §6).

The user supplies domains they may tune on (``{name: (images, labels)}``: e.g. validation
corruptions and clean held-out images, never the data they report on).  From validation streams
built of them, whose batch types are known by construction, :func:`calibrate` chooses

1. the blend of ``multiple`` batches and how instance terms are formed (cluster-pooled, SPEC
   §3b, or per sample with the shrink): the candidate (source / batch / instance weights) with
   the best accuracy on mixed-domain batches, every layer on it;
2. the blends of ``single`` and ``skewed`` batches: the best on single-domain i.i.d. and on
   label-sorted batches for the layers from the score layer on; then the blend of the layers
   *before* the score layer, which run before the decision exists and so take one blend for
   every batch: candidates ranked by the mean over the three batch types with the later layers
   on each type's blend, the best :data:`PRE_CANDIDATES` each taken through steps 2c-4 (the
   ``single`` and ``skewed`` blends again behind it, its cuts, rule and statistics of ``skewed``
   batches) and the one with the best mean over step 4's validation streams kept;
3. two decision rules on the dispersion score (SPEC §2): the *score band* (``skewed`` below
   ``low``, ``single`` below ``high``) and *score + spread* (``multiple`` from ``high``, else
   ``skewed`` when the batch's prediction spread from a :class:`~datta_kernels.diversity.ClassProbe`
   fitted at the score layer is below ``skew_cut``, else ``single``), each with the cuts that
   maximise the mean over the three batch types of the accuracy those blends give; and a
   limit on ``skewed``: only batches whose signed :func:`~datta_kernels.diversity.source_shift`
   at the score layer lies within the range of every validation batch of steps 3-5 (a batch farther from the
   source statistics than any validation batch gets ``single``, whose batch statistics follow
   the shift, rather than the source statistics ``skewed`` trusts);
4. the rule with the better mean accuracy over four validation streams without DAFT: the
   deployment's streams (SPEC §5: single-domain, mixed, dynamic, label-sorted), each using
   every validation image once, so they are as long as the validation data allow; then, on
   those streams, the statistics of ``skewed`` batches: the source statistics or the stream
   statistics (SPEC §3c) at a momentum (4b), their reset cut (4c) and their blend with the
   batch statistics (4d); then the output check (4e, ``DATTA(output_spread_cut=...)``): a
   ``skewed`` batch whose output predictions are spread (above a cut) is forwarded again as
   ``single``, the cut moved from :data:`RELEASE_START` while the mean rises, kept only if it
   beats no check;
5. DAFT off, or on at one of the candidate learning rates ``lr`` (entropy steps on ``single``
   batches), or on with EATA's reliable-sample filter (:data:`FILTER_BOUND`) from the best of
   those rates, doubled while the mean rises: the best mean accuracy over those streams and a
   *hard* stream (single-domain, over the third of the validation domains the configuration
   without DAFT does worst on); on only if it beats off.  With several
   candidates, a best rate at either end is followed past it (x2 or /2, up to
   ``RATE_STEPS`` times) while the mean rises.  Then, with DAFT on, (5b) its second forward of
   a ``single`` batch with the layers before the score layer on the ``single`` blend
   (``DATTA(daft_pre_single=True)``: the decision is known by then), and the chosen setting
   also on ``multiple`` batches (``DATTA(daft_multiple=True)``), each kept only if it raises
   the mean.
   A rate whose drift builds up over a long stream is judged over one: give at least as many
   validation images as the deployment's stream holds before a reset.

It returns the configured :class:`~datta_kernels.DATTA` (the model converted in place) with the
report of what it chose and the validation numbers behind each choice in ``adapter.calibration``.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .adapt import DATTA, baseline
from .diversity import ClassProbe, Selector, ThresholdSelector, prediction_spread, source_shift
from .eval.streams import make_stream, pool_of
from .nn import FusedDABN, dabn_layers, first_nonlinear_layer
from .surgery import _is_plain_bn, convert_model

__all__ = ["calibrate", "Calibration", "BLEND_GRID", "default_batches", "mixing_groups"]

#: candidate blends ``(w_s, w_b, w_c)``: source, test-batch and cluster-pooled instance weights
#: on a 0.2 grid (the instance terms are cluster-pooled, SPEC §3b).
BLEND_GRID = tuple((round(float(s), 1), round(float(b), 1), abs(round(float(1 - s - b), 1)))
                   for s, b in itertools.product(np.arange(0, 1.01, 0.2), repeat=2)
                   if s + b <= 1.0 + 1e-9)
KINDS = ("single", "mixed", "sorted")
#: :meth:`Calibration.save`'s file: its format name and version (raised when a field changes)
SAVE_FORMAT = "datta_kernels.Calibration"
SAVE_VERSION = 1
#: the validation streams of steps 4-5 (report name -> SPEC §5 stream kind)
STREAM_KINDS = {"single": "single", "mixed": "mixed", "dynamic": "dynamic", "sorted": "single_noniid"}
#: validation images of each batch type :func:`calibrate` draws by default
VALIDATION_IMAGES = 3072
#: step 2b's best pre blends (the layers before the score layer) that go on through steps
#: 2c-4e, the validation streams choosing among them
PRE_CANDIDATES = 2

#: at most this many extra DAFT rates past an end of the candidates (step 5)
RATE_STEPS = 3
#: the entropy bound of DAFT's reliable-sample filter candidate (step 5), in units of ln K:
#: EATA's value (Niu et al., 2022), not tuned here
FILTER_BOUND = 0.4
#: step 5's objectives (``calibrate(daft_objective=...)``): ``"mean"`` (default) ranks a DAFT
#: setting by its mean accuracy over the validation streams, ``"margin"`` by its smallest margin
#: over them against the best of :data:`RIVALS` on each (ties: the mean)
DAFT_OBJECTIVES = ("mean", "margin")
#: the plain alternatives of the ``margin`` objective (SPEC §6 step 5): the source model,
#: test-batch statistics, ``bn_adapt``, Tent (at the middle candidate rate) and DYN
RIVALS = ("source", "tbn", "bn_adapt", "tent", "dyn")
#: the ``hard`` validation stream of step 5: a single-domain stream over this fraction (rounded
#: up) of the validation domains, those on which the configuration without DAFT is least accurate
HARD_FRACTION = 1 / 3
#: the stream momentum tried first for ``skewed`` batches (step 4b), then halved or doubled
#: while the mean rises, within :data:`STREAM_LIMITS`
STREAM_START = 0.05
STREAM_LIMITS = (1 / 128, 0.4)
#: the blend of ``skewed`` batches on the stream statistics tried first: those statistics alone;
#: step 4d then moves weight :data:`STREAM_BATCH_STEP` at a time to the batch statistics
#: (``(1 - b, b, 0)``) while the mean rises
STREAM_BLEND = (1.0, 0.0, 0.0)
STREAM_BATCH_STEP = 0.2
#: the stream reset cut tried first (step 4c, on :func:`~datta_kernels.nn.stream_divergence`),
#: then halved or doubled while the mean rises, within :data:`RESET_LIMITS`
RESET_START = 1.0
RESET_LIMITS = (1 / 16, 16.0)
#: the output check's cut tried first (step 4e, on the output's
#: :func:`~datta_kernels.diversity.prediction_spread`), then lowered or raised by
#: :data:`RELEASE_STEP` while the mean rises (within [0, 1])
RELEASE_START = 0.6
RELEASE_STEP = 0.05


def default_batches(batch_size: int) -> int:
    """Validation batches of each type by default: about :data:`VALIDATION_IMAGES` images,
    at least 40 batches.  Fewer make the blend choices noise: on the demo's validation set at
    batch size 16, 40 single-domain batches (under four per domain) put the blend (0, 0.8,
    0.2) 1.7 points above plain batch statistics; 220 batches (20 per domain) put them 0.1
    apart."""
    return max(40, math.ceil(VALIDATION_IMAGES / int(batch_size)))


@dataclass
class Calibration:
    """What :func:`calibrate` chose and the validation accuracies behind each choice."""

    batch_size: int
    domains: list[str]
    batches: dict[str, int]
    score_layer: str
    #: ``"cluster"`` (cluster-pooled instance terms) or ``"instance"`` (per sample, shrunk)
    instance_mode: str
    single_blend: tuple[float, float, float]
    multiple_blend: tuple[float, float, float]
    #: the blend of ``skewed`` batches on the source statistics (step 2); with
    #: ``stream_momentum`` set they take :data:`STREAM_BLEND` on the stream statistics instead
    skewed_blend: tuple[float, float, float]
    #: the blend of the layers before the score layer, every batch (None: no such layer)
    pre_blend: tuple[float, float, float] | None
    threshold: float
    low: float
    #: cut on the batch's prediction spread below which a batch is ``skewed``
    #: (None: the rule does not read it)
    skew_cut: float | None
    daft: bool
    #: the DAFT learning rate chosen (with DAFT off: the smallest candidate)
    lr: float
    #: DAFT also steps on ``multiple`` batches (chosen on the validation streams)
    daft_multiple: bool = False
    #: DAFT's reliable-sample filter (SPEC §4, ``DATTA(entropy_filter=...)``): None, or the
    #: entropy bound in units of ln K (step 5)
    entropy_filter: float | None = None
    #: the validation domains of step 5's ``hard`` stream (empty: fewer than 3 domains, no such stream)
    hard_domains: list[str] = field(default_factory=list)
    #: ``skewed`` only where the batch's signed source shift at the score layer lies in this
    #: range ``(lo, hi)``: the most negative and most positive shift (0 included) among the
    #: validation batches of steps 3-5 (the cuts' batches and the streams'; None: no limit)
    shift_cut: tuple[float, float] | None = None
    #: with DAFT: the blend of the layers before the score layer in DAFT's second forward of a
    #: batch decided ``single`` (``DATTA(daft_pre_single=True)``; step 5b); None: ``pre_blend``
    pre_single_blend: tuple[float, float, float] | None = None
    #: blend -> accuracy (%) per batch type, every candidate
    blend_table: dict[tuple[float, float, float], dict[str, float]] = field(default_factory=dict)
    #: pre blend -> accuracy (%) per batch type, the later layers on the type's right blend
    pre_table: dict[tuple[float, float, float], dict[str, float]] = field(default_factory=dict)
    #: step 2b's best pre blends -> accuracy (%) per validation stream without DAFT, each with
    #: its own steps 2c-4e (the best mean is ``pre_blend``); empty: no layer before the score layer
    pre_streams: dict[tuple[float, float, float], dict[str, float]] = field(default_factory=dict)
    #: accuracy (%) per batch type of the chosen rule, and of the rule without ``low``
    decision_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: decision rule -> accuracy (%) per validation stream (no DAFT), every candidate
    rule_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``"off"`` / ``"on, lr X"`` -> accuracy (%) per validation stream
    daft_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: batches in each validation stream of steps 4-5 (every validation image once per stream)
    streams: dict[str, int] = field(default_factory=dict)
    #: instance mode -> its best accuracy (%) on mixed batches (the higher one is chosen)
    modes: dict[str, float] = field(default_factory=dict)
    #: the class probe at the score layer whose prediction spread ``skew_cut`` reads
    probe: ClassProbe | None = None
    #: ``skewed`` batches on the stream statistics (SPEC §3c) updated at this momentum, blend
    #: (1, 0, 0) from the score layer on; None: on ``skewed_blend`` with the source statistics
    stream_momentum: float | None = None
    #: with ``stream_momentum``: None, or the cut on the batch's divergence from a layer's
    #: stream statistics above which the batch restarts them (SPEC §3c "reset", step 4c)
    stream_reset: float | None = None
    #: with ``stream_momentum``: the blend of ``skewed`` batches on the stream statistics,
    #: ``(1 - b, b, 0)`` (step 4d; :data:`STREAM_BLEND` is ``b = 0``)
    stream_blend: tuple[float, float, float] = STREAM_BLEND
    #: ``"source"`` / ``"stream, momentum X"`` / ``"stream, momentum X, reset Y"`` /
    #: ``"stream ..., blend (a, b, 0)"`` -> accuracy (%) per validation stream (no DAFT)
    stream_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the groups of validation domains a mixed batch pooled (:func:`mixing_groups`; None: every
    #: domain together)
    mixing: list[list[str]] | None = None
    #: step 5's objective (:data:`DAFT_OBJECTIVES`; files saved before it existed: ``"mean"``)
    daft_objective: str = "mean"
    #: with the ``margin`` objective: rival (:data:`RIVALS`) -> accuracy (%) per step 5 stream
    rival_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the output check (step 4e, ``DATTA(output_spread_cut=...)``): a ``skewed`` batch whose
    #: output prediction spread is above this cut is forwarded again as ``single``; None: no check
    output_spread_cut: float | None = None
    #: ``"none"`` / ``"cut X"`` -> accuracy (%) per validation stream (no DAFT) of step 4e
    release_table: dict[str, dict[str, float]] = field(default_factory=dict)
    #: steps 4-5's validation streams decided each batch with the class probe fitted without its
    #: corruption family (``calibrate(held_out_streams=True)``); False: with the deployed probe
    #: (files saved before this field existed)
    held_out_streams: bool = False

    def adapter(self, model: nn.Module, selector: Selector | None = None, backend: str = "auto") -> DATTA:
        """The calibrated :class:`DATTA` around ``model`` (converted / reconfigured in place);
        ``selector`` replaces the calibrated decision, its cuts and the output check (e.g. an
        oracle for a bound)."""
        if any(_is_plain_bn(m) for m in model.modules()):
            model = convert_model(model, "datta", backend=backend, **INSTANCE_MODES[self.instance_mode])
        layers = dabn_layers(model)
        for layer in layers:
            layer.backend = backend
        score = dict(model.named_modules()).get(self.score_layer)
        if not any(layer is score for layer in layers):
            raise ValueError(f"the model has no BatchNorm layer named {self.score_layer!r} (the "
                             "calibrated score layer): calibrate and adapt the same architecture")
        # configured before DATTA snapshots the model, so that reset() keeps the configuration
        pre_single = getattr(self, "pre_single_blend", None) if self.daft else None
        _configure(layers, next(i for i, layer in enumerate(layers) if layer is score), self.pre_blend,
                   (self.single_blend, self.multiple_blend, self.skewed_blend), self.instance_mode,
                   self.stream_momentum, getattr(self, "stream_reset", None),
                   getattr(self, "stream_blend", STREAM_BLEND), pre_single)
        adapter = DATTA(model, preset=None, daft=self.daft, lr=self.lr, score_mode="dispersion",
                        daft_multiple=self.daft_multiple, daft_pre_single=pre_single is not None,
                        entropy_filter=getattr(self, "entropy_filter", None),
                        selector=selector or self.selector(), backend=None,
                        output_spread_cut=None if selector is not None else self.output_spread_cut,
                        score_layer=self.score_layer,
                        class_probe=None if self.probe is None else
                        copy.deepcopy(self.probe).to(layers[0].running_mean.device))
        adapter.calibration = self
        return adapter

    def save(self, path: str | os.PathLike) -> None:
        """Write this calibration to ``path``: every field (the tables included) as plain Python
        values and the probe's tensors, in a ``torch.save`` file that :meth:`load` reads with
        ``weights_only=True`` (no pickled code).  Written to a temporary file first and renamed,
        so an interrupted save never leaves a partial file under ``path``."""
        values = {f.name: _plain(getattr(self, f.name), f.name) for f in fields(self) if f.name != "probe"}
        probe = None
        if self.probe is not None:
            probe = {"version": ClassProbe._version, "channels": self.probe.center.numel() // 2,
                     "num_classes": self.probe.bias.numel(),
                     "state": {k: v.detach().cpu().clone() for k, v in self.probe.state_dict().items()}}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": SAVE_FORMAT, "version": SAVE_VERSION, "fields": values, "probe": probe}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """A calibration written by :meth:`save` (on the CPU; :meth:`adapter` moves the probe to
        the model's device).  A file of another format or version, or whose fields are not this
        version's, is refused with a ``ValueError`` (calibrate again)."""
        doc = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(doc, dict) or doc.get("format") != SAVE_FORMAT:
            raise ValueError(f"{path} is not a saved datta_kernels Calibration")
        if doc.get("version") != SAVE_VERSION:
            raise ValueError(f"{path} holds a Calibration of format version {doc.get('version')!r}; "
                             f"this datta_kernels reads version {SAVE_VERSION}: calibrate again")
        values = doc["fields"]
        unknown = set(values) - {f.name for f in fields(cls) if f.name != "probe"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(values)
        if unknown or missing:
            raise ValueError(f"{path}: fields {sorted(unknown)} unknown, {sorted(missing)} missing for this "
                             "datta_kernels' Calibration: calibrate again")
        probe = None
        if doc["probe"] is not None:
            p = doc["probe"]
            if p["version"] != ClassProbe._version:
                raise ValueError(f"{path}: its class probe is version {p['version']}, this datta_kernels' "
                                 f"is {ClassProbe._version}: calibrate again")
            probe = ClassProbe(p["channels"], p["num_classes"])
            probe.load_state_dict(p["state"])
        return cls(**values, probe=probe)

    def selector(self) -> ThresholdSelector:
        """The calibrated decision rule."""
        return ThresholdSelector(self.threshold, self.low, self.skew_cut, self.shift_cut)

    def as_dict(self) -> dict:
        tables = ("blend_table", "pre_table", "pre_streams")
        d = {k: v for k, v in self.__dict__.items() if k not in tables + ("probe",)}
        for key in tables:
            d[key] = {",".join(map(str, k)): v for k, v in getattr(self, key, {}).items()}
        return d

    def __str__(self) -> str:
        chosen = {"single": self.single_blend, "mixed": self.multiple_blend, "sorted": self.skewed_blend}
        lines = [f"datta_cal for batch size {self.batch_size}, calibrated on {', '.join(self.domains)} "
                 f"({', '.join(f'{n} {k}' for k, n in self.batches.items())} validation batches)",
                 f"blend (w_s, w_b, w_i), {self.instance_mode} instance terms -> validation "
                 "accuracy % on single / mixed / sorted batches (mixed: all layers on the "
                 "blend; single, sorted: the layers from the score layer on, those before it on "
                 "their own blend)"]
        mixing = getattr(self, "mixing", None)
        if mixing:
            lines.insert(1, "mixed batches (and the mixed parts of the streams) pool one group of "
                         "domains at a time: " + mixing_words(mixing))
        for w, acc in sorted(self.blend_table.items()):
            marks = [f"<- {name}" for name, c in chosen.items() if c == w]
            cols = " ".join(f"{acc[k]:6.1f}" for k in KINDS)
            lines.append(f"  {_fmt(w):<18} {cols}  {' '.join(marks)}".rstrip())
        lines.append(f"chosen: instance terms {self.instance_mode} (best mixed-batch accuracy by mode: "
                     + ", ".join(f"{m} {v:.2f} %" for m, v in self.modes.items()) + f"); single "
                     f"{_fmt(self.single_blend)}, multiple {_fmt(self.multiple_blend)}, skewed "
                     f"{_fmt(self.skewed_blend)}")
        if self.pre_blend is not None:
            lines.append("blend of the layers before the score layer (every batch; the later layers "
                         "on each type's blend) -> validation accuracy % on single / mixed / sorted, "
                         "mean; the best five:")
            ranked = sorted(self.pre_table.items(), key=lambda kv: -_mean(kv[1]))
            for w, acc in ranked[:5]:
                mark = "  <- before the score layer" if w == self.pre_blend else ""
                lines.append(f"  {_fmt(w):<18} " + " ".join(f"{acc[k]:6.1f}" for k in KINDS)
                             + f"  {_mean(acc):6.1f}{mark}")
            pre_streams = getattr(self, "pre_streams", {})
            if pre_streams:
                lines.append(f"the best {len(pre_streams)} of them, each through the steps below (its own "
                             "blends, cuts and statistics of skewed batches) -> validation streams "
                             "without DAFT (ties: the order above); the tables below are the chosen one's:")
                for w, acc in pre_streams.items():
                    mark = "  <- before the score layer" if w == self.pre_blend else ""
                    lines.append(f"  {_fmt(w):<18} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                                 + f"  mean {_mean(acc):5.1f}{mark}")
        lines.append(f"cuts on the dispersion score at {self.score_layer} (the best mean accuracy over "
                     "the three batch types), per validation batch:")
        for name, acc in self.decision_table.items():
            lines.append(f"  {name:<20} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items()))
        lines.append(f"decision rule: {rule_name(self.threshold, self.low, self.skew_cut, self.shift_cut)} "
                     "(the best mean over the validation streams without DAFT; each stream every "
                     "validation image once: " + ", ".join(f"{k} {n}" for k, n in self.streams.items())
                     + " batches; candidates:)")
        if getattr(self, "held_out_streams", False):
            lines.append("  on the streams here and below, each batch is decided with the class probe "
                         "fitted without its corruption family (the family of most of its samples), "
                         "as a test batch meets a probe that never saw its corruption; the adapter "
                         "carries the probe fitted on every family")
        if self.shift_cut is not None:
            lo, hi = self.shift_cut
            lines.append(f"  shift range [{lo:.4g}, {hi:.4g}]: the signed source shift at {self.score_layer} "
                         f"(negative: variances below the source's, positive: above) of the "
                         f"{sum(self.batches.values()) + sum(self.streams.values())} validation batches "
                         "(those above and the streams'), most negative "
                         "and most positive; a batch farther from the source statistics in either "
                         "direction than every validation batch is never skewed (it gets single)")
        for name, acc in self.rule_table.items():
            lines.append(f"  {name:<46} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                         + f"  mean {_mean(acc):5.1f}")
        if self.stream_table:
            reset = getattr(self, "stream_reset", None)
            which = ("the stream statistics at momentum " f"{self.stream_momentum:g}"
                     + ("" if reset is None else f", restarted by a batch whose divergence from "
                        f"them exceeds {reset:g}")
                     + f", blend {_fmt(getattr(self, 'stream_blend', STREAM_BLEND))}"
                     if self.stream_momentum is not None else "the source statistics")
            lines.append(f"skewed batches on {which} from the score layer on (the best mean over "
                         "the validation streams without DAFT; ties: the source statistics, then "
                         "the smaller momentum; no reset, then the larger cut; the smaller batch "
                         "weight):")
            width = max(28, *map(len, self.stream_table))
            for name, acc in self.stream_table.items():
                lines.append(f"  {name:<{width}} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                             + f"  mean {_mean(acc):5.1f}")
        releases = getattr(self, "release_table", {})
        if releases:
            cut = getattr(self, "output_spread_cut", None)
            lines.append("output check: " + ("none" if cut is None else
                                              f"a skewed batch whose output prediction spread is above "
                                              f"{cut:g} is forwarded again as single")
                         + " (the best mean over the validation streams without DAFT; ties: no check, "
                         "then the higher cut):")
            for name, acc in releases.items():
                lines.append(f"  {name:<28} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                             + f"  mean {_mean(acc):5.1f}")
        filt = getattr(self, "entropy_filter", None)
        pre_single = getattr(self, "pre_single_blend", None)
        chosen = (f"on at lr {self.lr:g}, " + ("" if filt is None else f"entropy filter {filt:g} ln K, ")
                  + ("single and multiple batches" if self.daft_multiple else "single batches")
                  + ("" if pre_single is None else f", the layers before the score layer on "
                     f"{_fmt(pre_single)} in its second forward of a single batch")
                  ) if self.daft else "off"
        hard = getattr(self, "hard_domains", [])
        rivals = getattr(self, "rival_table", {})
        margin = getattr(self, "daft_objective", "mean") == "margin" and bool(rivals)
        lines.append(f"DAFT {chosen} (" + ("the best smallest margin over the validation streams"
                                           if margin else "the best mean over the validation streams")
                     + (f" and the hard stream ({', '.join(hard)}: the least accurate "
                        "domains without DAFT, one after another)" if hard else "")
                     + ("" if not margin else ", each stream against the best of the plain "
                        "alternatives below; then the mean")
                     + "; ties: off, then no filter, then the smaller rate, then the pre blend in "
                     "the second forward, then single batches only):")
        width = max(23, *map(len, self.daft_table))
        score = _daft_score(_best_rival(rivals)) if margin else None
        for name, acc in rivals.items():
            lines.append(f"  {name:<{width + 5}} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                         + f"  mean {_mean(acc):5.1f}")
        for name, acc in self.daft_table.items():
            lines.append(f"  daft {name:<{width}} " + "  ".join(f"{k} {v:5.1f}" for k, v in acc.items())
                         + f"  mean {_mean(acc):5.1f}"
                         + (f"  margin {score(acc)[0]:+5.1f}" if margin else ""))
        return "\n".join(lines)


def _plain(value, name: str = "value"):
    """``value`` as the plain Python values ``torch.load(weights_only=True)`` reads back (numpy
    scalars and arrays become floats, ints, bools and lists; tuples, lists and dicts are
    followed); anything else is refused, so :meth:`Calibration.save` never writes a file its
    ``load`` cannot read."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return tuple(_plain(v, name) for v in value)
    if isinstance(value, list):
        return [_plain(v, name) for v in value]
    if isinstance(value, dict):
        return {_plain(k, name): _plain(v, name) for k, v in value.items()}
    raise TypeError(f"Calibration.save: field {name!r} holds a {type(value).__name__}, not a plain value")


def _check_domains(domains: Mapping[str, tuple[Tensor, Tensor]], batch_size: int) -> None:
    if not isinstance(domains, Mapping) or not domains:
        raise ValueError("domains must be a non-empty mapping name -> (images, labels)")
    for name, pair in domains.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"domain {name!r}: expected (images, labels)")
        x, y = pair
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"domain {name!r}: images must be a float (N, C, H, W) tensor")
        if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"domain {name!r}: labels must be an integer ({x.shape[0]},) tensor")
        if x.shape[0] < batch_size:
            raise ValueError(f"domain {name!r} has {x.shape[0]} images, fewer than batch_size {batch_size}")


def _batches(domains, batch_size: int, n: int, g: torch.Generator,
             families: dict[str, list[Tensor]] | None = None,
             groups: list[list[str]] | None = None) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """``n`` validation batches of each type: single-domain i.i.d. (cycling the domains),
    mixed (all domains pooled; with ``groups`` (:func:`mixing_groups`), the domains of one
    group, cycling the groups of two or more domains), label-sorted single-domain (consecutive
    slices of a domain sorted by label, as a label-sorted stream delivers them).  ``families``,
    when given, is filled with each batch's per-sample family index (:func:`_families`)."""
    names = list(domains)
    xs = torch.cat([domains[k][0] for k in names])
    ys = torch.cat([domains[k][1] for k in names])
    starts = np.cumsum([0] + [len(domains[k][1]) for k in names])
    pools = [torch.arange(len(ys))]
    if groups is not None and len(groups) > 1:
        ranges = {k: torch.arange(int(starts[i]), int(starts[i + 1])) for i, k in enumerate(names)}
        pools = [torch.cat([ranges[k] for k in grp]) for grp in groups if len(grp) > 1] or pools
    out: dict[str, list] = {k: [] for k in KINDS}
    for i in range(n):
        d = i % len(names)
        lo, hi = int(starts[d]), int(starts[d + 1])
        idx = lo + torch.randperm(hi - lo, generator=g)[:batch_size]
        out["single"].append(idx)
        mix = pools[i % len(pools)]
        out["mixed"].append(mix[torch.randperm(len(mix), generator=g)[:batch_size]])
        order = lo + torch.randperm(hi - lo, generator=g)
        order = order[torch.sort(ys[order], stable=True).indices]
        k = int(torch.randint(0, (hi - lo) // batch_size, (1,), generator=g))
        out["sorted"].append(order[k * batch_size:(k + 1) * batch_size])
    if families is not None:
        fam = torch.repeat_interleave(torch.as_tensor(_families(names)),
                                      torch.as_tensor([len(domains[k][1]) for k in names]))
        families.update({k: [fam[i] for i in v] for k, v in out.items()})
    return {k: [(xs[i], ys[i]) for i in v] for k, v in out.items()}


def _batch_families(domains, family: Mapping[str, int], batches: list[Tensor]) -> list[int]:
    """The family (``family``: domain name -> family index) of most samples of each of
    ``batches`` (index tensors into the images of ``domains`` concatenated in order, as
    :func:`_streams` gives them; ties: the smaller index)."""
    fam = torch.repeat_interleave(torch.as_tensor([family[k] for k in domains]),
                                  torch.as_tensor([len(domains[k][1]) for k in domains]))
    return [int(torch.bincount(fam[b]).argmax()) for b in batches]


def _families(names) -> list[int]:
    """Each domain's corruption family as an index: domains ``<name>@<severity>`` share the
    family ``<name>``; any other name is a family of its own."""
    fams: list[str] = []
    out = []
    for name in names:
        f = name.split("@", 1)[0]
        if f not in fams:
            fams.append(f)
        out.append(fams.index(f))
    return out


def _held_out_probes(fit_feats: Tensor, fit_y: Tensor, fit_fam: Tensor,
                     num_classes: int) -> dict[int, ClassProbe]:
    """Family index -> a class probe fitted without that family's samples (with one family,
    the probe fitted on all): what a batch of that family meets at test time, where every
    corruption is unseen."""
    probes = {}
    for f in fit_fam.unique().tolist():
        keep = fit_fam != f
        probes[f] = ClassProbe.fit(fit_feats[keep] if keep.any() else fit_feats,
                                   fit_y[keep] if keep.any() else fit_y, num_classes)
    return probes


def _held_out_spreads(probes: dict[int, ClassProbe], feats: list[Tensor], fams: list[Tensor],
                      num_classes: int) -> np.ndarray:
    """Each batch's prediction spread as on a corruption the probe was not fitted on: every
    sample's logits come from the probe of :func:`_held_out_probes` fitted without its family.
    A probe's predictions drift under an unseen corruption (a test corruption) and the cut must
    allow for that drift."""
    out = []
    with torch.no_grad():
        for x, fam in zip(feats, fams):
            logits = torch.empty(len(x), num_classes)
            for f in fam.unique().tolist():         # each family's samples through its probe
                rows = fam == f
                logits[rows] = probes[f].logits(x[rows])
            out.append(float(prediction_spread(logits)))
    return np.array(out)


def _streams(domains, batch_size: int, seed: int, kinds=None,
             groups: list[list[str]] | None = None) -> tuple[Tensor, Tensor, dict[str, list[Tensor]]]:
    """The deployment's streams (SPEC §5) over the validation domains, each using every
    validation image once: ``single`` (one domain after another, in the order given),
    ``mixed``, ``dynamic`` (single and mixed batches alternating) and ``sorted`` (one domain
    after another, label-sorted within each).  As long as the data allow, so a DAFT rate whose
    drift builds up over a long stream is judged over one.  Returns the pooled images and
    labels and, per stream, its batches as index tensors into them (batches of one sample,
    where a domain's size leaves one over, are dropped: their statistics are undefined).
    ``kinds``: only these report names (e.g. ``("single",)``).  ``groups``
    (:func:`mixing_groups`; None: one group of every domain): the mixed and dynamic streams
    run one group after another, each mixing only its own domains (as a test stream mixes the
    corruptions of one severity)."""
    names = list(domains)
    pool = pool_of(domains)
    parts = [(pool, torch.arange(len(pool.y)))]
    if groups is not None and len(groups) > 1:      # each group's own pool, and where it lies in ``pool``
        parts = [(pool_of({k: domains[k] for k in grp}),
                  torch.cat([pool.indices(names.index(k)) for k in grp])) for grp in groups]
    out = {}
    for key, kind in STREAM_KINDS.items():
        if kinds is not None and key not in kinds:
            continue
        if kind in ("single", "single_noniid"):     # one domain after another: no group to keep
            batches = make_stream(pool, kind, batch_size, seed).batches
        else:
            batches = [idx[b] for i, (sub, idx) in enumerate(parts)
                       for b in make_stream(sub, kind, batch_size, seed + i).batches]
        out[key] = [b for b in batches if len(b) > 1]
    return pool.x, pool.y, out


def mixing_groups(names: Sequence[str], mixing=None) -> list[list[str]] | None:
    """The groups of validation domains a mixed batch pools (SPEC §6): ``mixing`` None or
    ``"all"``: every domain together (returns None); ``"severity"``: the domains named
    ``<corruption>@<s>`` of one severity ``s`` each, a name without ``@`` (e.g. clean images) a
    group of its own, groups in the order their first domain is given; or a sequence of groups
    of domain names, each domain in exactly one.  A group of one domain gives no mixed batch in
    steps 1-3 (its share of the mixed and dynamic streams is that domain's own batches)."""
    names = list(names)
    if mixing is None or mixing == "all":
        return None
    if mixing == "severity":
        keys: dict[str, list[str]] = {}
        for n in names:
            keys.setdefault(n.rsplit("@", 1)[1] if "@" in n else f"domain {n}", []).append(n)
        return list(keys.values())
    if isinstance(mixing, str) or not isinstance(mixing, Sequence):
        raise ValueError(f"mixing must be None, 'all', 'severity' or a sequence of groups of domain names, "
                         f"got {mixing!r}")
    groups = [list(g) for g in mixing]
    flat = [n for g in groups for n in g]
    if any(not g for g in groups) or sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
        raise ValueError(f"mixing groups must hold every validation domain exactly once: domains {names}, "
                         f"groups {groups}")
    return groups


def mixing_words(groups: list[list[str]]) -> str:
    """:func:`mixing_groups`'s groups in words (the calibration report's and the demo's):
    ``"a@1, b@1 | a@2, b@2"``."""
    return " | ".join(", ".join(g) for g in groups)


def rule_name(high: float, low: float, skew_cut: float | None, shift_cut=None) -> str:
    """``ThresholdSelector(high, low, skew_cut, shift_cut)``'s rule in words (the calibration
    report's and the demo's wording); ``shift_cut`` a number ``c`` (``|shift| <= c``) or a
    range ``(lo, hi)`` of the signed shift."""
    skew = ([f"score < {low:.4g}"] if low != -math.inf else []) + \
           ([f"spread < {skew_cut:.4g}"] if skew_cut is not None else [])
    parts = [f"multiple if score >= {high:.4g}"]
    if skew:
        cond = " or ".join(skew)
        if shift_cut is not None:
            cond = (f"({cond})" if len(skew) > 1 else cond) + f" and {_shift_words(shift_cut)}"
        parts.append(f"skewed if {cond}")
    return "; ".join(parts) + "; else single"


def _shift_words(shift_cut) -> str:
    if isinstance(shift_cut, (tuple, list)):
        lo, hi = shift_cut
        return f"{float(lo):.4g} <= shift <= {float(hi):.4g}"
    return f"|shift| <= {float(shift_cut):.4g}"


#: how the instance terms of a blend are formed: cluster-pooled (SPEC §3b) or per sample with
#: the NOTE shrink of the ``datta`` preset (SPEC D2)
INSTANCE_MODES = {"cluster": {"cluster": True, "shrink_k": None},
                  "instance": {"cluster": False, "shrink_k": 4.0}}


def _stream_blend(b: float) -> tuple[float, float, float]:
    """Step 4d's candidate: the stream statistics at ``1 - b``, the batch statistics at ``b``."""
    return (round(1.0 - b, 6), round(b, 6), 0.0)


def _fmt(w) -> str:
    return "(" + ", ".join(f"{abs(v):.1f}" for v in w) + ")"


def _configure(layers: list[FusedDABN], pre: int, pre_blend, blends, mode: str = "cluster",
               stream: float | None = None, reset: float | None = None,
               stream_blend=STREAM_BLEND, pre_single=None) -> None:
    """The layers before the score layer (``layers[:pre]``) on ``pre_blend`` whatever the
    decision (their ``single`` slot on ``pre_single`` when given: only DAFT's second forward
    with ``daft_pre_single`` reads it), the others on ``blends = (single, multiple, skewed)`` by
    decision; instance terms as ``mode`` says; with a ``stream`` momentum, ``skewed`` batches
    on the stream statistics (SPEC §3c) with the blend ``stream_blend`` from the score layer
    on, restarted by a batch farther from them than ``reset``."""
    for i, layer in enumerate(layers):
        weights = ((pre_single or pre_blend,) + (pre_blend,) * 2 if i < pre and pre_blend is not None
                   else blends)
        if stream is not None and i >= pre:
            weights = (*weights[:2], tuple(stream_blend))
        layer.set_preset("datta", weights=weights, **INSTANCE_MODES[mode])
        layer.set_stream(*((stream, reset) if i >= pre else (None, None)))


@torch.no_grad()
def _accuracy(model: nn.Module, batches) -> np.ndarray:
    return np.array([float((model(x).argmax(1) == y).float().mean()) for x, y in batches])


def _run_middle(good: np.ndarray, k: int) -> int:
    """The middle index of the run of consecutive True values of ``good`` that holds ``k``."""
    lo = hi = k
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi + 1 < len(good) and good[hi + 1]:
        hi += 1
    return (lo + hi) // 2


#: the three decisions, in the order of :func:`_decide`'s codes
DECISIONS = ("skewed", "single", "multiple")
#: the right decision for each validation batch type
_TRUE = {"single": "single", "mixed": "multiple", "sorted": "skewed"}


def _decide(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 = skewed (score < low), 1 = single (low <= score < high), 2 = multiple (else, NaN too)."""
    out = np.full(len(scores), 2)
    out[scores < high] = 1
    out[scores < low] = 0
    return out


def _kind_weights(kinds: np.ndarray) -> np.ndarray:
    """``(n,)`` weights of the objective the cuts maximise: its value is ``accuracies @ weights``,
    the mean over the batch types present (single-domain, mixed, label-sorted) of the mean
    accuracy of each type's batches."""
    w = np.zeros(len(kinds))
    present = [k for k in KINDS if (kinds == k).any()]
    for k in present:
        w[kinds == k] = 1.0 / ((kinds == k).sum() * len(present))
    return w


def _cut_points(values: np.ndarray) -> np.ndarray:
    """Candidate cuts on ``values``: the midpoints between consecutive distinct finite values,
    then one cut above them all (every value below it)."""
    u = np.unique(values[np.isfinite(values)])
    top = u[-1] + max(1.0, abs(u[-1])) if len(u) else 1.0
    return np.concatenate([(u[:-1] + u[1:]) / 2, [top]])


def _objectives(said: np.ndarray, table: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The objective (:func:`_kind_weights`) of every row of decision codes ``said`` (rows x
    batches; ``table``: decisions x batches of accuracies)."""
    return np.take_along_axis(table, said, axis=0) @ weights


def _best_band(scores: np.ndarray, acc: dict[str, np.ndarray], kinds: np.ndarray,
               allow_low: bool = True) -> tuple[float, float, float]:
    """The cuts ``low < high`` (``low`` may be -inf) maximising the objective
    (:func:`_kind_weights`) of the accuracy each batch gets under the decision :func:`_decide`
    gives it; returns ``(low, high, objective)``.  Ties: no low cut when it is as good, each
    cut in the middle of its run of equally good cuts."""
    highs = _cut_points(scores)
    lows = np.concatenate([[-math.inf], highs[:-1]]) if allow_low else np.array([-math.inf])
    table, weights = np.stack([acc[d] for d in DECISIONS]), _kind_weights(kinds)
    objective = np.full((len(lows), len(highs)), -np.inf)
    for j, hi in enumerate(highs):
        ok = lows < hi
        said = np.where(scores[None, :] < hi, 1, 2) - (scores[None, :] < lows[ok, None])
        objective[ok, j] = _objectives(said, table, weights)
    best = objective.max()
    good = objective >= best - 1e-9
    i, j = np.argwhere(good)[0]
    j = _run_middle(good[i], j)
    if i > 0:
        i = _run_middle(good[:, j] & (np.arange(len(lows)) > 0), i)
    return float(lows[i]), float(highs[j]), float(best)


def _mean(acc: dict[str, float]) -> float:
    """The mean of a table row of accuracies (per batch type or per validation stream): the
    objective of the pre blend (step 2) and of steps 4-5."""
    return float(np.mean(list(acc.values())))


def _stream_accuracy(adapter: DATTA, x: Tensor, y: Tensor, batches: list[Tensor],
                     probes: list[ClassProbe] | None = None) -> float:
    """Accuracy (%) of one pass of ``adapter`` over the stream ``batches``; with ``probes``,
    batch ``i`` is decided with the class probe ``probes[i]`` (the held-out streams)."""
    correct = total = 0
    for i, idx in enumerate(batches):
        if probes is not None:
            adapter.class_probe = probes[i]
        correct += int((adapter(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
    return 100.0 * correct / max(1, total)


def _climb(runs: dict, start: float, moves, evaluate, limits=(0.0, math.inf),
           steps: int | None = None, score=_mean) -> None:
    """The one-dimensional searches of steps 4b, 4c, 4d, 4e and 5 (the filter's rate): fills
    ``runs`` (value -> accuracy per stream, ``start`` already in it) along each move in turn,
    from ``start`` to the next value (a number in ``moves`` multiplies the value, a callable
    maps it), ``evaluate(value)``, within ``limits`` and at most ``steps`` times, while the mean
    (or ``score``) rises (the first value whose mean does not rise is kept and ends it)."""
    for move in moves:
        at = start
        for _ in itertools.count() if steps is None else range(steps):
            nxt = move(at) if callable(move) else at * move
            if not limits[0] <= nxt <= limits[1]:
                break
            runs[nxt] = evaluate(nxt)
            if score(runs[nxt]) <= score(runs[at]):
                break
            at = nxt


def _past_the_end(on: dict[float, dict[str, float]], off: dict[str, float],
                  mean=_mean) -> tuple[float, float | None]:
    """Step 5's rate search: the best of the rates tried (``on``: rate -> accuracy per stream;
    ties: the smaller rate) and the rate to try next, twice the best when it is the largest,
    half when it is the smallest and beats DAFT off (``off``), else None (a maximum inside)."""
    rates = sorted(on)
    top = max(rates, key=lambda r: (mean(on[r]), -r))
    if top == rates[-1]:
        return top, 2.0 * top
    if top == rates[0] and mean(on[top]) > mean(off):
        return top, 0.5 * top
    return top, None


def _rivals(model: nn.Module, rate: float, backend: str) -> dict[str, Callable[[], nn.Module]]:
    """The plain alternatives of step 5's ``margin`` objective (:data:`RIVALS`), each a fresh
    adapter around a copy of ``model`` per call: Tent at ``rate``, DYN at its source rate 0.8."""
    return {n: (lambda n=n: baseline(n, copy.deepcopy(model), lr=rate, backend=backend)) for n in RIVALS}


def _best_rival(rival_table: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
    """Stream -> the best rival's accuracy on it (None: no rivals)."""
    if not rival_table:
        return None
    return {k: max(v[k] for v in rival_table.values()) for k in next(iter(rival_table.values()))}


def _daft_score(best: Mapping[str, float] | None) -> Callable[[Mapping[str, float]], tuple[float, ...]]:
    """Step 5's objective as a sort key (higher is better): with ``best`` (stream -> the best
    rival's accuracy) the smallest margin over the streams against it, then the mean; without,
    the mean alone."""
    if best is None:
        return lambda acc: (_mean(acc),)
    return lambda acc: (min(acc[k] - best[k] for k in acc), _mean(acc))


def _hard_domains(make_adapter, domains, batch_size: int, seed: int, probe_of=None) -> list[str]:
    """The ``ceil(HARD_FRACTION * D)`` validation domains (D >= 3; none below) on which the
    adapter ``make_adapter()`` builds (the calibrated configuration without DAFT, fresh for each
    domain) is least accurate, each domain's images once in batches as the single-domain
    stream takes them (with ``probe_of``, decided with the class probe ``probe_of(domain)``); in
    the order given (ties: the earlier domain)."""
    names = list(domains)
    if len(names) < 3:
        return []
    acc = {}
    for k in names:
        x, y, one = _streams({k: domains[k]}, batch_size, seed, ("single",))
        probes = None if probe_of is None else [probe_of(k)] * len(one["single"])
        acc[k] = _stream_accuracy(make_adapter(), x, y, one["single"], probes)
    hard = sorted(names, key=lambda k: (acc[k], names.index(k)))[:math.ceil(HARD_FRACTION * len(names))]
    return [k for k in names if k in hard]


def _scores(work: nn.Module, batches, shift: bool = True,
            feats: bool = True) -> tuple[np.ndarray, list[Tensor], np.ndarray]:
    """The dispersion score of every batch (as DATTA computes it, every decision ``multiple``,
    no update), the :meth:`ClassProbe.features` of its score layer's instance statistics (an
    empty list with ``feats=False``) and its signed :func:`source_shift` there (NaN with
    ``shift=False``)."""
    probe = DATTA(copy.deepcopy(work), preset=None, selector=ThresholdSelector(0.0), daft=False,
                  score_mode="dispersion", backend=None)
    scores, features, shifts = [], [], []
    for x in batches:
        probe(x)
        layer = probe.layers[probe._score_at]
        scores.append(probe.last_score)
        if feats:
            features.append(ClassProbe.features(*layer.last_stats, layer.source_mean, layer.source_var,
                                                  layer.eps))
        shifts.append(float(source_shift(*layer.last_stats, layer.source_mean, layer.source_var, layer.eps,
                                         signed=True)) if shift else math.nan)
    return np.array(scores, dtype=float), features, np.array(shifts, dtype=float)


def _best_skew_rule(scores: np.ndarray, spread: np.ndarray, acc: dict[str, np.ndarray],
                    kinds: np.ndarray) -> tuple[float, float, float]:
    """The cuts ``(high, skew_cut)`` of the rule multiple if ``score >= high``, else skewed if
    ``spread < skew_cut``, else single, maximising the objective (:func:`_kind_weights`);
    returns ``(high, skew_cut, objective)`` (each cut in the middle of its run of equally good cuts)."""
    highs, skews = _cut_points(scores), np.concatenate([[-math.inf], _cut_points(spread)])
    table, weights = np.stack([acc[d] for d in DECISIONS]), _kind_weights(kinds)
    objective = np.empty((len(skews), len(highs)))
    low_spread = (spread[None, :] < skews[:, None]).astype(np.int64)       # skews x batches
    for j, hi in enumerate(highs):
        said = np.where(scores[None, :] < hi, 1 - low_spread, 2)
        objective[:, j] = _objectives(said, table, weights)
    best = objective.max()
    good = objective >= best - 1e-9
    i, j = np.argwhere(good)[0]
    j = _run_middle(good[i], j)
    i = _run_middle(good[:, j], i)
    return float(highs[j]), float(skews[i]), float(best)


def _search_blends(work: nn.Module, layers: list[FusedDABN], pre: int, val, grid, modes) -> dict:
    """Steps 1-2b of the module doc: the instance mode and the ``multiple`` blend, the
    ``single`` and ``skewed`` blends as if the decision held from the input on, and the
    candidate blends of the layers before the score layer, ranked (``pre_ranked``)."""
    # 1. the multiple blend and the instance mode: every layer on the candidate, mixed batches
    mixed = {}
    for mode in modes:
        for w in grid:
            _configure(layers, pre, w, (w, w, w), mode)
            mixed[mode, w] = _accuracy(work, val["mixed"])
    mode, multiple = max(mixed, key=lambda mw: (mixed[mw].mean(), -modes.index(mw[0]), -grid.index(mw[1])))

    # 2a. the single and skewed blends as if the decision held from the input on
    first = _later_on(work, layers, pre, val, grid, mode, None)
    single, skewed = _best_blend(grid, first, "single"), _best_blend(grid, first, "sorted")
    pre_table: dict = {}
    ranked: list = [None]
    if pre > 0:
        # 2b. the layers before the score layer run before the decision exists: one blend for
        #     every batch, ranked by the mean over the three types with the later layers on the
        #     blend of each type's right decision (the best PRE_CANDIDATES go on to steps 2c-4e)
        right = {"single": single, "mixed": multiple, "sorted": skewed}
        for w in grid:
            pre_table[w] = {}
            for k in KINDS:
                _configure(layers, pre, w, (right[k],) * 3, mode)
                pre_table[w][k] = 100.0 * float(_accuracy(work, val[k]).mean())
        ranked = sorted(grid, key=lambda w: (-_mean(pre_table[w]), grid.index(w)))
    return {"mode": mode, "multiple": multiple, "single": single, "skewed": skewed, "first": first,
            "modes": {m: 100.0 * max(float(mixed[m, w].mean()) for w in grid) for m in modes},
            "mixed": {w: 100.0 * float(mixed[mode, w].mean()) for w in grid},
            "pre_table": pre_table, "pre_ranked": ranked}


def _best_blend(grid, table: dict, kind: str):
    """The candidate of ``grid`` with the best mean accuracy on ``kind`` in ``table``
    (candidate -> kind -> per-batch accuracies); ties: the earlier candidate."""
    return max(grid, key=lambda w: (table[w][kind].mean(), -grid.index(w)))


def _later_on(work: nn.Module, layers: list[FusedDABN], pre: int, val, grid, mode: str, pre_blend) -> dict:
    """Single / sorted accuracy per batch with the layers from the score layer on each
    candidate of ``grid`` and those before it on ``pre_blend`` (None: on the candidate too)."""
    out = {}
    for w in grid:
        _configure(layers, pre, pre_blend or w, (w, w, w), mode)
        out[w] = {k: _accuracy(work, val[k]) for k in ("single", "sorted")}
    return out


def _blends_behind(work: nn.Module, layers: list[FusedDABN], pre: int, val, grid, found: dict,
                   pre_blend) -> dict:
    """Step 2c: the ``single`` and ``skewed`` blends again with the layers before the score
    layer on ``pre_blend`` (None: no such layer, step 2a's choice stands); the blends of
    steps 1-2 for one pre blend, as steps 3-4 take them."""
    after = found["first"] if pre_blend is None else _later_on(work, layers, pre, val, grid, found["mode"],
                                                               pre_blend)
    return {"mode": found["mode"], "multiple": found["multiple"], "pre": pre_blend, "after": after,
            "single": _best_blend(grid, after, "single"), "skewed": _best_blend(grid, after, "sorted"),
            "blend_table": {w: {"single": 100.0 * float(after[w]["single"].mean()),
                                "mixed": found["mixed"][w],
                                "sorted": 100.0 * float(after[w]["sorted"].mean())} for w in grid}}


def _search_cuts(work: nn.Module, layers: list[FusedDABN], pre: int, val, fit, fams, num_classes: int,
                 found: dict) -> dict:
    """Step 3 of the module doc: the cuts of both rules, on the accuracy every validation batch
    gets under each decision (the layers before the score layer on their blend)."""
    kinds = np.array([k for k in KINDS for _ in val[k]])
    everything = [b for k in KINDS for b in val[k]]
    acc = {}
    for d, w in (("single", found["single"]), ("multiple", found["multiple"]), ("skewed", found["skewed"])):
        # step 2 ran the single / sorted batches through this configuration already
        known = found["after"][w] if d != "multiple" else {}
        _configure(layers, pre, found["pre"] or w, (w, w, w), found["mode"])
        acc[d] = np.concatenate([known[k] if k in known else _accuracy(work, val[k]) for k in KINDS])
    blends = (found["single"], found["multiple"], found["skewed"])
    _configure(layers, pre, found["pre"], blends, found["mode"])
    scores, feats, shifts = _scores(work, [x for x, _ in everything])
    # 3b. a class probe at the score layer, fitted on other i.i.d. validation batches, and the
    #     cuts of the rule that reads its prediction spread, each batch's spread taken from
    #     probes fitted without its corruption family (as a test corruption is unseen)
    fit_x = [x for k in ("single", "mixed") for x, _ in fit[k]]
    fit_y = torch.cat([y for k in ("single", "mixed") for _, y in fit[k]])
    fit_feats = torch.cat(_scores(work, fit_x, shift=False)[1])
    probe = ClassProbe.fit(fit_feats, fit_y, num_classes)
    val_fam, fit_fam = fams
    fit_fams = torch.cat([f for k in ("single", "mixed") for f in fit_fam[k]])
    held_out = _held_out_probes(fit_feats, fit_y, fit_fams, num_classes)
    spread = _held_out_spreads(held_out, feats, [f for k in KINDS for f in val_fam[k]], num_classes)
    low, high, _ = _best_band(scores, acc, kinds)
    low0, high0, _ = _best_band(scores, acc, kinds, allow_low=False)
    high_b, skew_cut, _ = _best_skew_rule(scores, spread, acc, kinds)
    table = np.stack([acc[d] for d in DECISIONS])

    def rule(said):
        got = np.choose(said, table)
        return {k: 100.0 * float(got[kinds == k].mean()) for k in KINDS} | \
               {f"said {name}": 100.0 * float((said == i).mean()) for i, name in enumerate(DECISIONS)}
    truth = np.array([DECISIONS.index(_TRUE[k]) for k in kinds])
    said_b = np.where(scores < high_b, np.where(spread < skew_cut, 0, 1), 2)
    return {"low": low, "high": high, "probe": probe, "held_out": held_out, "high_b": high_b,
            "skew_cut": skew_cut,
            "shifts": shifts,
            "decision_table": {"score band": rule(_decide(scores, low, high)),
                               "score, no low cut": rule(_decide(scores, low0, high0)),
                               "score + spread": rule(said_b),
                               "oracle (true type)": rule(truth)}}


def _validated_range(*shifts: np.ndarray) -> tuple[float, float] | None:
    """``(lo, hi)``: the most negative and most positive finite signed shift (0 always inside);
    None when there is none."""
    finite = np.concatenate(shifts)
    finite = finite[np.isfinite(finite)]
    return (min(0.0, float(finite.min())), max(0.0, float(finite.max()))) if len(finite) else None


def calibrate(model: nn.Module, domains: Mapping[str, tuple[Tensor, Tensor]], batch_size: int = 64, *,
              n_batches: int | None = None, lr: float | Sequence[float] = 1e-3, backend: str = "auto",
              seed: int = 0,
              grid=BLEND_GRID, mixing=None, daft_objective: str = "mean",
              held_out_streams: bool = True) -> DATTA:
    """DATTA for ``model`` calibrated on labelled validation ``domains`` (see the module doc).

    Args:
        model: a CNN with BatchNorm2d (converted in place to cluster-capable FusedDABN) or
            FusedDABN layers, in eval mode; its source statistics are the running buffers.
        domains: ``{name: (images (N, C, H, W) float, labels (N,) int)}``, data the user may
            tune on (never the data they report on); each with at least ``batch_size`` images.
        batch_size: the batch size the adapter will see (the choices depend on it).
        n_batches: validation batches of each type (single, mixed, label-sorted) for steps
            1-3; None: :func:`default_batches` (about 3,000 images of each type).  Steps 4-5
            run streams over every validation image (their cost grows with the data).
        lr: the DAFT learning rate, or several to choose from on the validation streams
            (several: a best rate at an end of them is followed past it, step 5).
        backend: kernel backend.  seed: the batches' and streams' draw.
        grid: candidate blends ``(w_s, w_b, w_cluster)``.
        mixing: which validation domains a mixed batch pools (:func:`mixing_groups`): None
            (every domain), ``"severity"`` (the domains ``<corruption>@<s>`` of one severity, as
            benchmark streams mix the corruptions of one severity) or explicit groups of names.
        daft_objective: step 5's ranking of the DAFT settings (:data:`DAFT_OBJECTIVES`):
            ``"mean"`` (default), the mean accuracy over the validation streams, or
            ``"margin"``, the smallest margin over them against the best of the plain
            alternatives (:data:`RIVALS`, Tent at the middle rate of ``lr``) on each, then the
            mean (it runs the alternatives on the streams too; SPEC §6 step 5).
        held_out_streams: on the validation streams of steps 4-5, decide each batch with the
            class probe fitted without its corruption family (as at test time, where every
            corruption is unseen; the default), or with the deployed probe, fitted on every
            family (False: how ``calibrate`` ran before 2026-12-08).  The returned adapter
            always carries the deployed probe.

    Returns a :class:`DATTA` with ``score_mode="dispersion"``, a band
    :class:`ThresholdSelector` and the chosen blends and DAFT setting;
    ``adapter.calibration`` is the :class:`Calibration` report (``print`` it).
    """
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    _check_domains(domains, batch_size)
    lrs = sorted({float(r) for r in (lr if isinstance(lr, Sequence) else (lr,))})
    if not lrs or not all(math.isfinite(r) and r > 0 for r in lrs):
        raise ValueError(f"lr must be a positive number or a non-empty sequence of them, got {lr!r}")
    if daft_objective not in DAFT_OBJECTIVES:
        raise ValueError(f"daft_objective must be one of {DAFT_OBJECTIVES}, got {daft_objective!r}")
    if not isinstance(held_out_streams, bool):
        raise TypeError(f"held_out_streams must be True or False, got {held_out_streams!r}")
    n_batches = default_batches(batch_size) if n_batches is None else int(n_batches)
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2, got {n_batches}")
    groups = mixing_groups(list(domains), mixing)
    g = torch.Generator().manual_seed(seed)
    val_fam: dict = {}
    val = _batches(domains, batch_size, n_batches, g, val_fam, groups)
    work = copy.deepcopy(model).eval()
    if any(_is_plain_bn(m) for m in work.modules()):
        work = convert_model(work, "datta", shrink_k=None, cluster=True, backend=backend)
    layers = dabn_layers(work)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to calibrate")
    for layer in layers:
        layer.backend = backend
    pre = first_nonlinear_layer(work, val["single"][0][0])
    names = {m: n for n, m in work.named_modules()}
    fit_fam: dict = {}
    fit = _batches(domains, batch_size, n_batches, g, fit_fam, groups)    # other i.i.d. batches: the probe's
    num_classes = max(2, int(torch.cat([y for _, y in domains.values()]).max()) + 1)
    grid = tuple(grid)
    found = _search_blends(work, layers, pre, val, grid, tuple(INSTANCE_MODES))
    xs, ys, streams = _streams(domains, batch_size, seed, groups=groups)
    family = dict(zip(domains, _families(list(domains))))
    # each stream: images, labels, batches and each batch's family (its held-out probe's)
    four = {name: (xs, ys, batches, _batch_families(domains, family, batches))
            for name, batches in streams.items()}
    stream_batches = [xs[idx] for batches in streams.values() for idx in batches]

    def adapter_for(c: dict, rule, daft: bool, rate: float = lrs[0], on_multiple: bool = False,
                    stream: float | None = None, reset: float | None = None,
                    filt: float | None = None, blend=STREAM_BLEND, pre_single=None,
                    release: float | None = None) -> DATTA:
        _configure(layers, pre, c["pre"], (c["single"], c["multiple"], c["skewed"]), c["mode"], stream,
                   reset, blend, pre_single)
        return DATTA(copy.deepcopy(work), preset=None, daft=daft, lr=rate, daft_multiple=on_multiple,
                     entropy_filter=filt, daft_pre_single=pre_single is not None,
                     output_spread_cut=release,
                     selector=ThresholdSelector(*rule, c["shift_cut"]), class_probe=c["probe"],
                     score_mode="dispersion", backend=None)

    def probes_for(c: dict, fams: list[int]) -> list[ClassProbe] | None:
        """With ``held_out_streams``, each stream batch's probe: the one fitted without its
        family (as at test time, where every corruption is unseen); else None (the deployed
        probe; a family without fitting samples was never seen by it, so its probe is that one)."""
        return [c["held_out"].get(f, c["probe"]) for f in fams] if held_out_streams else None

    def run(c: dict, *args, on=None, **kw) -> dict[str, float]:
        return {name: _stream_accuracy(adapter_for(c, *args, **kw), x, y, batches, probes_for(c, fams))
                for name, (x, y, batches, fams) in (on or four).items()}

    def behind(pre_blend) -> dict:
        """Steps 2c-4e with the layers before the score layer on ``pre_blend``."""
        c = _blends_behind(work, layers, pre, val, grid, found, pre_blend)
        c |= _search_cuts(work, layers, pre, val, fit, (val_fam, fit_fam), num_classes, c)
        _configure(layers, pre, c["pre"], (c["single"], c["multiple"], c["skewed"]), c["mode"])
        # 4. the decision rule, on the deployment's streams over every validation image, without
        #    DAFT: the score band of step 3, or the score cut with the skew cut on the probe's
        #    prediction spread (step 3b); the shift range covers every validation batch calibrate
        #    sees, step 3's and the streams' (the score layer's input, hence the shift, does not
        #    depend on the decision)
        shift_cut = _validated_range(c["shifts"], _scores(work, stream_batches, feats=False)[2])
        c["shift_cut"] = shift_cut
        cut = c["skew_cut"]
        rules = [(c["high"], c["low"], None),
                 (c["high_b"], -math.inf, None if cut == -math.inf else min(cut, 1.0))]
        c["rule_table"] = {rule_name(*r, shift_cut): run(c, r, False) for r in rules}
        means = [_mean(c["rule_table"][rule_name(*r, shift_cut)]) for r in rules]
        c["rule"] = rule = rules[int(np.argmax(means))]      # ties: the first

        # 4b. skewed batches on the source statistics (the blend of step 2) or on the stream
        #     statistics (SPEC §3c): momentum STREAM_START, then halved or doubled while the mean rises
        stream_runs = {None: c["rule_table"][rule_name(*rule, shift_cut)]}
        says_skewed = rule[1] != -math.inf or rule[2] is not None     # steps 4b-4e need skewed batches
        if says_skewed:
            stream_runs[STREAM_START] = run(c, rule, False, stream=STREAM_START)
            _climb(stream_runs, STREAM_START, (0.5, 2.0), lambda m: run(c, rule, False, stream=m),
                   STREAM_LIMITS)
        order = [None] + sorted(r for r in stream_runs if r is not None)
        stream = max(order, key=lambda r: (_mean(stream_runs[r]), r is None, -(r or 0.0)))
        stream_table = {("source" if r is None else f"stream, momentum {r:g}"): stream_runs[r] for r in order}

        # 4c. with the stream statistics: a reset cut on a batch's divergence from them (a batch
        #     of a new domain restarts them), RESET_START, then halved or doubled while the mean rises
        reset = None
        if stream is not None:
            reset_runs = {None: stream_runs[stream],
                          RESET_START: run(c, rule, False, stream=stream, reset=RESET_START)}
            _climb(reset_runs, RESET_START, (0.5, 2.0), lambda r: run(c, rule, False, stream=stream, reset=r),
                   RESET_LIMITS)
            cuts = [None] + sorted((r for r in reset_runs if r is not None), reverse=True)
            reset = max(cuts, key=lambda r: (_mean(reset_runs[r]), r is None, r or 0.0))
            stream_table |= {f"stream, momentum {stream:g}, reset {r:g}": reset_runs[r] for r in cuts[1:]}
            stream_runs[stream] = reset_runs[reset]

        # 4d. with the stream statistics: their blend with the batch statistics on skewed
        #     batches, (1 - b, b, 0), b from 0 up by STREAM_BATCH_STEP while the mean rises (ties:
        #     the smaller b)
        stream_blend = STREAM_BLEND
        if stream is not None:
            blend_runs = {0.0: stream_runs[stream]}
            _climb(blend_runs, 0.0, (lambda w: round(w + STREAM_BATCH_STEP, 6),),
                   lambda w: run(c, rule, False, stream=stream, reset=reset, blend=_stream_blend(w)),
                   (0.0, 1.0))
            b = max(blend_runs, key=lambda w: (_mean(blend_runs[w]), -w))
            stream_blend = _stream_blend(b)
            where = f"stream, momentum {stream:g}" + ("" if reset is None else f", reset {reset:g}")
            stream_table |= {f"{where}, blend {_fmt(_stream_blend(w))}": v
                             for w, v in blend_runs.items() if w > 0}
            stream_runs[stream] = blend_runs[b]
        statistics = dict(stream=stream, reset=reset, blend=stream_blend)

        # 4e. the output check: a batch decided skewed whose output prediction spread is above a
        #     cut is forwarded again as single; RELEASE_START, then lowered or raised by
        #     RELEASE_STEP while the mean rises; kept only if it beats no check (ties: no check,
        #     then the higher cut, which releases fewer batches)
        release_runs = {None: stream_runs[stream]}
        if says_skewed:
            release_runs[RELEASE_START] = run(c, rule, False, **statistics, release=RELEASE_START)
            _climb(release_runs, RELEASE_START,
                   (lambda r: round(r - RELEASE_STEP, 6), lambda r: round(r + RELEASE_STEP, 6)),
                   lambda r: run(c, rule, False, **statistics, release=r), (0.0, 1.0))
        cuts = [None] + sorted((r for r in release_runs if r is not None), reverse=True)
        release = max(cuts, key=lambda r: (_mean(release_runs[r]), r is None, r or 0.0))
        c |= {"statistics": statistics | {"release": release}, "stream_table": stream_table,
              "release_table": {("none" if r is None else f"cut {r:g}"): release_runs[r] for r in cuts},
              "final": release_runs[release]}
        return c

    # 2b-4e. each of step 2b's best PRE_CANDIDATES pre blends through steps 2c-4e; the one with
    #        the best mean over the four validation streams without DAFT is kept (ties: step 2b's
    #        order): step 2b ranks them on a few thousand images a type, the streams on every
    #        validation image, with the cuts each pre blend needs
    candidates = found["pre_ranked"][:PRE_CANDIDATES]
    tried = {w: behind(w) for w in candidates}
    pre_streams = {w: tried[w]["final"] for w in candidates} if candidates != [None] else {}
    c = tried[max(candidates, key=lambda w: (_mean(tried[w]["final"]), -candidates.index(w)))]
    mode, single, multiple, skewed = c["mode"], c["single"], c["multiple"], c["skewed"]
    rule, shift_cut, statistics = c["rule"], c["shift_cut"], c["statistics"]
    high, low, skew_cut = rule
    probe = c["probe"]

    # 5. DAFT off or on, on the four streams and the hard stream (a single-domain stream over
    #    the validation domains the configuration without DAFT does worst on: a long run of
    #    hard batches, where drifting updates lose most), with the chosen rule and statistics
    hard = _hard_domains(lambda: adapter_for(c, rule, False, **statistics), domains, batch_size, seed,
                         (lambda k: probes_for(c, [family[k]])[0]) if held_out_streams else None)
    five = dict(four)
    if hard:
        hx, hy, hs = _streams({k: domains[k] for k in hard}, batch_size, seed, ("single",))
        five["hard"] = (hx, hy, hs["single"], _batch_families({k: domains[k] for k in hard}, family,
                                                              hs["single"]))
    daft_table = {"off": c["final"] | (run(c, rule, False, **statistics, on={"hard": five["hard"]})
                                       if hard else {})}
    # the plain alternatives on the same streams (the margin objective's yardstick); Tent at
    # the middle candidate rate (the lower of two middles)
    rival_table = {}
    if daft_objective == "margin":
        rival_table = {name: {k: _stream_accuracy(make(), x, y, b) for k, (x, y, b, _) in five.items()}
                       for name, make in _rivals(model, lrs[(len(lrs) - 1) // 2], backend).items()}
    score = _daft_score(_best_rival(rival_table))

    def daft_run(rate: float, filt: float | None = None, on_multiple: bool = False,
                 pre_single=None) -> dict[str, float]:
        return run(c, rule, True, rate, on_multiple, filt=filt, pre_single=pre_single, **statistics, on=five)

    on = {r: daft_run(r) for r in lrs}
    # a best rate at either end of several candidates is no maximum: go on past that end
    # (x2 or /2) while the mean rises, at most RATE_STEPS times
    for _ in range(RATE_STEPS if len(lrs) > 1 else 0):
        top, nxt = _past_the_end(on, daft_table["off"], score)
        if nxt is None:
            break
        on[nxt] = daft_run(nxt)
        if score(on[nxt]) <= score(on[top]):
            break
    lrs = sorted(on)
    daft_table |= {f"on, lr {r:g}": on[r] for r in lrs}
    # the reliable-sample filter (SPEC §4) at the best plain rate, then doubled while the mean
    # rises (at most RATE_STEPS times): the filter drops samples from the loss, so its best
    # rate may lie higher
    top = max(lrs, key=lambda r: (score(on[r]), -r))
    filtered = {top: daft_run(top, FILTER_BOUND)}
    _climb(filtered, top, (2.0,), lambda r: daft_run(r, FILTER_BOUND), steps=RATE_STEPS, score=score)
    daft_table |= {f"on, lr {r:g}, filter {FILTER_BOUND:g}": v for r, v in sorted(filtered.items())}
    # ties: off, then no filter, then the smaller rate
    candidates = [(False, lrs[0], None)] + [(True, r, None) for r in lrs] \
        + [(True, r, FILTER_BOUND) for r in sorted(filtered)]
    scores = [score(v) for v in daft_table.values()]
    ranked = sorted(range(len(candidates)), key=lambda i: (tuple(-v for v in scores[i]),
                                                           candidates[i][2] is not None,
                                                           candidates[i][0], candidates[i][1]))
    pick = ranked[0]
    daft, rate, entropy_filter = candidates[pick]
    # 5b. with DAFT on, its second forward of a single batch with the layers before the score
    #     layer on the single blend (the decision is known by then; ties: the pre blend)
    pre_single, best, name = None, scores[pick], list(daft_table)[pick]
    if daft and c["pre"] is not None and single != c["pre"]:
        key = f"{name}, pre single {_fmt(single)}"
        daft_table[key] = daft_run(rate, entropy_filter, pre_single=single)
        if score(daft_table[key]) > best:
            pre_single, best, name = single, score(daft_table[key]), key
    # then, with DAFT on, the chosen setting on multiple batches too (ties: single batches only)
    daft_multiple = False
    if daft:
        key = f"{name}, +multiple"
        daft_table[key] = daft_run(rate, entropy_filter, on_multiple=True, pre_single=pre_single)
        daft_multiple = score(daft_table[key]) > best

    report = Calibration(
        batch_size=int(batch_size), domains=list(domains), batches={k: len(v) for k, v in val.items()},
        score_layer=names[layers[pre]], instance_mode=mode, single_blend=single,
        multiple_blend=multiple, skewed_blend=skewed, pre_blend=c["pre"], pre_single_blend=pre_single,
        threshold=high, low=low,
        skew_cut=skew_cut, daft=daft, lr=rate, daft_multiple=daft_multiple, shift_cut=shift_cut,
        entropy_filter=entropy_filter, hard_domains=hard,
        blend_table=c["blend_table"],
        pre_table=found["pre_table"], pre_streams=pre_streams,
        decision_table=c["decision_table"], rule_table=c["rule_table"], daft_table=daft_table,
        streams={k: len(v) for k, v in streams.items()},
        modes=found["modes"], probe=probe, stream_momentum=statistics["stream"],
        stream_reset=statistics["reset"], stream_blend=statistics["blend"], stream_table=c["stream_table"],
        output_spread_cut=statistics["release"], release_table=c["release_table"],
        mixing=groups, daft_objective=daft_objective, rival_table=rival_table,
        held_out_streams=held_out_streams)
    return report.adapter(model, backend=backend)
