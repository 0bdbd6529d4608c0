"""Edges of the public API: low-precision blend tensors, backend names
checked at construction, ``available_backends`` for an absent device, meta tensors, clear
errors for ``blend=None`` and non-bool decisions, adapters used from several threads, and
``DATTA.released`` (the authors' released configuration in one name).

Kept apart from the per-module test files so that each concern reads in one place."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import DATTA, PRESETS, FusedDABN, KDESelector
from datta_kernels.adapt import TBN, Tent
from datta_kernels.testing import tol


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def stats(c: int):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
            torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)


# --- blends -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_blend_in_low_precision_is_accepted(dtype, preset):
    """A preset's weights stored in fp16/bf16 do not sum to 1 exactly (fp16 0.85 + 0.15 =
    1.00012, bf16 1.00195): the tolerance follows the dtype, and the result equals the float32
    blend's up to that rounding."""
    x = torch.randn(3, 4, 5, 5)
    w, b, sm, sv = stats(4)
    for decision in ("single", "multiple"):
        weights = getattr(PRESETS[preset], decision)
        got = dk.dabn(x, w, b, sm, sv, torch.tensor(weights, dtype=dtype), backend="reference")
        want = dk.dabn(x, w, b, sm, sv, torch.tensor(weights, dtype=dtype).float() /
                       torch.tensor(weights, dtype=dtype).float().sum(), backend="reference")
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_blend_still_rejects_a_real_error(dtype):
    x = torch.randn(2, 4, 3, 3)
    w, b, sm, sv = stats(4)
    with pytest.raises(ValueError, match="sum to 1"):
        dk.dabn(x, w, b, sm, sv, torch.tensor([0.6, 0.3, 0.0], dtype=dtype))


@pytest.mark.parametrize("blend", [None, 0.5, object()])
def test_blend_of_the_wrong_kind_says_what_it_needs(blend):
    x = torch.randn(2, 4, 3, 3)
    w, b, sm, sv = stats(4)
    with pytest.raises(TypeError, match="blend must be a length-3 tensor"):
        dk.dabn(x, w, b, sm, sv, blend)


def test_blend_value_check_runs_once_per_write(monkeypatch):
    """A blend tensor's values are checked once, and again only after it is written (its
    version counter moves, also through a view); an invalid write is still caught."""
    import datta_kernels.functional as F
    calls = []
    real = F._check_weights
    monkeypatch.setattr(F, "_check_weights", lambda w, tol=F._BLEND_TOL: (calls.append(1), real(w, tol)))
    x = torch.randn(2, 4, 3, 3)
    w, b, sm, sv = stats(4)
    blend = torch.tensor([0.6, 0.4, 0.0])
    first = dk.dabn(x, w, b, sm, sv, blend)
    dk.dabn(x, w, b, sm, sv, blend)
    assert len(calls) == 1
    blend.copy_(torch.tensor([0.5, 0.5, 0.0]))        # a valid write: checked again
    assert not torch.equal(dk.dabn(x, w, b, sm, sv, blend), first)
    assert len(calls) == 2
    blend[:2].fill_(0.7)                               # through a view: sums to 1.4
    with pytest.raises(ValueError, match="sum to 1"):
        dk.dabn(x, w, b, sm, sv, blend)
    with pytest.raises(ValueError, match="sum to 1"):  # and every call after it
        dk.dabn(x, w, b, sm, sv, blend)


def test_layer_checks_its_blend_buffers_when_written():
    """FusedDABN checks its blend buffers (not each forward's selected row): a valid layer
    runs; an invalid in-place write to a buffer (e.g. by a hand-edited state) is rejected at the
    next forward, whichever decision is active."""
    layer = FusedDABN(4).eval()
    x = torch.randn(2, 4, 3, 3)
    layer(x)
    with torch.no_grad():
        layer.blend_skewed.copy_(torch.tensor([0.9, 0.9, 0.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        layer(x)                                        # decision "single": still caught
    with torch.no_grad():
        layer.blend_skewed.copy_(torch.tensor([0.85, 0.0, 0.15]))
    layer(x)


# --- decisions --------------------------------------------------------------------------------

@pytest.mark.parametrize("decision", [torch.tensor(0.3), torch.tensor(1), torch.tensor([True, False]),
                                      0.3, 1, None])
def test_decision_must_be_a_bool_or_a_name(decision):
    layer = FusedDABN(4)
    with pytest.raises(TypeError, match="decision"):
        layer.set_decision(decision)
    assert bool(layer.decision)                      # unchanged


@pytest.mark.parametrize("decision, want", [(torch.tensor(False), False), (torch.tensor([True]), True),
                                            (False, False), ("multiple", False), ("single", True)])
def test_valid_decisions(decision, want):
    layer = FusedDABN(4)
    layer.set_decision(not want)
    layer.set_decision(decision)
    assert bool(layer.decision) is want


# --- backend names ----------------------------------------------------------------------------

def test_fused_dabn_checks_the_backend_name_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        FusedDABN(4, backend="nosuch")
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        dk.convert_model(small_model(), backend="nosuch")
    FusedDABN(4, backend="reference")                 # a known name, usable or not, is accepted


@pytest.mark.parametrize("make", [lambda m: DATTA(m, backend="nosuch"), lambda m: TBN(m, backend="nosuch"),
                                  lambda m: Tent(m, backend="nosuch")])
def test_adapters_check_the_backend_name_at_construction(make):
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        make(small_model())


def test_available_backends_without_the_device():
    if not torch.cuda.is_available():
        assert dk.available_backends("cuda") == []
    assert "reference" in dk.available_backends("cpu")
    assert dk.available_backends() == dk.available_backends("cpu") + [
        b for b in dk.available_backends("cuda") if b not in dk.available_backends("cpu")] or \
        torch.cuda.is_available()


# --- meta tensors -----------------------------------------------------------------------------

def test_meta_tensors_forward_and_backward():
    """Shape propagation without data (what the reference promises): dabn, the score and the
    layer's backward run on meta tensors and give meta results of the right shapes."""
    x = torch.empty(2, 3, 4, 5, device="meta", requires_grad=True)
    layer = FusedDABN(3, device="meta", compute_score=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == x.shape
    assert layer.last_score.shape == () and layer.last_angles.shape == (2,)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.device.type == "meta"
    mean, var = dk.instance_stats(x)
    assert mean.shape == var.shape == (2, 3) and mean.device.type == "meta"
    w = torch.ones(3, device="meta")
    out = dk.dabn(x, w, w, w, w, (0.6, 0.4, 0.0))
    assert out.shape == x.shape and out.device.type == "meta"


# --- threads ----------------------------------------------------------------------------------

class _Gate(nn.Module):
    """Blocks the first forward until released, so a second thread can call in meanwhile."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return x


@pytest.mark.parametrize("daft", [True, False])
def test_concurrent_calls_raise_not_thread_safe(daft):
    gate = _Gate()
    model = nn.Sequential(*small_model(), gate)
    adapter = DATTA(model, daft=daft, selector=1e9)
    x = torch.randn(4, 3, 6, 6)
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("logits", adapter(x)))
    t.start()
    assert gate.entered.wait(30)
    try:
        with pytest.raises(RuntimeError, match="not thread-safe"):
            adapter(x)
    finally:
        gate.release.set()
        t.join(30)
    assert first["logits"].shape == (4, 4) and adapter.n_batches == 1
    # one batch at a time, from any thread, is fine
    t = threading.Thread(target=lambda: first.setdefault("again", adapter(x)))
    t.start()
    t.join(30)
    assert "again" in first and adapter(x).shape == (4, 4) and adapter.n_batches == 3
    assert "not thread-safe" in type(adapter).__mro__[1].__doc__.lower()


# --- the authors' released configuration ------------------------------------------------------

def test_released_is_the_authors_configuration():
    adapter = DATTA.released(small_model(), backend="reference")
    assert isinstance(adapter, DATTA)
    assert not adapter.daft and adapter.optimizer is None
    assert isinstance(adapter.selector, KDESelector) and adapter.selector.window is None
    assert all(layer.preset == "datta_icme" for layer in adapter.layers)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        adapter(torch.randn(4, 3, 6, 6, generator=g) * (1 + i % 2))
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("decision")), "DAFT updated"
    assert adapter.selector.count == 60


def test_released_equals_the_explicit_configuration():
    xs = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) * (1 + i % 3)
          for i in range(55)]
    a = DATTA.released(small_model(), backend="reference")
    b = DATTA(small_model(), preset="datta_icme", selector=KDESelector(window=None), daft=False,
              backend="reference")
    for x in xs:
        assert torch.equal(a(x), b(x)) and a.last_decision == b.last_decision


def test_demo_released_row_uses_it():
    from datta_kernels.eval.runner import METHODS

    adapter = METHODS["datta_icme"](small_model(), "reference", 1e-3, {"score_layer": None,
                                                                      "score_mode": "pixel"}, None)
    assert not adapter.daft and adapter.selector.window is None
    assert adapter.layers[0].preset == "datta_icme"


def test_set_decisions_writes_every_layer_in_two_ops():
    """``set_decisions`` == ``set_decision`` on each layer, for names, bools and 0-dim bool
    tensors, as two ``_foreach_copy_`` calls whatever the number of layers; bad input raises
    before any layer is written."""
    from datta_kernels.nn import set_decisions

    from .conftest import Recorder

    layers = [dk.FusedDABN(3) for _ in range(7)]
    cases = [("single", (True, False)), ("skewed", (False, True)), ("multiple", (False, False)),
             (True, (True, False)), ((torch.tensor(False), torch.tensor(True)), (False, True)),
             ((torch.tensor([True]), False), (True, False))]
    for arg, want in cases:
        args = arg if isinstance(arg, tuple) else (arg,)
        with Recorder() as rec:
            set_decisions(layers, *args)
        names = [op.split(".")[1] for op in rec.seen]         # "aten._foreach_copy_.default"
        assert names.count("_foreach_copy_") == 2 and "copy_" not in names, rec.seen
        assert all((bool(lyr.decision), bool(lyr.skewed)) == want for lyr in layers), arg
        single = dk.FusedDABN(3)
        single.set_decision(*args)
        assert (bool(single.decision), bool(single.skewed)) == want
    for bad, err in [(("singel",), ValueError), ((1,), TypeError), ((torch.tensor(1.0),), TypeError),
                     ((torch.tensor([True, False]),), TypeError), ((False, 0.5), TypeError)]:
        with pytest.raises(err):
            set_decisions(layers, *bad)
    assert all(bool(lyr.decision) for lyr in layers)      # untouched by the refused calls
    set_decisions([], "single")                             # nothing to write
