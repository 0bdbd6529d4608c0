"""Test-time adapters: ``DATTA`` (SPEC §4) and the baselines ``Source``, ``TBN``, ``BNAdapt``,
``Tent``, all with one interface::

    adapter = DATTA(model)                 # converts BatchNorm2d -> FusedDABN in place
    for x in stream:                       # x: (N, C, H, W)
        logits = adapter(x)                # predict (then update), (N, K), no graph attached
        adapter.last_decision, adapter.last_score
    adapter.reset()                        # back to the wrap-time state
    state = adapter.state_dict()           # model + selector history + optimizer state

An adapter is an ``nn.Module`` owning ``model``; its ``state_dict`` holds the model's entries
under ``model.`` and the selector / optimizer state under ``_extra_state`` (plain Python and
tensors: ``torch.save`` and ``weights_only`` loading work).  As with any ``state_dict``, its
tensors share storage with the live ones: ``copy.deepcopy`` or ``torch.save`` it to keep it.
Adapters are not thread-safe: one adapter serves one stream, one batch at a time (a call from
a second thread while a batch is in flight raises ``RuntimeError``).

``DATTA.released(model)`` is the authors' released code as one configuration (preset
``datta_icme``, ``KDESelector(window=None)``, ``daft=False``).
"""
from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import backends
from .diversity import (
    _HAS_SCORE_OPS,
    MULTIPLE,
    SINGLE,
    SKEWED,
    ClassProbe,
    KDESelector,
    Selector,
    ThresholdSelector,
    make_selector,
    prediction_spread,
)
from .functional import SCORE_MODES, _check_blend_values
from .nn import FusedDABN, dabn_layers, first_nonlinear_layer, set_decisions
from .ops import _is_plain_eager_call, as_kernel_layout
from .presets import _PRESET_DEFAULT, DISPERSION_PARTS, PRESETS
from .surgery import _is_plain_bn, convert_model

__all__ = ["Adapter", "DATTA", "DYN", "Source", "TBN", "BNAdapt", "Tent", "softmax_entropy"]

#: guards the check-and-set of ``Adapter._busy_thread`` (a module lock: adapters stay picklable)
_BUSY_LOCK = threading.Lock()

OptimizerArg = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``-sum_k p_k log p_k`` of ``softmax(logits)``: (N, K) -> (N,) float32."""
    logits = logits.float()
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def _overrides(shrink_k=_PRESET_DEFAULT, weights=None, cluster=_PRESET_DEFAULT) -> dict:
    """The preset overrides a caller gave, as keyword arguments of ``convert_model`` /
    ``FusedDABN.set_preset`` (the preset's own value where none was given)."""
    kw = {} if weights is None else {"weights": weights}
    if shrink_k is not _PRESET_DEFAULT:
        kw["shrink_k"] = shrink_k
    if cluster is not _PRESET_DEFAULT:
        kw["cluster"] = cluster
    return kw


def _prepare_model(model: nn.Module, preset: str | None, backend: str | None,
                   shrink_k, weights, cluster=_PRESET_DEFAULT) -> tuple[nn.Module, list[FusedDABN]]:
    """Convert any plain BatchNorm2d and apply preset/backend to every FusedDABN layer
    (``None`` keeps each layer's own setting)."""
    if backend is not None and backend != "auto":
        backends.get(backend)                     # an unknown name fails at construction
    kw = _overrides(shrink_k, weights, cluster)
    if any(_is_plain_bn(m) for m in model.modules()):
        model = convert_model(model, preset or "datta", backend=backend or "auto", **kw)
    layers = dabn_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.BatchNorm2d (or FusedDABN) layer: "
                         "DATTA and the BN baselines adapt BatchNorm2d layers only")
    for layer in layers:
        if preset is not None:
            layer.set_preset(preset, **kw)
        if backend is not None:
            layer.backend = backend
    return model, layers


class Adapter(nn.Module):
    """Common machinery: a model of FusedDABN layers with a fixed preset, an optional entropy
    step on the layers' ``gamma, beta`` (``update``: ``"never"``, ``"single"`` (DAFT),
    ``"always"`` (Tent)), episodic resets and ``state_dict`` round trips.

    The optimizer defaults to SGD(lr, momentum 0.9, Nesterov, no weight decay) over the
    ``gamma, beta`` of every layer; ``optimizer`` may be an optimizer over those parameters or
    a factory ``params -> optimizer``.  Updating adapters set ``requires_grad`` of every other
    parameter of the model to False.

    Not thread-safe: a batch writes the decision into every layer, the score history and the
    parameters, so one adapter serves one stream, one batch at a time.  Calling it from a
    second thread while a batch is in flight raises ``RuntimeError``; use one adapter (on its
    own copy of the model) per thread, or serialise the calls.
    """

    def __init__(self, model: nn.Module, preset: str | None, *, update: str = "never",
                 lr: float = 1e-4, optimizer: OptimizerArg = None, episodic: bool = False,
                 backend: str | None = "auto", shrink_k=_PRESET_DEFAULT, weights=None,
                 selector: Selector | None = None, cluster=_PRESET_DEFAULT,
                 entropy_filter: float | None = None):
        super().__init__()
        if update not in ("never", "single", "always"):
            raise ValueError(f"update must be 'never', 'single' or 'always', got {update!r}")
        if entropy_filter is not None:
            if isinstance(entropy_filter, bool) or not isinstance(entropy_filter, (int, float)) \
                    or not (math.isfinite(entropy_filter) and entropy_filter > 0):
                raise ValueError("entropy_filter must be a positive number (the entropy bound in "
                                 f"units of ln K) or None, got {entropy_filter!r}")
            if update == "never":
                raise ValueError("entropy_filter selects the samples of the entropy step: it needs "
                                 "an updating adapter (daft=True / Tent)")
        #: EATA's reliable-sample bound in units of ``ln K`` (None: every sample enters the loss)
        self.entropy_filter = None if entropy_filter is None else float(entropy_filter)
        model, layers = _prepare_model(model, preset, backend, shrink_k, weights, cluster)
        self.model = model
        self._layers = layers
        self.update_rule, self.episodic, self.selector = update, bool(episodic), selector
        self.optimizer = self._make_optimizer(lr, optimizer) if update != "never" else None
        self.n_batches = 0
        self.n_updates = 0
        self._last_score: Tensor | None = None
        self._last_decision: str | None = None
        self._last_decision_t: Tensor | None = None
        self._last_skewed_t: Tensor | None = None
        self._initial = self._snapshot()

    # ------------------------------------------------------------------ setup
    def _make_optimizer(self, lr: float, optimizer: OptimizerArg) -> torch.optim.Optimizer:
        params = [p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None]
        if not params:
            raise ValueError("entropy updates need affine BatchNorm layers (gamma, beta), but "
                             "every layer has affine=False; use daft=False / a non-updating "
                             "baseline")
        self.model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        if optimizer is None:
            if not lr > 0:
                raise ValueError(f"lr must be > 0, got {lr}")
            return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        if callable(optimizer):
            return optimizer(params)
        raise TypeError(f"optimizer must be an Optimizer, a factory or None, got {optimizer!r}")

    def _snapshot(self) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
                "selector": copy.deepcopy(self.selector.state_dict()) if self.selector else None}

    @property
    def layers(self) -> list[FusedDABN]:
        """The FusedDABN layers of the model, in ``modules()`` order."""
        return self._layers

    # ------------------------------------------------------------------ per batch
    def forward(self, x: Tensor) -> Tensor:
        """One test batch ``(N, C, H, W)`` -> logits ``(N, K)`` computed before any update."""
        me = threading.get_ident()
        with _BUSY_LOCK:
            owner = self.__dict__.get("_busy_thread")
            if owner is not None and owner != me:
                raise RuntimeError(f"{type(self).__name__} is not thread-safe: a batch is already "
                                   "in flight on another thread; use one adapter per thread "
                                   "(each on its own copy of the model) or serialise the calls")
            self.__dict__["_busy_thread"] = me
        try:
            if self.episodic:
                self.reset()
            self.n_batches += 1
            return self._step(x)
        finally:
            if owner is None:
                self.__dict__["_busy_thread"] = None

    def _step(self, x: Tensor) -> Tensor:
        if self.update_rule == "never":
            with torch.no_grad():
                return self.model(x)
        with torch.enable_grad():
            logits = self.model(x)
            self._entropy_step(logits)
        return logits.detach()

    def _entropy_terms(self, logits: Tensor) -> Tensor:
        """The per-sample terms of the entropy loss (N,): each sample's softmax entropy, or with
        ``entropy_filter`` that entropy where it is below ``entropy_filter * ln K`` and 0 elsewhere
        (EATA's reliable-sample filter, SPEC §4); a mask product, no host sync."""
        ent = softmax_entropy(logits)
        if self.entropy_filter is None:
            return ent
        bound = self.entropy_filter * math.log(logits.shape[1])
        return ent * (ent.detach() < bound).to(ent.dtype)

    def _entropy_step(self, logits: Tensor) -> None:
        """One optimizer step on the entropy loss of ``logits`` (N, K): the mean of
        :meth:`_entropy_terms` over the batch (filtered samples count in the batch size)."""
        self._optimizer_step(self._entropy_terms(logits).mean())

    def _optimizer_step(self, loss: Tensor) -> None:
        """One optimizer step on the scalar ``loss`` (counted in ``n_updates``)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.n_updates += 1

    @property
    def last_score(self) -> float | None:
        """Diversity score of the latest batch (a host sync if it was decided on device)."""
        return None if self._last_score is None else float(self._last_score)

    @property
    def last_decision(self) -> str | None:
        """``"single"`` / ``"multiple"`` (/ ``"skewed"``, from a selector with a low cut) for the
        latest batch (None for score-free baselines)."""
        if self._last_decision is None and self._last_decision_t is not None:
            if bool(self._last_decision_t):
                return SINGLE
            skewed = self._last_skewed_t
            return SKEWED if skewed is not None and bool(skewed) else MULTIPLE
        return self._last_decision

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Restore the model, optimizer and selector to their state at wrap time."""
        self.model.load_state_dict(self._initial["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._initial["optimizer"]))
        if self.selector is not None:
            self.selector.load_state_dict(self._initial["selector"])
        self._last_score = self._last_decision = self._last_decision_t = self._last_skewed_t = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"selector": self.selector.state_dict() if self.selector else None,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "n_batches": self.n_batches, "n_updates": self.n_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if (state["selector"] is None) != (self.selector is None):
            raise ValueError("adapter state_dict and adapter disagree on having a selector")
        if self.selector is not None:
            self.selector.load_state_dict(state["selector"])
        if (state["optimizer"] is None) != (self.optimizer is None):
            raise ValueError("adapter state_dict and adapter disagree on having an optimizer")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.n_batches, self.n_updates = int(state["n_batches"]), int(state["n_updates"])

    def extra_repr(self) -> str:
        return f"update={self.update_rule!r}, episodic={self.episodic}, layers={len(self._layers)}"


def _stream_args(layer: FusedDABN) -> tuple:
    """``datta::_dabn_decide_forward``'s stream arguments for ``layer`` (SPEC §3c)."""
    rate = getattr(layer, "stream_momentum", None)      # absent in layers pickled before it
    if rate is None:
        return None, None, None, None
    return layer.stream_mean, layer.stream_var, rate, getattr(layer, "stream_reset", None)


class _FineTune(Exception):
    """Raised by :meth:`DATTA._on_score` to stop a forward that will be run again with a graph."""


class DATTA(Adapter):
    """Diversity-Adaptive Test-Time Adaptation (SPEC §4).

    Per batch ``x`` (N, C, H, W): the score layer computes the diversity score of its own
    input during the forward (from the instance statistics it also normalises with), the
    selector turns it into a decision, and the decision is written into every layer before
    the score layer normalises.  The score layer is the first FusedDABN for the authors'
    ``"pixel"`` / ``"instance"`` scores; for ``"dispersion"`` it is the first FusedDABN whose
    input is not an affine function of the image (:func:`~datta_kernels.nn.first_nonlinear_layer`,
    found on the first batch; ``score_layer``, a module name, overrides either).  Layers that run
    before the score layer cannot know the current decision: they normalise with the preset's
    ``multiple`` blend (the safe side, as during the selector's warm-up; DATTA writes their
    decision buffers once, and again after :meth:`reset` or a loaded state, so it owns them:
    a decision written into them by hand between batches stays).  The logits are
    returned; then, if ``daft`` and the batch is ``single``, one entropy-minimisation step on
    the ``gamma, beta`` of every layer (with ``daft_multiple``, on ``multiple`` batches too).
    Batches not fine-tuned build no autograd graph and run no backward:
    the forward runs without a graph, and a ``single`` batch under DAFT stops at the score layer
    and is forwarded again recording one (the layers up to the score layer run twice for it;
    with ``daft_pre_single`` those before it on their ``single`` blend the second time).

    Args:
        model: a CNN with BatchNorm2d (converted in place) or FusedDABN layers.
        preset: DABN preset for every layer (``None``: keep the layers' configuration).
        selector: a ``Selector`` (default ``KDESelector()``) or a threshold number.
        daft: fine-tune on ``single`` batches.  lr / optimizer: see :class:`Adapter`.
        episodic: reset to the wrap-time state before every batch.
        score_mode: ``"pixel"`` (the authors' score, default), ``"instance"`` (its
            approximation) or ``"dispersion"`` (spread of source-standardised instance
            statistics; separates single-domain from mixed batches far better, SPEC §2).
        backend: kernel backend for every layer (``None``: keep the layers' own).
        shrink_k, weights, cluster: override the preset's (see :class:`FusedDABN`).
        daft_multiple: with ``daft``, also take the entropy step on ``multiple`` batches (on
            their blend; not DATTA's published design, which fine-tunes ``single`` batches only:
            an option ``datta_kernels.calibrate`` may choose on validation streams).
        entropy_filter: with ``daft``, only samples whose softmax entropy is below
            ``entropy_filter * ln K`` enter the entropy loss (EATA's reliable-sample filter,
            without EATA's reweighting; the loss stays a sum over the batch divided by its
            size, SPEC §4).  None (default): every sample, as the authors' DAFT.
        daft_pre_single: with ``daft``, the second forward of a batch decided ``single`` (the
            one that records the graph) runs the layers before the score layer on their
            ``single`` blend instead of ``multiple``: the decision is known by then, so they
            normalise as a single-domain batch should (an extension, not the authors' design:
            ``datta_kernels.calibrate`` may choose it on validation streams, SPEC §4).  It
            costs nothing (that forward runs anyway); False (default): ``multiple`` there too.
        class_probe: a :class:`~datta_kernels.diversity.ClassProbe` for the score layer,
            required when the selector reads a spread (``ThresholdSelector(skew_cut=...)``):
            the batch's prediction spread from the probe, on the score layer's instance
            statistics, is passed to the selector (``last_spread``).  A selector with a shift
            cut (``ThresholdSelector(shift_cut=...)``) also gets the batch's signed
            :func:`~datta_kernels.diversity.source_shift` at the score layer (``last_shift``).
        output_spread_cut: None (default), or the *output check* (SPEC §4; an extension, not
            the authors' design): a batch decided ``skewed`` whose own output's
            :func:`~datta_kernels.diversity.prediction_spread` (of the logits the forward just
            made) is above this cut is *released*: its fold into the stream statistics is
            undone and it is forwarded again as ``single`` (then, under DAFT, fine-tuned as
            every ``single`` batch), so it ends exactly as a batch decided ``single`` would
            (``last_decision`` says ``"single"``, ``last_released`` True).  A label-sorted
            batch's predictions are alike, an i.i.d. batch's differ; ``datta_kernels.calibrate``
            chooses the cut on validation streams (step 4e).  Costs one host sync on the
            ``skewed`` batches and a second forward on the released ones.

    Host syncs: one per batch (the selector needs the score as a float), except with a
    threshold selector, ``daft=False`` and no ``output_spread_cut``, which decides on the
    device with no sync; with ``output_spread_cut``, one more on a ``skewed`` batch.

    On CPU tensors, with a ``ThresholdSelector``, the dispersion score and a score layer on the
    ``cpu`` backend (``datta_kernels.calibrate``'s configuration), the score layer's no-graph
    forward is one C++ op (:meth:`_score_forward`, SPEC §6): the same values as the separate
    ops, without the Python between them.
    """

    def __init__(self, model: nn.Module, preset: str | None = "datta",
                 selector: Selector | float | None = None, daft: bool = True, lr: float = 1e-4,
                 optimizer: OptimizerArg = None, episodic: bool = False, score_mode: str = "pixel",
                 backend: str | None = "auto", *, shrink_k=_PRESET_DEFAULT, weights=None,
                 score_layer: str | None = None, cluster=_PRESET_DEFAULT,
                 class_probe: ClassProbe | None = None, daft_multiple: bool = False,
                 entropy_filter: float | None = None, daft_pre_single: bool = False,
                 output_spread_cut: float | None = None):
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        super().__init__(model, preset, update="single" if daft else "never", lr=lr,
                         optimizer=optimizer, episodic=episodic, backend=backend,
                         shrink_k=shrink_k, weights=weights, selector=make_selector(selector),
                         cluster=cluster, entropy_filter=entropy_filter)
        self._daft = bool(daft)
        if daft_multiple and not daft:
            raise ValueError("daft_multiple=True fine-tunes multiple batches too: it needs daft=True")
        self._daft_on = (SINGLE, MULTIPLE) if daft_multiple else (SINGLE,)
        if daft_pre_single and not daft:
            raise ValueError("daft_pre_single=True changes DAFT's second forward: it needs daft=True")
        self.daft_pre_single = bool(daft_pre_single)
        if output_spread_cut is not None and (isinstance(output_spread_cut, bool)
                                              or not isinstance(output_spread_cut, (int, float))
                                              or math.isnan(output_spread_cut)):
            raise ValueError(f"output_spread_cut must be a number (a cut on the output's prediction "
                             f"spread, in [0, 1]) or None, got {output_spread_cut!r}")
        #: the output check's cut (None: off): a ``skewed`` batch whose output spread is above it
        #: is forwarded again as ``single``
        self.output_spread_cut = None if output_spread_cut is None else float(output_spread_cut)
        #: whether the latest batch was decided ``skewed`` and released to ``single`` by the output check
        self.last_released = False
        #: (output check) the stream statistics of the layers from the score layer on before
        #: the current ``skewed`` batch folded into them, to undo the fold if it is released
        self._held_streams: list | None = None
        self.score_mode = score_mode
        if self.selector.uses_spread and class_probe is None:
            raise ValueError(f"{self.selector!r} reads the batch's prediction spread: pass "
                             "class_probe= (a ClassProbe fitted at the score layer, e.g. by "
                             "datta_kernels.calibrate)")
        if class_probe is not None and not isinstance(class_probe, ClassProbe):
            raise TypeError(f"class_probe must be a ClassProbe, got {type(class_probe).__name__}")
        self.class_probe = class_probe
        #: the latest batch's prediction spread (0-dim tensor; None without a probe)
        self.last_spread: Tensor | None = None
        #: the score layer index for which the layers before it were last set to "multiple"
        self._pre_ready: int | None = None
        #: the latest batch's source shift at the score layer (0-dim; None unless the selector reads it)
        self.last_shift: Tensor | None = None
        # an index, not a module attribute: the layer must not be registered twice; None =
        # found on the first batch (dispersion's default needs an input shape)
        self._score_at: int | None = None if score_mode == "dispersion" else 0
        if score_layer is not None:
            found = dict(self.model.named_modules()).get(score_layer)
            if not isinstance(found, FusedDABN):
                raise ValueError(f"score_layer {score_layer!r} is not a BatchNorm2d/FusedDABN "
                                 "layer of the model")
            self._score_at = next(i for i, lyr in enumerate(self._layers) if lyr is found)
        # decide on the device (no .item()) only when no host-side branch needs the decision
        self._sync_free = self.selector.sync_free and not self.daft and self.output_spread_cut is None

    @property
    def daft(self) -> bool:
        """Whether ``single`` batches take entropy steps; fixed at construction (the optimizer
        and the decision path are set up for it)."""
        return self._daft

    @daft.setter
    def daft(self, value) -> None:
        raise AttributeError("DATTA.daft is fixed at construction (it sets up the optimizer and "
                             "the decision path); build a new DATTA(..., daft=...)")

    @property
    def daft_multiple(self) -> bool:
        """Whether DAFT also steps on ``multiple`` batches (fixed at construction)."""
        return MULTIPLE in self._daft_on

    def _score_forward(self, layer: FusedDABN, x: Tensor) -> Tensor | None:
        """The score layer's whole forward as one C++ op (``datta::_dabn_decide_forward``:
        statistics, score, the threshold rule with the probe spread and source shift, the
        decision written into the layers, normalisation) where it applies: a plain
        ``ThresholdSelector``, the dispersion score, CPU tensors, an eager call that records no
        graph, a layer on the ``cpu`` backend without clusters.  The same values as the separate ops that
        :meth:`_on_score` follows; ~0.15 ms less Python a batch on a small CPU model.  None
        elsewhere (the layer then runs those separate ops)."""
        sel = self.selector
        if not (_HAS_SCORE_OPS and type(sel) is ThresholdSelector and self.score_mode == "dispersion"
                and x.device.type == "cpu" and not layer.cluster
                and backends.resolve(layer.backend, "cpu", x.dtype) == "cpu"
                and (self.class_probe is None or self.class_probe.weight.device.type == "cpu")
                and _is_plain_eager_call(x, layer.weight, layer.bias, layer.source_mean, layer.source_var)):
            return None
        layer._check_input_dim(x)
        for buf in (layer.blend_single, layer.blend_multiple, layer.blend_skewed):
            _check_blend_values(buf)
        later = self._layers[self._score_at:]
        probe = self.class_probe if sel.skew_cut is not None else None
        stream = _stream_args(layer)
        before = None
        if (self.daft or self.output_spread_cut is not None) and stream[0] is not None:
            # the op folds the batch into the stream statistics; a batch it sends to DAFT (or
            # that the output check releases) is forwarded again and folded then, so the fold
            # is undone below (or in _step)
            before = (stream[0].clone(), stream[1].clone())
        y, mean_i, var_i, score, per_sample, spread, shift, flags = torch.ops.datta._dabn_decide_forward(
            as_kernel_layout(x), layer.weight, layer.bias, layer.source_mean, layer.source_var,
            layer.blend_single, layer.blend_multiple, layer.blend_skewed, layer.shrink_k, layer.eps,
            DISPERSION_PARTS, "std", *sel._op_args(probe),
            [lyr._buffers["decision"] for lyr in later], [lyr._buffers["skewed"] for lyr in later],
            *stream)
        layer.__dict__.update(last_score=score, last_per_sample=per_sample, last_stats=(mean_i, var_i))
        self.__dict__.update(_last_score=score, last_spread=spread if probe is not None else None,
                             last_shift=shift if sel.shift_cut is not None else None)
        try:
            self._record(sel._from_flags(flags, self._sync_free), before)     # the op wrote the layers
        except _FineTune:
            if before is not None:
                with torch.no_grad():
                    stream[0].copy_(before[0])
                    stream[1].copy_(before[1])
            raise
        return y

    def _on_score(self, layer: FusedDABN, score: Tensor) -> None:
        """Runs inside the score layer's forward, after the score and before normalising."""
        # plain attributes (not parameters, buffers or submodules) are written past
        # nn.Module.__setattr__ here and in _step: ~1.3 us each, on every batch
        self.__dict__["_last_score"] = score
        if isinstance(self.selector, ThresholdSelector) and (self.selector.uses_spread
                                                             or self.selector.uses_shift):
            # the probe spread and source shift it reads, and its rule: one C++ op on CPU
            decision, spread, shift = self.selector.decide_stats(
                score, *layer.last_stats, layer.source_mean, layer.source_var, layer.eps,
                self.class_probe, on_device=self._sync_free)
            self.__dict__.update(last_spread=spread, last_shift=shift)
        else:
            decision = self.selector.decide_tensors(score) if self._sync_free else self.selector.update(score)
        if self._sync_free:
            single, skewed = decision
            set_decisions(self._layers[self._score_at:], single, False if skewed is None else skewed)
        else:
            set_decisions(self._layers[self._score_at:], decision)   # decided with one host sync
        self._record(decision)

    def _record(self, decision, folded: tuple[Tensor, Tensor] | None = None) -> None:
        """Keep the batch's decision (a string, or the device path's ``(single, skewed)``
        tensors) already written into the layers; a ``single`` batch under DAFT stops here.
        ``folded``: the score layer's stream statistics before the fused op folded this batch
        into them (None: not folded yet)."""
        if self._sync_free:
            single, skewed = decision
            self.__dict__.update(_last_decision=None, _last_decision_t=single, _last_skewed_t=skewed)
            return
        self.__dict__.update(_last_decision=decision, _last_decision_t=None)
        if decision == SKEWED and self.output_spread_cut is not None:
            # the output check may release this batch after the forward: keep what the later
            # layers' stream statistics hold before they fold it in (they have not run yet)
            later = self._layers[self._score_at:]
            held = [(lyr.stream_mean.clone(), lyr.stream_var.clone())
                    if getattr(lyr, "stream_momentum", None) is not None else None for lyr in later]
            if folded is not None:
                held[0] = folded
            self.__dict__["_held_streams"] = held
        if self.daft and decision in self._daft_on:
            # the forward so far recorded no graph (_step): start it again, recording one
            raise _FineTune

    @property
    def score_layer(self) -> str | None:
        """Module name of the score layer (None until the first batch picks the default)."""
        if self._score_at is None:
            return None
        target = self._layers[self._score_at]
        return next(name for name, m in self.model.named_modules() if m is target)

    def reset(self) -> None:
        super().reset()
        self._pre_ready = None          # the restored decision buffers are written again

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._pre_ready = None

    def _step(self, x: Tensor) -> Tensor:
        if self._score_at is None:
            self._score_at = first_nonlinear_layer(self.model, x)
        # layers before the score layer normalise before the decision exists: "multiple",
        # written once (the score callback writes each batch's decision into the others only)
        if self._pre_ready != self._score_at:
            set_decisions(self._layers[:self._score_at], False)
            self._pre_ready = self._score_at
        first = self._layers[self._score_at]
        # plain attributes, written past nn.Module.__setattr__ (~1.3 us each, a few % of the
        # adapter's own cost on a small CPU model): none is a parameter, buffer or submodule
        saved = {k: first.__dict__.get(k) for k in ("compute_score", "score_mode", "score_callback",
                                                     "score_forward")}
        first.__dict__.update(compute_score=True, score_mode=self.score_mode, score_callback=self._on_score,
                              score_forward=self._score_forward)
        self.__dict__.update(_last_score=None, _last_decision=None, _last_decision_t=None,
                             _last_skewed_t=None, last_released=False)
        try:
            # no graph until a batch is known to be fine-tuned: most batches are not, and
            # recording the layers before the decision cost them ~7 % of a step on a CPU
            with torch.no_grad():
                try:
                    logits = self.model(x)
                    fine_tune = False
                except _FineTune:           # a single batch under DAFT (raised by _on_score)
                    fine_tune = True
            if self._last_score is None:
                raise RuntimeError("the score layer was not called during the forward; "
                                   "pass score_layer= the first BatchNorm the input reaches")
            if self._held_streams is not None and self._release(logits):
                # released: forwarded again as "single", the decision kept (not asked twice)
                first.__dict__.update(score_callback=None, score_forward=None)
                fine_tune = self.daft           # DAFT steps on every single batch
                if not fine_tune:
                    with torch.no_grad():
                        logits = self.model(x)
            if fine_tune:
                # the same forward again, recording the graph: the layers before the score layer
                # on "multiple" as before (daft_pre_single: "single", below), the decision kept
                # (the selector is not asked twice)
                first.__dict__.update(score_callback=None, score_forward=None)
                pre = self._layers[:self._score_at] if (self.daft_pre_single
                                                        and self._last_decision == SINGLE) else []
                # (daft_pre_single) the layers before it on "single" for this forward only: what
                # they held (DATTA's "multiple", or a decision written into them by hand) comes back
                held = [(lyr._buffers["decision"].clone(), lyr._buffers["skewed"].clone()) for lyr in pre]
                set_decisions(pre, True)
                try:
                    with torch.enable_grad():
                        logits = self.model(x)
                        self._entropy_step(logits)
                finally:
                    for lyr, (decision, skewed) in zip(pre, held):
                        lyr.set_decision(decision, skewed)
        finally:
            first.__dict__.update(saved)
            self.__dict__["_held_streams"] = None
        return logits.detach()

    def _output_spread(self, logits: Tensor) -> Tensor:
        """The output check's signal: :func:`~datta_kernels.diversity.prediction_spread` of the
        batch's logits (0-dim)."""
        return prediction_spread(logits)

    def _release(self, logits: Tensor) -> bool:
        """The output check (SPEC §4) of a batch decided ``skewed``: if its output spread is
        above ``output_spread_cut`` (one host sync), undo its fold into the stream statistics
        and write ``single`` into the layers from the score layer on; True when released."""
        if not float(self._output_spread(logits)) > self.output_spread_cut:
            return False
        later = self._layers[self._score_at:]
        with torch.no_grad():
            for lyr, held in zip(later, self._held_streams):
                if held is not None:
                    lyr.stream_mean.copy_(held[0])
                    lyr.stream_var.copy_(held[1])
        set_decisions(later, SINGLE)
        self.__dict__.update(_last_decision=SINGLE, last_released=True, _held_streams=None)
        return True

    def extra_repr(self) -> str:
        return (f"selector={self.selector!r}, daft={self.daft}"
                + ("" if self.output_spread_cut is None
                   else f", output_spread_cut={self.output_spread_cut:g}")
                + (", daft_multiple=True" if self.daft_multiple else "")
                + (", daft_pre_single=True" if self.daft_pre_single else "")
                + (f", entropy_filter={self.entropy_filter:g}" if self.entropy_filter is not None else "")
                + f", episodic={self.episodic}, "
                f"score_mode={self.score_mode!r}, layers={len(self._layers)}")


def _released(cls, model: nn.Module, *, backend: str | None = "auto", score_layer: str | None = None,
              score_mode: str = "pixel", episodic: bool = False) -> DATTA:
    """DATTA as the authors' released (ICME 2025) code behaves, in one name.

    That is ``preset="datta_icme"`` (BN-only blends), ``KDESelector(window=None)`` (the KDE
    over every score of the stream, not the last 1000) and ``daft=False`` (their fine-tuning
    step never reaches the parameters, so nothing is updated).  Use it to reproduce their
    numbers; ``DATTA(model)`` is this project's default method.  Being update-free, it has no
    ``lr`` or optimizer; ``backend``, ``score_layer``, ``score_mode``, ``episodic`` as for
    :class:`DATTA`.
    """
    return cls(model, preset="datta_icme", selector=KDESelector(window=None), daft=False,
               episodic=episodic, score_mode=score_mode, backend=backend, score_layer=score_layer)


_released.__name__, _released.__qualname__ = "released", "DATTA.released"
DATTA.released = classmethod(_released)


class Source(Adapter):
    """No adaptation: eval-mode BatchNorm with the source statistics (``source`` preset)."""

    def __init__(self, model: nn.Module, *, episodic: bool = False, backend: str | None = "auto"):
        super().__init__(model, "source", episodic=episodic, backend=backend)


class TBN(Adapter):
    """Test-batch normalisation: every layer uses the current batch's statistics (``tbn``)."""

    def __init__(self, model: nn.Module, *, episodic: bool = False, backend: str | None = "auto"):
        super().__init__(model, "tbn", episodic=episodic, backend=backend)


class BNAdapt(Adapter):
    """Prior blend of source and test-batch statistics (Schneider et al., ``bn_adapt``)."""

    def __init__(self, model: nn.Module, *, episodic: bool = False, backend: str | None = "auto"):
        super().__init__(model, "bn_adapt", episodic=episodic, backend=backend)


class Tent(Adapter):
    """TENT (Wang et al.): test-batch statistics (``tbn``) and one entropy step on the
    ``gamma, beta`` of every layer on every batch (predict, then update)."""

    def __init__(self, model: nn.Module, *, lr: float = 1e-4, optimizer: OptimizerArg = None,
                 episodic: bool = False, backend: str | None = "auto"):
        super().__init__(model, "tbn", update="always", lr=lr, optimizer=optimizer,
                         episodic=episodic, backend=backend)


class DYN(Adapter):
    """DYN (Discover Your Neighbours, the DATTA authors' backward-free method for dynamic
    streams), faithful to their released layer: every BatchNorm2d normalises each sample with
    the statistics of its FINCH cluster of the batch (clustered by instance means, at every
    layer and batch) blended with the source statistics, ``source_rate`` on the source
    (SPEC §3b; preset ``"dyn"``: weights ``(r, 0, 1 - r)``, cluster-pooled instance terms).
    No backward, no parameter update; ``adapter(x)`` returns the logits.
    """

    def __init__(self, model: nn.Module, source_rate: float = 0.8, *, episodic: bool = False,
                 backend: str | None = "auto"):
        r = float(source_rate)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"source_rate must be in [0, 1], got {source_rate!r}")
        w = (r, 0.0, 1.0 - r)
        super().__init__(model, "dyn", episodic=episodic, backend=backend,
                         weights=None if r == PRESETS["dyn"].single[0] else (w, w))
        self.source_rate = r

    def extra_repr(self) -> str:
        return f"source_rate={self.source_rate}, " + super().extra_repr()


#: The plain baselines by their row name (``datta-kernels demo`` / ``run`` rows, and the
#: rivals of :func:`~datta_kernels.calibrate`'s ``margin`` objective).
BASELINES: dict[str, type[Adapter]] = {"source": Source, "tbn": TBN, "bn_adapt": BNAdapt,
                                       "tent": Tent, "dyn": DYN}


def baseline(name: str, model: nn.Module, *, lr: float, backend: str | None = "auto") -> Adapter:
    """A fresh :data:`BASELINES` adapter around ``model`` (not copied) by its row name; ``lr``
    is Tent's rate (the only baseline that fine-tunes), the others take their defaults."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[name](model, backend=backend, **({"lr": lr} if name == "tent" else {}))
