"""``datta_kernels.calibrate`` (datta_cal) and the pieces it adds: the ``skewed`` decision of the
layers and of ``ThresholdSelector(low=...)``, the cut search, the report."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels.calibration import (
    DECISIONS,
    INSTANCE_MODES,
    KINDS,
    _batches,
    _best_band,
    _decide,
    calibrate,
)
from datta_kernels.diversity import SKEWED


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return m.eval()


def _domains(n: int = 24) -> dict:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    base = torch.randn(n, 1, 10, 10, generator=g) + y[:, None, None, None].float()
    noisy = base + torch.randn(base.shape, generator=g)
    return {"clean": (base, y), "shifted": (base * 2 + 1, y), "noisy": (noisy, y)}


# ---------------------------------------------------------------- the skewed decision
def test_threshold_selector_low_cut():
    sel = dk.ThresholdSelector(0.5, low=0.2)
    assert [sel.update(s) for s in (0.1, 0.2, 0.4, 0.5, float("nan"))] == \
        ["skewed", "single", "single", "multiple", "multiple"]
    t = torch.tensor([0.1, 0.3, 0.7])
    assert [bool(sel.decide_tensor(v)) for v in t] == [False, True, False]
    assert [bool(sel.skewed_tensor(v)) for v in t] == [True, False, False]
    assert dk.ThresholdSelector(0.5).skewed_tensor(t[0]) is None
    other = dk.ThresholdSelector(1.0)
    other.load_state_dict(sel.state_dict())
    assert other.low == 0.2 and "low=0.2" in repr(other)
    for bad in (0.5, 0.7, float("nan"), math.inf):
        with pytest.raises(ValueError, match="low"):
            dk.ThresholdSelector(0.5, low=bad)


def test_layer_skewed_blend_and_state():
    layer = dk.FusedDABN(4, weights=((0.0, 1.0, 0.0), (0.6, 0.4, 0.0), (1.0, 0.0, 0.0)), shrink_k=None)
    wants = {"single": [0.0, 1.0, 0.0], "multiple": [0.6, 0.4, 0.0], "skewed": [1.0, 0.0, 0.0]}
    for decision, want in wants.items():
        layer.set_decision(decision)
        assert layer.blend().tolist() == pytest.approx(want)
    layer.set_decision(torch.tensor(False), torch.tensor(True))
    assert layer.blend().tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert layer.skewed.item() and "blend_skewed" in layer.state_dict() and "skewed" in layer.state_dict()
    # a checkpoint from before the skewed decision (or a plain BatchNorm2d) still loads strictly
    old = {k: v for k, v in layer.state_dict().items() if k not in ("blend_skewed", "skewed")}
    fresh = dk.FusedDABN(4)
    fresh.load_state_dict(old, strict=True)
    assert fresh.blend_skewed.tolist() == pytest.approx([0.6, 0.4, 0.0])      # = its multiple blend
    with pytest.raises(ValueError, match="skewed"):
        dk.FusedDABN(4, weights=((0.0, 1.0, 0.0), (0.6, 0.4, 0.0), (2.0, 0.0, 0.0)))


def test_datta_skewed_decision_sync_free_and_not():
    x = torch.randn(8, 1, 10, 10)
    for daft in (False, True):
        a = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(1e6, low=1e5),
                     daft=daft, backend="reference")
        a(x)
        assert a.last_decision == SKEWED
        assert all(bool(lyr.skewed) or i < 1 for i, lyr in enumerate(a.layers))
        assert a.n_updates == 0       # DAFT only on single batches


# ---------------------------------------------------------------- the cut search
def test_decide_codes():
    s = np.array([0.0, 0.1, 0.2, 0.3, np.nan])
    assert _decide(s, 0.1, 0.3).tolist() == [0, 1, 1, 2, 2]
    assert DECISIONS == ("skewed", "single", "multiple")


def test_best_band_separable_types():
    """Perfectly separated scores and decisions that are right only for their type: the cuts
    fall between the groups, each in the middle of its gap."""
    scores = np.array([0.1, 0.15, 0.4, 0.45, 0.8, 0.9])
    kinds = np.array(["sorted", "sorted", "single", "single", "mixed", "mixed"])
    acc = {"skewed": np.array([1, 1, 0, 0, 0, 0.]), "single": np.array([0, 0, 1, 1, 0, 0.]),
           "multiple": np.array([0, 0, 0, 0, 1, 1.])}
    low, high, obj = _best_band(scores, acc, kinds)
    assert obj == 1.0 and 0.15 < low < 0.4 and 0.45 < high < 0.8
    assert _best_band(scores, acc, kinds, allow_low=False)[0] == -math.inf
    # when skewed batches do as well under "single", no low cut is set
    acc["single"] = np.array([1, 1, 1, 1, 0, 0.])
    assert _best_band(scores, acc, kinds)[0] == -math.inf


def test_validation_batches_types():
    dom = _domains()
    val = _batches(dom, 8, 6, torch.Generator().manual_seed(0))
    assert {k: len(v) for k, v in val.items()} == {k: 6 for k in KINDS}
    for _, y in val["sorted"]:
        assert torch.equal(y, y.sort().values)          # consecutive slice of a label-sorted domain
    assert all(x.shape == (8, 1, 10, 10) for k in KINDS for x, _ in val[k])


# ---------------------------------------------------------------- calibrate end to end
def test_calibrate_returns_a_configured_datta():
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 0.2, 0.4))
    model = _model()
    source = copy.deepcopy(model)
    adapter = calibrate(model, _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid)
    rep = adapter.calibration
    assert isinstance(adapter, dk.DATTA) and adapter.score_mode == "dispersion"
    assert rep.instance_mode in INSTANCE_MODES and set(rep.modes) == set(INSTANCE_MODES)
    assert {rep.single_blend, rep.multiple_blend, rep.skewed_blend} <= set(grid)
    assert isinstance(adapter.selector, dk.ThresholdSelector)
    assert adapter.selector.threshold == rep.threshold and adapter.selector.low == rep.low
    assert adapter.daft == rep.daft and adapter.score_layer == rep.score_layer == "4"
    for layer in adapter.layers:
        assert layer.cluster == INSTANCE_MODES[rep.instance_mode]["cluster"]
        assert layer.blend_single.tolist() == pytest.approx(rep.single_blend)
        assert layer.blend_skewed.tolist() == pytest.approx(rep.skewed_blend)
    text = str(rep)
    assert "datta_cal for batch size 8" in text and "oracle (true type)" in text and "DAFT" in text
    assert set(rep.as_dict()) >= {"single_blend", "threshold", "low", "decision_table", "daft_table"}
    # every choice is a maximum of the validation numbers the report shows
    table = rep.blend_table
    assert table[rep.multiple_blend]["mixed"] == max(v["mixed"] for v in table.values())
    assert table[rep.single_blend]["single"] == max(v["single"] for v in table.values())
    assert table[rep.skewed_blend]["sorted"] == max(v["sorted"] for v in table.values())
    # an oracle bound: the same configuration, another selector
    oracle = rep.adapter(copy.deepcopy(source), selector=dk.ThresholdSelector(1e9), backend="reference")
    assert oracle.score_layer == rep.score_layer and oracle.selector.threshold == 1e9
    adapter(torch.randn(8, 1, 10, 10))
    assert adapter.last_decision in ("single", "multiple", "skewed")


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty"), ({"a": (torch.zeros(4, 1, 5, 5), torch.zeros(4, dtype=torch.int64))}, "fewer than"),
    ({"a": (torch.zeros(9, 5, 5), torch.zeros(9, dtype=torch.int64))}, "float"),
    ({"a": (torch.zeros(9, 1, 5, 5), torch.zeros(9))}, "integer")])
def test_calibrate_bad_domains(bad, match):
    with pytest.raises(ValueError, match=match):
        calibrate(_model(), bad, batch_size=8)
