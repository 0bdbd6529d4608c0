"""``FusedDABN``: a drop-in ``nn.BatchNorm2d`` that normalises with the DABN blend (SPEC §3),
plus ``convert_model`` / ``revert_model``.

State of one layer (all tensors, so ``.to()``, ``deepcopy``, pickle and ``state_dict`` work and a
changing decision never recompiles a ``torch.compile``-d model):

==================  =======  ==============================================================
name                shape    meaning
==================  =======  ==============================================================
weight, bias        (C,)     gamma, beta (as BatchNorm2d)
running_mean/var    (C,)     as BatchNorm2d; never updated by DABN
num_batches_tracked ()       as BatchNorm2d; never updated by DABN
source_mean/var     (C,)     frozen copy of the source statistics used by DABN
blend_single        (3,)     (w_s, w_b, w_i) for "single" batches, float32
blend_multiple      (3,)     (w_s, w_b, w_i) for "multiple" batches, float32
blend_skewed        (3,)     (w_s, w_b, w_i) for "skewed" batches (less diverse than one
                             i.i.d. domain, e.g. label-sorted), float32; default = multiple
decision            ()       bool, True = "single"
skewed              ()       bool, True = "skewed" (only read when decision is False);
                             blend = where(decision, single, where(skewed, skewed, multiple))
==================  =======  ==============================================================
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import backends, ops
from . import reference as ref
from .functional import (
    SCORE_MODES,
    _backend_for,
    _check_blend_values,
    _check_x,
    _dabn,
    blend_tensor,
    check_score_args,
    cluster_dabn,
    score_from_stats,
)
from .presets import _PRESET_DEFAULT, PRESETS

__all__ = ["FusedDABN", "dabn_layers", "first_nonlinear_layer", "set_decisions", "stream_anchor",
           "stream_divergence"]

_DABN_KEYS = ("source_mean", "source_var", "blend_single", "blend_multiple", "blend_skewed",
              "decision", "skewed", "stream_mean", "stream_var")
_BLEND_KEYS = ("blend_single", "blend_multiple", "blend_skewed")
#: decision name -> (decision, skewed) buffer values
_DECISIONS = {"single": (True, False), "multiple": (False, False), "skewed": (False, True)}


#: per device, 0-dim bool tensors (False, True): the sources of a host-side decision's copies
_FLAGS: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _flag_tensor(value: bool, device: torch.device) -> Tensor:
    pair = _FLAGS.get(device)
    if pair is None:
        pair = _FLAGS[device] = (torch.tensor(False, device=device), torch.tensor(True, device=device))
    return pair[bool(value)]


def set_decisions(layers: list[FusedDABN], decision: str | bool | Tensor,
                  skewed: bool | Tensor = False) -> None:
    """:meth:`FusedDABN.set_decision` for every layer of ``layers``, as two foreach copies (one
    per decision buffer) instead of two ops per layer: DATTA writes each batch's decision into
    every layer, and at small batches those per-layer ops were a visible part of a step."""
    if not layers:
        return
    if isinstance(decision, str):
        if decision not in _DECISIONS:
            raise ValueError(f"decision must be one of {list(_DECISIONS)}, got {decision!r}")
        decision, skewed = _DECISIONS[decision]
    device = layers[0]._buffers["decision"].device
    values = []
    for value in (decision, skewed):        # both checked before anything is written
        if isinstance(value, Tensor):
            if value.dtype != torch.bool or value.numel() != 1:
                raise TypeError("a decision tensor must hold one bool (True = 'single' / "
                                f"'skewed'), got {value.dtype} of shape {tuple(value.shape)}")
            values.append(value.reshape(()))
        elif isinstance(value, (bool, np.bool_)):
            values.append(_flag_tensor(value, device))
        else:
            raise TypeError("decision must be 'single' / 'multiple' / 'skewed', a bool or "
                            f"a bool tensor, got {value!r}")
    with torch.no_grad():
        for value, name in zip(values, ("decision", "skewed")):
            # _buffers, not getattr: nn.Module.__getattr__ costs ~0.7 us a buffer
            bufs = [lyr._buffers[name] for lyr in layers]
            torch._foreach_copy_(bufs, [value] * len(bufs))


@torch.no_grad()
def stream_anchor(mean_i: Tensor, var_i: Tensor, m: int, stream_mean: Tensor, stream_var: Tensor,
                  source_mean: Tensor, source_var: Tensor, decision: Tensor, skewed: Tensor,
                  momentum: float, reset: float | None = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """SPEC §3c in torch ops (any device, no host sync): unless the decision is ``multiple``,
    ``stream <- stream + momentum (batch - stream)`` in place, the batch statistics from the
    instance statistics ``(N, C)`` over ``m`` pixels (D4), with momentum 1 instead where a
    ``reset`` cut is given and :func:`stream_divergence` exceeds it; returns the source term of
    the blend: the updated stream statistics on a ``skewed`` batch, the source statistics
    otherwise.  ``datta::_stream_anchor`` is the same on CPU, in one op."""
    mean_b, var_b = ref.batch_stats(mean_i, var_i, m)
    return stream_anchor_moments(mean_b, var_b, stream_mean, stream_var, source_mean, source_var,
                                 decision, skewed, momentum, reset=reset, eps=eps)


def stream_divergence(mean_b: Tensor, var_b: Tensor, stream_mean: Tensor, stream_var: Tensor,
                      eps: float) -> Tensor:
    """How far a batch's statistics ``(C,)`` are from a layer's stream statistics (SPEC §3c
    "reset"): the symmetric KL divergence of the per-channel Gaussians averaged over channels
    (:func:`~datta_kernels.diversity.source_shift`'s formula with the stream in the source's
    place), 0-dim, in the stream's dtype."""
    return ref.gaussian_sym_kl(mean_b.to(stream_mean.dtype), var_b.to(stream_var.dtype), stream_mean,
                               stream_var, eps)


@torch.no_grad()
def stream_anchor_moments(mean_b: Tensor, var_b: Tensor, stream_mean: Tensor, stream_var: Tensor,
                          source_mean: Tensor, source_var: Tensor, decision: Tensor, skewed: Tensor,
                          momentum: float, valid: Tensor | None = None, reset: float | None = None,
                          eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """:func:`stream_anchor` given the batch statistics ``(C,)`` (e.g. a process group's
    global batch); ``valid`` (0-dim bool) False folds nothing (an empty global batch)."""
    keep = ~(decision | skewed)                 # multiple: the stream stays
    if valid is not None:
        keep = keep | ~valid
    rate: float | Tensor = momentum
    if reset is not None:                       # a NaN divergence compares False: no reset
        far = stream_divergence(mean_b, var_b, stream_mean, stream_var, eps) > reset
        rate = torch.where(far, 1.0, momentum).to(stream_mean.dtype)
    for buf, new in ((stream_mean, mean_b), (stream_var, var_b)):
        buf.copy_(torch.where(keep, buf, torch.lerp(buf, new.to(buf.dtype), rate)))
    use = skewed & ~decision
    return torch.where(use, stream_mean, source_mean), torch.where(use, stream_var, source_var)


def _resolve_weights(preset: str, weights, shrink_k, cluster=_PRESET_DEFAULT):
    """(single, multiple, skewed, shrink_k, preset label, cluster) from a preset name and
    optional overrides; ``weights`` is ``(single, multiple)`` or ``(single, multiple, skewed)``."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} "
                         "or pass weights=(single, multiple)")
    p = PRESETS[preset]
    single, multiple, skewed, label = p.single, p.multiple, p.skewed, preset
    if weights is not None:
        if (isinstance(weights, (str, Tensor)) or not isinstance(weights, Sequence)
                or len(weights) not in (2, 3)
                or not all(isinstance(w, (Sequence, Tensor)) and not isinstance(w, str) for w in weights)):
            raise ValueError("weights must be a pair (single, multiple) or a triple (single, multiple, "
                             f"skewed) of (w_s, w_b, w_i) triples, got {weights!r}")
        single, multiple, *rest = (tuple(float(v) for v in w) for w in weights)
        skewed = rest[0] if rest else None
        label = "custom"
    skewed = multiple if skewed is None else skewed
    for name, w in (("single", single), ("multiple", multiple), ("skewed", skewed)):
        try:
            blend_tensor(w)
        except ValueError as e:
            raise ValueError(f"invalid {name!r} blend weights: {e}") from None
    k = p.shrink_k if shrink_k is _PRESET_DEFAULT else shrink_k
    if k is not None:
        k = float(k)
        if not math.isfinite(k) or k < 0:
            raise ValueError(f"shrink_k must be a finite number >= 0 or None, got {k}")
    cluster = p.cluster if cluster is _PRESET_DEFAULT else cluster
    if not isinstance(cluster, (bool, np.bool_)):
        raise TypeError(f"cluster must be a bool, got {cluster!r}")
    if cluster and k is not None:
        raise ValueError("cluster-pooled instance statistics (cluster=True) take no shrink: "
                         "pass shrink_k=None")
    return single, multiple, skewed, k, label, bool(cluster)


class FusedDABN(nn.BatchNorm2d):
    r"""Diversity-Adaptive BatchNorm: ``nn.BatchNorm2d`` normalising with a blend of source,
    test-batch and instance statistics chosen by a per-batch decision (SPEC §3).

    Input ``(N, C, H, W)`` -> output of the same shape, dtype and memory format.

    Args: those of ``nn.BatchNorm2d``, plus keyword-only
        preset: a name in ``datta_kernels.PRESETS`` (default ``"datta"``).
        shrink_k: NOTE-style shrink of instance statistics (default: the preset's; ``None``
            disables it).
        weights: ``(single, multiple)`` custom ``(w_s, w_b, w_i)`` triples, each >= 0 summing
            to 1; overrides the preset's weights (not its ``shrink_k``).
        backend: ``"auto"`` or a backend name (see ``datta_kernels.available_backends``).
        compute_score: compute the diversity score of the input in ``forward`` (set it on the
            score layer of a model); stored in ``last_score`` (0-dim) and ``last_per_sample``
            (N,).  The instance statistics are computed once and serve both the score and the
            normalization (2 reads + 1 write of x; 3 reads in ``"pixel"`` mode).
        score_mode: ``"pixel"`` (exact, the authors'), ``"instance"`` (approximation) or
            ``"dispersion"``, see ``diversity_score``.
        cluster: the instance terms use the pooled statistics of the sample's FINCH cluster
            (SPEC §3b, DYN's CABN; default: the preset's, True only for ``"dyn"``); no shrink.

    Unlike ``nn.BatchNorm2d``, ``train()`` / ``eval()`` do not change what the layer computes:
    it always normalises with the blend of the current decision, and the running buffers and
    ``num_batches_tracked`` are never updated (they hold the source statistics).  ``momentum``
    is kept only for checkpoint and ``repr`` compatibility.  With ``track_running_stats=False``
    the source statistics are the initial ``(0, 1)`` until set with :meth:`set_source_stats`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, preset: str = "datta", shrink_k=_PRESET_DEFAULT, weights=None,
                 backend: str = "auto", compute_score: bool = False, score_mode: str = "pixel",
                 cluster=_PRESET_DEFAULT):
        single, multiple, skewed, k, label, cl = _resolve_weights(preset, weights, shrink_k, cluster)
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if backend != "auto":
            backends.get(backend)                 # an unknown name fails here, not at forward
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        fk = {"device": device, "dtype": dtype}
        self.register_buffer("source_mean", torch.zeros(num_features, **fk))
        self.register_buffer("source_var", torch.ones(num_features, **fk))
        self.register_buffer("blend_single", torch.tensor(single, dtype=torch.float32, device=device))
        self.register_buffer("blend_multiple",
                             torch.tensor(multiple, dtype=torch.float32, device=device))
        self.register_buffer("blend_skewed", torch.tensor(skewed, dtype=torch.float32, device=device))
        self.register_buffer("decision", torch.tensor(True, device=device))
        self.register_buffer("skewed", torch.tensor(False, device=device))
        #: the stream statistics (SPEC §3c): an exponential moving average of the batch
        #: statistics of the batches not decided ``multiple``; ``skewed`` batches use them in
        #: place of the source statistics when ``stream_momentum`` is set
        self.register_buffer("stream_mean", torch.zeros(num_features, **fk))
        self.register_buffer("stream_var", torch.ones(num_features, **fk))
        #: None: ``skewed`` batches blend the source statistics (DATTA's design); a rate in
        #: (0, 1]: they blend the stream statistics, updated with this momentum (a constant of
        #: the configuration, not a per-batch flag)
        self.stream_momentum: float | None = None
        #: None, or a cut > 0 on :func:`stream_divergence`: a batch farther than it from the
        #: stream statistics restarts them (momentum 1; SPEC §3c "reset")
        self.stream_reset: float | None = None
        self.preset, self.shrink_k, self.backend, self.cluster = label, k, backend, cl
        self.compute_score, self.score_mode = compute_score, score_mode
        self.last_score: Tensor | None = None
        self.last_stats: tuple[Tensor, Tensor] | None = None
        self.last_per_sample: Tensor | None = None
        #: called as ``score_callback(layer, score)`` after the score is computed and before
        #: the layer normalises (the DATTA adapter sets the decision of every layer there)
        self.score_callback = None
        #: when set (with ``compute_score``), called as ``score_forward(layer, x)`` first: a tensor
        #: back is the layer's output (the owner ran the whole scored forward, e.g. DATTA's fused
        #: CPU op, and set ``last_score`` / ``last_per_sample`` / ``last_stats``); None: the layer
        #: goes on as usual
        self.score_forward = None

    # ------------------------------------------------------------------ configuration
    def set_preset(self, preset: str = "datta", *, shrink_k=_PRESET_DEFAULT, weights=None,
                   cluster=_PRESET_DEFAULT) -> None:
        """Switch preset / weights in place (tensor values only: no recompilation unless
        ``shrink_k`` or ``cluster`` changes)."""
        single, multiple, skewed, k, label, cl = _resolve_weights(preset, weights, shrink_k, cluster)
        with torch.no_grad():
            self.blend_single.copy_(torch.tensor(single))
            self.blend_multiple.copy_(torch.tensor(multiple))
            self.blend_skewed.copy_(torch.tensor(skewed))
        self.preset, self.shrink_k, self.cluster = label, k, cl

    def set_decision(self, decision: str | bool | Tensor, skewed: bool | Tensor = False) -> None:
        """Write the decision in place: ``"single"``/``True``, ``"multiple"``/``False`` or
        ``"skewed"``, or a 0-dim bool tensor (True = single; copied on device, no host sync).
        ``skewed`` (a bool or 0-dim bool tensor) marks a non-single decision as ``"skewed"``;
        a decision string sets it by itself.  :func:`set_decisions` writes many layers at once."""
        set_decisions([self], decision, skewed)

    def set_source_stats(self, mean: Tensor, var: Tensor) -> None:
        """Set the source statistics (and the running buffers, when tracked) to ``(C,)`` values."""
        with torch.no_grad():
            self.source_mean.copy_(mean)
            self.source_var.copy_(var)
            self.stream_mean.copy_(mean)
            self.stream_var.copy_(var)
            if self.running_mean is not None:
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "source_mean"):  # BatchNorm's __init__ calls this before they exist
            self.source_mean.zero_()
            self.source_var.fill_(1)
            self.stream_mean.zero_()
            self.stream_var.fill_(1)

    def blend(self) -> Tensor:
        """The effective ``(w_s, w_b, w_i)`` for the current decision, on device (no sync)."""
        return torch.where(self.decision, self.blend_single,
                           torch.where(self.skewed, self.blend_skewed, self.blend_multiple))

    # ------------------------------------------------------------------ forward
    @property
    def last_angles(self) -> Tensor | None:
        """``last_per_sample`` under its pixel/instance-mode name (the angles, radians)."""
        return self.last_per_sample

    def _score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Instance statistics of x (one pass), then the score from them; stores
        ``last_score`` / ``last_per_sample`` and returns the statistics for the normalization."""
        _check_x(x)
        check_score_args(x, self.source_mean, self.source_var, self.score_mode, "std")
        name = _backend_for(x, self.backend)
        mean_i, var_i = ops.run_instance_stats(x.detach(), name)
        self.last_score, self.last_per_sample = score_from_stats(
            x, mean_i, var_i, self.source_mean, self.source_var, mode=self.score_mode,
            eps=self.eps, backend=name)
        return mean_i, var_i

    def score(self, x: Tensor) -> Tensor:
        """Compute and store ``last_score`` (0-dim) / ``last_per_sample`` (N,) for input ``x``."""
        self._check_input_dim(x)
        self._score(x)
        return self.last_score

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        stats = None
        if self.compute_score:
            fused = getattr(self, "score_forward", None)    # absent in layers pickled before it
            if fused is not None:
                y = fused(self, x)
                if y is not None:
                    return y
            stats = self._score(x)
            #: the instance statistics the score came from (for the score callback)
            self.last_stats = stats
            if self.score_callback is not None:
                self.score_callback(self, self.last_score)
        if self.cluster:
            return cluster_dabn(x, self.weight, self.bias, self.source_mean, self.source_var,
                                self.blend(), eps=self.eps, backend=self.backend, stats=stats)
        for buf in (self.blend_single, self.blend_multiple, self.blend_skewed):
            _check_blend_values(buf)    # only when a buffer is new or was written since
        anchor_mean, anchor_var = self.source_mean, self.source_var
        if getattr(self, "stream_momentum", None) is not None:
            if (stats is None and x.device.type == "cpu" and ops.HAS_KERNEL_OPS
                    and backends.resolve(self.backend, "cpu", x.dtype) == "cpu"
                    and ops._is_plain_eager_call(x, self.weight, self.bias)):
                # no graph to record: the whole layer in one C++ op
                return torch.ops.datta._dabn_stream_forward(
                    ops.as_kernel_layout(x), self.weight, self.bias, self.source_mean, self.source_var,
                    self.blend_single, self.blend_multiple, self.blend_skewed, self.shrink_k, self.eps,
                    self.stream_mean, self.stream_var, self.decision, self.skewed, self.stream_momentum,
                    getattr(self, "stream_reset", None))
            anchor_mean, anchor_var, stats = self._stream_anchor(x, stats)
        return _dabn(x, self.weight, self.bias, anchor_mean, anchor_var, self.blend(),
                     shrink_k=self.shrink_k, eps=self.eps, backend=self.backend, stats=stats,
                     check_blend=False)

    def set_stream(self, momentum: float | None, reset: float | None = None) -> None:
        """Blend the stream statistics instead of the source statistics on ``skewed`` batches
        (SPEC §3c), updated with ``momentum`` in (0, 1]; None: the source statistics (DATTA's
        design).  ``reset``: None, or a cut > 0 on :func:`stream_divergence` above which a
        batch restarts the stream statistics (a new domain; needs ``momentum``).  The stream
        statistics restart from the source statistics."""
        if momentum is not None:
            momentum = float(momentum)
            if not (0.0 < momentum <= 1.0):
                raise ValueError(f"stream momentum must be in (0, 1] or None, got {momentum}")
        if reset is not None:
            reset = float(reset)
            if momentum is None or not (reset > 0.0):
                raise ValueError(f"stream reset must be a cut > 0 with a momentum, got reset={reset}, "
                                 f"momentum={momentum}")
        with torch.no_grad():
            self.stream_mean.copy_(self.source_mean)
            self.stream_var.copy_(self.source_var)
        self.stream_momentum = momentum
        self.stream_reset = reset

    def _stream_anchor(self, x: Tensor, stats):
        """SPEC §3c: fold this batch's statistics into the stream statistics (batches not
        decided ``multiple``) and return the source term of the blend (the stream statistics
        on a ``skewed`` batch, the source statistics otherwise) and the instance statistics
        for the normalisation (computed here once when no graph needs them)."""
        need_graph = torch.is_grad_enabled() and x.requires_grad
        name = _backend_for(x, self.backend)
        s = stats if stats is not None else ops.run_instance_stats(x.detach(), name)
        mean_i, var_i = s[0].detach(), s[1].detach()
        hw = x.shape[2] * x.shape[3]
        reset = getattr(self, "stream_reset", None)
        if x.device.type == "cpu" and ops.HAS_KERNEL_OPS:
            mean, var = torch.ops.datta._stream_anchor(
                mean_i, var_i, hw, self.stream_mean, self.stream_var, self.source_mean,
                self.source_var, self.decision, self.skewed, self.stream_momentum, reset, self.eps)
        else:
            mean, var = stream_anchor(mean_i, var_i, hw, self.stream_mean, self.stream_var,
                                      self.source_mean, self.source_var, self.decision,
                                      self.skewed, self.stream_momentum, reset, self.eps)
        return mean, var, (stats if need_graph else s)

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        # .half()/.double() would round the blend weights (fp16 0.85 + 0.15 != 1); keep them
        # float32 and only follow the device.
        keep = {k: getattr(self, k) for k in _BLEND_KEYS if hasattr(self, k)}
        out = super()._apply(fn, recurse)
        for k, old in keep.items():
            self._buffers[k] = old.to(device=self._buffers[k].device, dtype=torch.float32)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain BatchNorm2d checkpoint has no DABN keys: the source statistics come from its
        # running buffers, blend weights and decision keep this layer's values, and none of
        # them is reported missing (so strict=True loads succeed).
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        dabn_missing = {prefix + k for k in _DABN_KEYS} - set(state_dict)
        if not dabn_missing:
            return
        new = missing_keys[n_missing:]
        del missing_keys[n_missing:]
        missing_keys.extend(k for k in new if k not in dabn_missing)
        with torch.no_grad():
            for src, dst in (("running_mean", "source_mean"), ("running_var", "source_var"),
                             ("blend_multiple", "blend_skewed"), ("running_mean", "stream_mean"),
                             ("running_var", "stream_var")):
                value = state_dict.get(prefix + src)
                if prefix + dst in dabn_missing and value is not None:
                    getattr(self, dst).copy_(value)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", preset={self.preset!r}"
        known = PRESETS.get(self.preset)
        if self.shrink_k != (known.shrink_k if known else None):
            s += f", shrink_k={self.shrink_k}"
        if self.cluster != (known.cluster if known else False):
            s += f", cluster={self.cluster}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def dabn_layers(model: nn.Module) -> list[FusedDABN]:
    """Every ``FusedDABN`` of ``model`` in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, FusedDABN)]


@torch.no_grad()
def first_nonlinear_layer(model: nn.Module, example: Tensor, rtol: float = 1e-3) -> int:
    """Index (into :func:`dabn_layers`) of the first FusedDABN layer whose input is not an
    affine function of the model's input — the default score layer of the ``"dispersion"``
    score (SPEC §2).  Model-agnostic: probes ``model`` with two random inputs shaped like
    ``example[:1]`` and their midpoint, every layer normalising with its source statistics (an
    affine map), the model in eval mode and its stream statistics (SPEC §3c) kept; an input ``f`` with
    ``|f(mid) - (f(a) + f(b)) / 2| > rtol * max|f|`` is nonlinear.  Returns 0 when every
    layer's input is affine (or ``model`` has one layer).  The model's state is restored.
    """
    layers = dabn_layers(model)
    if len(layers) <= 1:
        return 0
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, *example.shape[1:])
    a = torch.randn(shape, generator=g).to(example)
    b = torch.randn(shape, generator=g).to(example)
    saved = [(lyr.blend_single.clone(), lyr.blend_multiple.clone(), lyr.blend_skewed.clone(),
              lyr.compute_score, lyr.stream_mean.clone(), lyr.stream_var.clone()) for lyr in layers]
    modes = [m.training for m in model.modules()]
    inputs: dict[int, list[Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [lyr.register_forward_pre_hook(lambda mod, inp, i=i: inputs[i].append(inp[0].float()))
             for i, lyr in enumerate(layers)]
    try:
        model.eval()
        for lyr in layers:
            lyr.blend_single.copy_(torch.tensor((1.0, 0.0, 0.0)))
            lyr.blend_multiple.copy_(torch.tensor((1.0, 0.0, 0.0)))
            lyr.blend_skewed.copy_(torch.tensor((1.0, 0.0, 0.0)))
            lyr.compute_score = False
        for probe in (a, b, (a + b) / 2):
            model(probe)
    finally:
        for h in hooks:
            h.remove()
        for lyr, (s, mu, sk, cs, stream_mean, stream_var) in zip(layers, saved):
            lyr.blend_single.copy_(s)
            lyr.blend_multiple.copy_(mu)
            lyr.blend_skewed.copy_(sk)
            lyr.compute_score = cs
            lyr.stream_mean.copy_(stream_mean)      # the probes fold nothing
            lyr.stream_var.copy_(stream_var)
        for m, t in zip(model.modules(), modes):
            m.training = t
    for i, seen in inputs.items():
        if len(seen) != 3:      # not reached, or reached several times: not a plain chain
            continue
        fa, fb, fm = seen
        scale = float(torch.stack([fa.abs().max(), fb.abs().max()]).max()) or 1.0
        if float((fm - (fa + fb) / 2).abs().max()) > rtol * scale:
            return i
    return 0
