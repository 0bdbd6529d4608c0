"""DATTA's output check (SPEC §4, ``output_spread_cut``): a batch decided ``skewed`` whose own
output's prediction spread is above the cut is released, ending exactly as a batch decided
``single``: the same logits, stream statistics, DAFT step and parameters."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import datta_kernels as dk

HIGH, LOW = 0.2, 0.01
WEIGHTS = ((0.0, 1.0, 0.0), (0.2, 0.6, 0.2), (1.0, 0.0, 0.0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def _stream(steps=12):
    """Batches of every kind: i.i.d., two domains (multiple), near-duplicates (skewed)."""
    g = torch.Generator().manual_seed(4)
    out = []
    for k in range(steps):
        x = torch.randn(8, 1, 12, 12, generator=g) * (0.2 + k % 3) + (k % 4)
        if k % 4 == 3:
            x = x[:1].expand(8, 1, 12, 12) + 0.01 * torch.randn(8, 1, 12, 12, generator=g)
        if k % 4 == 1:
            x = torch.cat([x[:4], x[4:] * 5 - 3])
        out.append(x)
    return out


def _adapter(low, daft, stream, backend, cut=None, pre_single=False):
    adapter = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(HIGH, low=low),
                       daft=daft, lr=1e-2, weights=WEIGHTS, shrink_k=None, backend=backend,
                       daft_pre_single=pre_single, output_spread_cut=cut)
    for i, layer in enumerate(adapter.layers):
        layer.set_stream(*((0.3, 0.5) if stream and i > 0 else (None, None)))
    return adapter


def _run(adapter):
    rows = []
    for x in _stream():
        logits = adapter(x)
        rows.append({"logits": logits, "decision": adapter.last_decision,
                     "released": adapter.last_released,
                     "streams": [(lyr.stream_mean.clone(), lyr.stream_var.clone()) for lyr in adapter.layers],
                     "params": [p.detach().clone() for p in adapter.model.parameters()]})
    return rows


def _same(a, b):
    assert a["decision"] == b["decision"]
    torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-5, atol=1e-6)
    for (m1, v1), (m2, v2) in zip(a["streams"], b["streams"]):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    for p1, p2 in zip(a["params"], b["params"]):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])      # the fused CPU score op, the separate ops
@pytest.mark.parametrize("daft,pre_single", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("stream", [False, True])
def test_released_batch_is_a_single_batch(backend, daft, pre_single, stream):
    """A cut below every spread releases every skewed batch: the adapter is then the same as
    one whose rule never says skewed (no low cut), batch by batch, under DAFT too."""
    released = _run(_adapter(LOW, daft, stream, backend, cut=-1.0, pre_single=pre_single))
    twin = _run(_adapter(-math.inf, daft, stream, backend, pre_single=pre_single))
    plain = _run(_adapter(LOW, daft, stream, backend))
    assert {r["decision"] for r in plain} == {"single", "multiple", "skewed"}
    for a, b in zip(released, twin):
        _same(a, b)
    assert sum(r["released"] for r in released) >= 3
    assert not any(r["released"] for r in twin)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("daft", [False, True])
def test_a_cut_above_every_spread_changes_nothing(backend, daft):
    """The spread lies in [0, 1]: a cut of 1 releases nothing, so the adapter is the one without
    the check (same decisions, logits, stream statistics, parameters)."""
    checked = _run(_adapter(LOW, daft, True, backend, cut=1.0))
    plain = _run(_adapter(LOW, daft, True, backend))
    assert "skewed" in {r["decision"] for r in plain}
    for a, b in zip(checked, plain):
        _same(a, b)
        assert not a["released"]


def test_release_is_strictly_above_the_cut(monkeypatch):
    """Released iff the output spread is above the cut (equal: kept), read only on batches
    decided skewed; the decision reported is what normalised the kept output."""
    adapter = _adapter(LOW, False, True, "auto", cut=0.5)
    spreads = iter([0.5, 0.51, 0.2, 0.9] * 4)
    asked = []

    def fake(logits):
        asked.append(adapter._last_decision)
        return torch.tensor(next(spreads))
    monkeypatch.setattr(adapter, "_output_spread", fake)
    seen = []
    for x in _stream():
        adapter(x)
        seen.append((adapter.last_decision, adapter.last_released))
    assert asked and set(asked) == {"skewed"}
    outcomes = [s for s in seen if s[1] or s[0] == "skewed"]
    assert len(outcomes) == len(asked) >= 3
    expected = [v > 0.5 for v in [0.5, 0.51, 0.2, 0.9] * 4][:len(outcomes)]
    assert [s[1] for s in outcomes] == expected
    assert all(d == "single" for d, r in outcomes if r)


def test_output_check_needs_a_number_and_decides_on_the_host():
    for bad in (True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="output_spread_cut"):
            dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(HIGH, low=LOW),
                     daft=False, output_spread_cut=bad)
    plain = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(HIGH, low=LOW),
                     daft=False)
    checked = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(HIGH, low=LOW),
                       daft=False, output_spread_cut=0.5)
    assert plain._sync_free and not checked._sync_free
    assert "output_spread_cut=0.5" in repr(checked)
