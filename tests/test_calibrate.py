"""``datta_kernels.calibrate`` (datta_cal) and the pieces it adds: the ``skewed`` decision of the
layers and of ``ThresholdSelector(low=...)``, the cut search, the report."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import adapt
from datta_kernels.calibration import (
    DECISIONS,
    INSTANCE_MODES,
    KINDS,
    STREAM_BLEND,
    _batch_families,
    _batches,
    _best_band,
    _best_skew_rule,
    _climb,
    _decide,
    _families,
    _held_out_probes,
    _held_out_spreads,
    _streams,
    calibrate,
    default_batches,
    mixing_groups,
)
from datta_kernels.diversity import SKEWED, ClassProbe, prediction_spread


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


def _shift64(mean_i, var_i, source_mean, source_var, eps, signed: bool = False) -> float:
    """SPEC §6's source shift in float64 numpy: the symmetric KL divergence between the
    per-channel Gaussians of the batch (pooled instance moments) and of the source, averaged
    over channels; ``signed``: with the sign of the channel mean of log(batch var / source var)."""
    m, v = mean_i.double().numpy(), var_i.double().numpy()
    mb = m.mean(0)
    a = v.mean(0) + ((m - mb) ** 2).mean(0) + eps
    b = source_var.double().numpy() + eps
    kl_ab = 0.5 * (a / b + (mb - source_mean.double().numpy()) ** 2 / b - 1 + np.log(b / a))
    kl_ba = 0.5 * (b / a + (mb - source_mean.double().numpy()) ** 2 / a - 1 + np.log(a / b))
    shift = float((kl_ab + kl_ba).mean())
    return -shift if signed and np.log(a / b).mean() < 0 else shift


def _objective(got: np.ndarray, kinds: np.ndarray) -> float:
    """The objective the cut searches maximise, written out as SPEC §6 states it: the mean over
    the batch types present of the mean accuracy of each type's batches."""
    return float(np.mean([got[kinds == k].mean() for k in KINDS if (kinds == k).any()]))


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
        with pytest.raises(AttributeError, match="fixed at construction"):
            a.daft = not daft         # a late switch would leave the optimizer / decision path stale


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


def test_best_band_matches_brute_force():
    rng = np.random.default_rng(1)
    n = 24
    kinds = np.array(KINDS * (n // 3))
    scores = rng.random(n)
    acc = {d: rng.random(n) for d in DECISIONS}
    low, high, obj = _best_band(scores, acc, kinds)
    table = np.stack([acc[d] for d in DECISIONS])

    def value(lo, hi):
        return _objective(np.choose(_decide(scores, lo, hi), table), kinds)
    assert value(low, high) == pytest.approx(obj)
    cuts = np.concatenate([[-math.inf, -1.0], np.sort(scores) + 1e-9, [2.0]])
    assert obj == pytest.approx(max(value(lo, hi) for lo in cuts for hi in cuts if hi > lo))
    assert default_batches(16) == 192 and default_batches(64) == 48 and default_batches(512) == 40


@pytest.mark.parametrize("peak, factors, limits, steps, tried", [
    (1.0, (0.5, 2.0), (0.0, math.inf), None, [0.5, 1.0, 2.0]),          # a maximum at the start
    (4.0, (0.5, 2.0), (0.0, math.inf), None, [0.5, 1.0, 2.0, 4.0, 8.0]),  # rises twice, then stops
    (0.125, (0.5, 2.0), (0.25, 8.0), None, [0.25, 0.5, 1.0, 2.0]),        # the lower limit stops it
    (64.0, (2.0,), (0.0, math.inf), 3, [1.0, 2.0, 4.0, 8.0]),             # at most `steps` values
    (2.0, (lambda v: v + 0.5,), (0.0, 2.5), None, [1.0, 1.5, 2.0, 2.5]),  # a callable move
    (64.0, (lambda v: v + 0.5,), (0.0, 2.0), None, [1.0, 1.5, 2.0]),      # ... within the limits
])
def test_climb_steps_while_the_mean_rises(peak, factors, limits, steps, tried):
    def value(v):
        return {"a": -abs(math.log2(v / peak)), "b": 0.0}
    runs = {1.0: value(1.0)}
    calls = []
    _climb(runs, 1.0, factors, lambda v: calls.append(v) or value(v), limits, steps)
    assert sorted(runs) == tried and len(calls) == len(tried) - 1


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
    adapter = calibrate(model, _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                        lr=(2e-3, 5e-4), daft_objective="margin")
    rep = adapter.calibration
    assert isinstance(adapter, dk.DATTA) and adapter.score_mode == "dispersion"
    assert rep.instance_mode in INSTANCE_MODES and set(rep.modes) == set(INSTANCE_MODES)
    assert {rep.single_blend, rep.multiple_blend, rep.skewed_blend} <= set(grid)
    assert isinstance(adapter.selector, dk.ThresholdSelector)
    assert adapter.selector.threshold == rep.threshold and adapter.selector.low == rep.low
    assert adapter.daft == rep.daft and adapter.score_layer == rep.score_layer == "4"
    pre = [n for n, _ in adapter.model.named_modules()].index(rep.score_layer)
    assert rep.pre_blend in grid and rep.score_layer == "4"
    for i, layer in enumerate(adapter.layers):
        assert layer.cluster == INSTANCE_MODES[rep.instance_mode]["cluster"]
        if i == 0:      # before the score layer: the pre blend whatever the decision (the
            #             single slot, read only by DAFT's second forward, on step 5b's choice)
            assert layer.blend_single.tolist() == pytest.approx(rep.pre_single_blend or rep.pre_blend)
            for blend in (layer.blend_multiple, layer.blend_skewed):
                assert blend.tolist() == pytest.approx(rep.pre_blend)
        else:
            assert layer.blend_single.tolist() == pytest.approx(rep.single_blend)
            assert layer.blend_multiple.tolist() == pytest.approx(rep.multiple_blend)
            assert layer.blend_skewed.tolist() == pytest.approx(rep.skewed_blend)
    assert pre > 0
    # the pre blend: step 2b's best two (its mean over the batch types; ties: grid order), each
    # through steps 2c-4d; the better mean over the four validation streams without DAFT wins
    means = {w: np.mean(list(v.values())) for w, v in rep.pre_table.items()}
    ranked = sorted(grid, key=lambda w: (-means[w], grid.index(w)))
    assert set(means) == set(grid) and list(rep.pre_streams) == ranked[:dk.calibration.PRE_CANDIDATES] == \
        ranked[:2]
    on_streams = [np.mean(list(rep.pre_streams[w].values())) for w in ranked[:2]]
    assert rep.pre_blend == ranked[int(np.argmax(on_streams))]
    assert rep.pre_streams[rep.pre_blend] == {k: v for k, v in rep.daft_table["off"].items() if k != "hard"}
    assert set(rep.as_dict()["pre_streams"]) == {",".join(map(str, w)) for w in ranked[:2]}
    assert rep.modes[rep.instance_mode] == max(rep.modes.values())
    assert adapter.selector.skew_cut == rep.skew_cut and adapter.selector.shift_cut == rep.shift_cut
    # the shift range: the signed source shift at the score layer of every validation batch
    # calibrate saw, the cuts' batches and the streams' (recomputed here in float64 from the
    # layer's instance statistics)
    val = _batches(_domains(), 8, 4, torch.Generator().manual_seed(0))
    xs, _, streams = _streams(_domains(), 8, 0)
    seen = [x for k in KINDS for x, _ in val[k]] + [xs[idx] for b in streams.values() for idx in b]
    look = rep.adapter(copy.deepcopy(source), selector=dk.ThresholdSelector(1e9), backend="reference")
    shifts = []
    for x in seen:
        look(x)
        layer = look.layers[look._score_at]
        shifts.append(_shift64(*layer.last_stats, layer.source_mean, layer.source_var, layer.eps,
                               signed=True))
    # (this fixture's streams reach beyond the cuts' batches, so the streams' part is checked)
    n_cut = sum(len(val[k]) for k in KINDS)
    assert max(shifts[n_cut:]) > max(shifts[:n_cut]) or min(shifts[n_cut:]) < min(shifts[:n_cut])
    # the range: most negative and most positive signed shift, 0 always inside
    assert rep.shift_cut == pytest.approx((min(0.0, min(shifts)), max(0.0, max(shifts))), rel=1e-5)
    assert f"{rep.shift_cut[0]:.4g} <= shift <= {rep.shift_cut[1]:.4g}" in str(rep)
    assert "shift range" in str(rep)
    assert isinstance(adapter.class_probe, ClassProbe) and adapter.class_probe is not rep.probe
    # the rule is the better of the two candidates on the validation streams (ties: the first)
    means = [np.mean(list(v.values())) for v in rep.rule_table.values()]
    assert len(means) == 2 and list(rep.rule_table)[int(np.argmax(means))] == \
        dk.calibration.rule_name(rep.threshold, rep.low, rep.skew_cut, rep.shift_cut)
    assert set(next(iter(rep.rule_table.values()))) == {"single", "mixed", "dynamic", "sorted"}
    text = str(rep)
    assert "datta_cal for batch size 8" in text and "oracle (true type)" in text and "DAFT" in text
    assert "score + spread" in text and "decision rule:" in text and "before the score layer" in text
    assert set(rep.as_dict()) >= {"single_blend", "threshold", "low", "decision_table", "daft_table"}
    # DAFT off or on at a candidate rate, or with the entropy filter: the best smallest margin
    # over the validation streams and the hard stream against the best plain alternative on
    # each, then the best mean (ties: off, then no filter, then the smaller rate), and the
    # adapter runs the chosen setting
    five = {"single", "mixed", "dynamic", "sorted", "hard"}
    assert rep.daft_objective == "margin" and list(rep.rival_table) == list(dk.calibration.RIVALS)
    assert all(set(v) == five for v in rep.rival_table.values())
    # the source rival is the source model itself on the stream (computed here directly)
    xs_, ys_, st_ = _streams(_domains(), 8, 0, ("single",))
    plain_model = copy.deepcopy(source).eval()
    with torch.no_grad():
        right = sum(int((plain_model(xs_[i]).argmax(1) == ys_[i]).sum()) for i in st_["single"])
    assert rep.rival_table["source"]["single"] == pytest.approx(100.0 * right / len(xs_))
    best_rival = {k: max(v[k] for v in rep.rival_table.values()) for k in five}

    def score(row):
        acc = rep.daft_table[row]
        return (min(acc[k] - best_rival[k] for k in five), np.mean(list(acc.values())))
    plain = ["off", "on, lr 0.0005", "on, lr 0.002"]
    assert list(rep.daft_table)[:3] == plain
    filtered = [k for k in rep.daft_table if k.endswith("filter 0.4")]
    top = max((5e-4, 2e-3), key=lambda r: (score(f"on, lr {r:g}"), -r))
    assert filtered[0] == f"on, lr {top:g}, filter 0.4"          # the filter from the best plain rate
    keys = plain + filtered
    assert all(set(rep.daft_table[k]) == five for k in keys)
    assert rep.hard_domains and len(rep.hard_domains) == 1        # ceil(3 / 3) of the 3 domains
    daft_means = [score(k) for k in keys]
    setting = [(False, 5e-4, None), (True, 5e-4, None), (True, 2e-3, None)] + \
        [(True, float(k.split("lr ")[1].split(",")[0]), 0.4) for k in filtered]
    pick = min(range(len(keys)), key=lambda i: (tuple(-v for v in daft_means[i]), setting[i][2] is not None,
                                                setting[i][0], setting[i][1]))
    assert (rep.daft, rep.lr, rep.entropy_filter) == pytest.approx(setting[pick])
    assert adapter.daft == rep.daft and (not rep.daft or adapter.optimizer.param_groups[0]["lr"] == rep.lr)
    assert adapter.entropy_filter == rep.entropy_filter
    assert "daft on, lr 0.002" in text and ("DAFT off" in text or f"DAFT on at lr {rep.lr:g}" in text)
    assert "the best smallest margin over the validation streams" in text and "  tent " in text
    assert f"margin {score('off')[0]:+5.1f}" in text
    # then, with DAFT on, step 5b (the layers before the score layer on the single blend in the
    # second forward, when that blend differs from theirs: kept only if its mean is higher), and
    # the chosen setting on multiple batches too: kept only if its mean is higher
    if rep.daft:
        extra = [f"{keys[pick]}, pre single {dk.calibration._fmt(rep.single_blend)}"] \
            if rep.single_blend != rep.pre_blend else []
        assert list(rep.daft_table)[len(keys):len(keys) + len(extra)] == extra
        best = max([daft_means[pick]] + [score(k) for k in extra])
        assert (rep.pre_single_blend is not None) == (best > daft_means[pick])
        plus = f"{extra[0] if rep.pre_single_blend is not None else keys[pick]}, +multiple"
        assert list(rep.daft_table) == keys + extra + [plus]
        assert rep.daft_multiple == (score(plus) > best)
        assert adapter.daft_pre_single == (rep.pre_single_blend is not None)
    else:
        assert list(rep.daft_table) == keys and not rep.daft_multiple
    assert adapter.daft_multiple == rep.daft_multiple
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


@pytest.mark.parametrize("gain,want", [(0.5, True), (0.0, False), (-0.5, False)])
def test_calibrate_daft_on_multiple_batches_only_when_it_raises_the_mean(monkeypatch, gain, want):
    """Step 5's last candidate: with DAFT on, the chosen rate on ``multiple`` batches too,
    kept only when its mean over the validation streams is higher (a tie keeps single
    batches only).  The streams' accuracies are stubbed so that DAFT on wins at 5e-4."""
    def fake(adapter, x, y, batches, probes=None):
        if not adapter.daft:
            return 50.0
        rate = adapter.optimizer.param_groups[0]["lr"]
        return (60.0 if rate == 5e-4 else 55.0) + (gain if adapter.daft_multiple else 0.0)
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    adapter = calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                        lr=(2e-3, 5e-4), daft_objective="mean")
    rep = adapter.calibration
    assert rep.daft and rep.lr == 5e-4
    # 5e-4 at an end: 2.5e-4 tried; the filter from 5e-4 ties it (no filter kept), 1e-3 is worse
    assert list(rep.daft_table) == ["off", "on, lr 0.00025", "on, lr 0.0005", "on, lr 0.002",
                                    "on, lr 0.0005, filter 0.4", "on, lr 0.001, filter 0.4",
                                    "on, lr 0.0005, +multiple"]
    assert rep.entropy_filter is None
    assert rep.daft_multiple == want == adapter.daft_multiple
    assert ("single and multiple batches" if want else "on at lr 0.0005, single batches") in str(rep)


@pytest.mark.parametrize("peak,lrs,want", [
    (8e-3, (5e-4, 1e-3, 2e-3), [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]),   # up to the peak, one past it
    (1e-3, (5e-4, 1e-3, 2e-3), [5e-4, 1e-3, 2e-3]),                       # inside: no extra rate
    (1.25e-4, (5e-4, 1e-3), [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3]),      # below: halved
    (1.0, (5e-4, 1e-3), [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),                 # at most RATE_STEPS more
    (8e-3, (2e-3,), [2e-3]),                                             # one rate: the user's
])
def test_calibrate_follows_a_best_rate_past_the_end_of_the_candidates(monkeypatch, peak, lrs, want):
    """Step 5: with several candidate rates, a best rate at either end is no maximum: the rate is
    doubled (or halved) while the mean over the validation streams rises, at most RATE_STEPS
    times.  The streams' accuracies are stubbed: DAFT off 50 %, on a peak at ``peak``
    (log-distance), DAFT on multiple batches never better."""
    def fake(adapter, x, y, batches, probes=None):
        if not adapter.daft:
            return 50.0
        return 60.0 - abs(math.log2(adapter.optimizer.param_groups[0]["lr"] / peak)) \
            - (1.0 if adapter.daft_multiple else 0.0) - (10.0 if adapter.entropy_filter else 0.0)
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    assert dk.calibration.RATE_STEPS == 3
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    rep = calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                    lr=lrs, daft_objective="mean").calibration
    rates = [float(k.split("lr ")[1]) for k in rep.daft_table
             if k.startswith("on") and "+" not in k and "filter" not in k]
    assert rates == pytest.approx(want)
    best = max(want, key=lambda r: (-abs(math.log2(r / peak)), -r))
    assert rep.daft and rep.lr == pytest.approx(best) and not rep.daft_multiple


@pytest.mark.parametrize("peak,gain,want,chosen", [
    (1e-3, 1.0, [1e-3, 2e-3], 1e-3),                 # the filter at the plain rate wins
    (4e-3, 1.0, [1e-3, 2e-3, 4e-3, 8e-3], 4e-3),      # doubled while the mean rises
    (1.0, 10.0, [1e-3, 2e-3, 4e-3, 8e-3], 8e-3),      # at most RATE_STEPS doublings
    (1e-3, 0.0, [1e-3, 2e-3], None),                  # a tie keeps the plain entropy loss
])
def test_calibrate_chooses_the_entropy_filter_on_the_validation_streams(monkeypatch, peak, gain, want,
                                                                        chosen):
    """Step 5: EATA's reliable-sample filter (bound FILTER_BOUND ln K) at the best plain rate,
    then doubled while the mean over the validation streams and the hard stream rises, at most
    RATE_STEPS times; chosen only when it beats every plain rate (ties: no filter).  Stubbed
    accuracies: plain DAFT 55 % at its one rate 1e-3; filtered ``55 + gain`` at ``peak``,
    less one point per octave away."""
    def fake(adapter, x, y, batches, probes=None):
        if not adapter.daft:
            return 50.0
        rate = adapter.optimizer.param_groups[0]["lr"]
        if adapter.entropy_filter is None:
            return 55.0 - (1.0 if adapter.daft_multiple else 0.0)
        assert adapter.entropy_filter == dk.calibration.FILTER_BOUND == 0.4
        return 55.0 + gain - abs(math.log2(rate / peak)) - (1.0 if adapter.daft_multiple else 0.0)
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    adapter = calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                        lr=1e-3, daft_objective="mean")
    rep = adapter.calibration
    rates = [float(k.split("lr ")[1].split(",")[0]) for k in rep.daft_table if k.endswith("filter 0.4")]
    assert rates == pytest.approx(want)
    assert rep.daft and rep.entropy_filter == (None if chosen is None else 0.4)
    assert rep.lr == pytest.approx(1e-3 if chosen is None else chosen)
    assert adapter.entropy_filter == rep.entropy_filter and adapter.optimizer.param_groups[0]["lr"] == rep.lr
    assert ("entropy filter 0.4 ln K" in str(rep)) == (chosen is not None)
    # the last candidate, on multiple batches too, is the chosen setting's
    assert list(rep.daft_table)[-1].endswith(", +multiple") and not rep.daft_multiple
    assert (", filter 0.4, +multiple" in list(rep.daft_table)[-1]) == (chosen is not None)
    if chosen is not None:
        assert "entropy_filter=0.4" in repr(adapter)


def test_calibrate_hard_stream_is_the_least_accurate_domains(monkeypatch):
    """Step 5's hard stream: a single-domain stream over the ceil(D / 3) validation domains on
    which the configuration without DAFT is least accurate (each domain on a fresh adapter),
    every image of them once; the DAFT table's rows carry it and rank by the mean over five
    streams.  With fewer than three domains there is no hard stream."""
    doms = _domains() | {"dark": (_domains()["clean"][0] * 0.1, _domains()["clean"][1]),
                         "flipped": (_domains()["clean"][0].flip(-1), _domains()["clean"][1])}
    x_of = {k: v[0] for k, v in doms.items()}
    acc = {"clean": 90.0, "shifted": 40.0, "noisy": 60.0, "dark": 30.0, "flipped": 80.0}

    def fake(adapter, x, y, batches, probes=None):
        got = torch.cat([x[i] for i in batches])
        for k, xd in x_of.items():      # a one-domain stream: that domain's accuracy
            if got.shape == xd.shape and torch.equal(got.sort(0).values, xd.sort(0).values):
                return acc[k]
        return 70.0 if adapter.daft else 65.0
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    rep = calibrate(_model(), doms, batch_size=8, n_batches=4, backend="reference", grid=grid,
                    lr=1e-3, daft_objective="mean").calibration
    assert rep.hard_domains == ["shifted", "dark"]           # ceil(5 / 3) = 2, in the order given
    x, y, one = dk.calibration._streams({k: doms[k] for k in rep.hard_domains}, 8, 0, ("single",))
    assert sorted(torch.cat(one["single"]).tolist()) == list(range(48))     # every image once
    assert list(one) == ["single"] and len(x) == 48
    assert all(list(row) == ["single", "mixed", "dynamic", "sorted", "hard"]
               for row in rep.daft_table.values())
    assert "hard stream (shifted, dark" in str(rep)
    two = calibrate(_model(), {k: doms[k] for k in ("clean", "noisy")}, batch_size=8, n_batches=4,
                    backend="reference", grid=grid, lr=1e-3, daft_objective="mean").calibration
    assert two.hard_domains == [] and all("hard" not in row for row in two.daft_table.values())


@pytest.mark.parametrize("objective,want,extended", [("mean", 2e-3, True), ("margin", 1e-3, False)])
def test_calibrate_ranks_daft_by_its_worst_margin_against_the_rivals(monkeypatch, tmp_path, objective,
                                                                     want, extended):
    """Step 5's ``margin`` objective: each DAFT setting's smallest margin over the five
    validation streams, each against the best of the plain alternatives (source, tbn, bn_adapt,
    Tent at the middle candidate rate, DYN) on that stream, then the mean.  Stubbed: a fast rate
    gains on the hard stream what it loses on the single-domain one, where Tent is strong; the
    mean takes 2e-3 (and tries 4e-3 past the end), the margin 1e-3 (a maximum inside: smallest
    margins -5, -3, -1, -3 for off, 5e-4, 1e-3, 2e-3)."""
    doms = _domains()
    full = dk.calibration._streams(doms, 8, 0)[2]
    single = {"off": 70.0, 5e-4: 72.0, 1e-3: 73.0, 2e-3: 71.0, 4e-3: 69.0}
    hard = {"off": 50.0, 5e-4: 52.0, 1e-3: 54.0, 2e-3: 60.0, 4e-3: 61.0}
    rivals = {"source": 40.0, "tbn": 60.0, "bn_adapt": 58.0, "tent": 74.0, "dyn": 62.0}
    tent_rates = []

    def which(x, batches):
        if x.shape[0] != sum(len(v[0]) for v in doms.values()):
            return "hard"
        return next(k for k, b in full.items() if len(b) == len(batches)
                    and all(torch.equal(p, q) for p, q in zip(b, batches)))

    def fake(adapter, x, y, batches, probes=None):
        name = which(x, batches)
        if not isinstance(adapter, dk.DATTA):
            kind = {adapt.Source: "source", adapt.TBN: "tbn", adapt.BNAdapt: "bn_adapt",
                    adapt.Tent: "tent", adapt.DYN: "dyn"}[type(adapter)]
            if kind == "tent":
                tent_rates.append(adapter.optimizer.param_groups[0]["lr"])
            if name == "single":
                return rivals[kind]
            return (55.0 if kind == "tent" else 40.0) if name == "hard" else 60.0
        key = adapter.optimizer.param_groups[0]["lr"] if adapter.daft else "off"
        penalty = 5.0 * (adapter.entropy_filter is not None) + 5.0 * adapter.daft_multiple
        return {"single": single, "hard": hard}.get(name, {key: 65.0})[key] - penalty
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    rep = calibrate(_model(), doms, batch_size=8, n_batches=4, backend="reference", grid=grid,
                    lr=(5e-4, 1e-3, 2e-3), daft_objective=objective).calibration
    assert rep.daft and rep.lr == want and rep.entropy_filter is None and not rep.daft_multiple
    assert ("on, lr 0.004" in rep.daft_table) == extended
    assert rep.daft_objective == objective
    if objective == "mean":
        assert rep.rival_table == {} and tent_rates == [] and "margin" not in str(rep)
    else:
        assert set(tent_rates) == {1e-3}            # Tent at the middle candidate rate
        assert rep.rival_table["tent"] == {"single": 74.0, "mixed": 60.0, "dynamic": 60.0, "sorted": 60.0,
                                           "hard": 55.0}
        assert "the best smallest margin" in str(rep) and "margin  -1.0" in str(rep)
    rep.save(tmp_path / "cal.pt")
    again = dk.Calibration.load(tmp_path / "cal.pt")
    assert again.daft_objective == objective and again.rival_table == rep.rival_table
    # a file saved before the fields existed reads as the mean objective without rivals
    doc = torch.load(tmp_path / "cal.pt", weights_only=True)
    del doc["fields"]["daft_objective"], doc["fields"]["rival_table"]
    torch.save(doc, tmp_path / "old.pt")
    old = dk.Calibration.load(tmp_path / "old.pt")
    assert old.daft_objective == "mean" and old.rival_table == {}


def test_calibrate_bad_objective():
    with pytest.raises(ValueError, match="daft_objective"):
        calibrate(_model(), _domains(), batch_size=8, daft_objective="median")


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty"), ({"a": (torch.zeros(4, 1, 5, 5), torch.zeros(4, dtype=torch.int64))}, "fewer than"),
    ({"a": (torch.zeros(9, 5, 5), torch.zeros(9, dtype=torch.int64))}, "float"),
    ({"a": (torch.zeros(9, 1, 5, 5), torch.zeros(9))}, "integer")])
def test_calibrate_bad_domains(bad, match):
    with pytest.raises(ValueError, match=match):
        calibrate(_model(), bad, batch_size=8)


@pytest.mark.parametrize("lr", [0.0, -1e-3, (), (1e-3, float("nan")), float("inf")])
def test_calibrate_bad_rates(lr):
    with pytest.raises(ValueError, match="lr must be"):
        calibrate(_model(), _domains(), batch_size=8, lr=lr)


# ---------------------------------------------------------------- the prediction spread
def test_prediction_spread_values_and_errors():
    k = 5
    assert float(prediction_spread(torch.zeros(7, k))) == 0.0              # same probabilities
    one_class = torch.full((7, k), -30.0)
    one_class[:, 2] = 30.0
    assert float(prediction_spread(one_class)) < 1e-6                     # one shared class
    each = torch.full((10, k), -30.0)
    each[torch.arange(10), torch.arange(10) % k] = 30.0
    assert float(prediction_spread(each)) == pytest.approx(1.0, abs=1e-6)  # confident, balanced
    logits = torch.randn(9, k, dtype=torch.float64)
    p = logits.softmax(1).numpy()
    want = p.std(axis=0).sum() / math.sqrt(k - 1)
    assert float(prediction_spread(logits)) == pytest.approx(want, rel=1e-6)
    assert float(prediction_spread(torch.zeros(1, k))) == 0.0
    for bad in (torch.zeros(3), torch.zeros(0, 4), torch.zeros(3, 1), torch.zeros(3, 4, dtype=torch.int64)):
        with pytest.raises(ValueError):
            prediction_spread(bad)


def test_held_out_spreads_use_probes_fitted_without_the_family():
    """Each sample's logits come from the probe fitted without its family: a family whose
    classes are placed differently from the others' is classified poorly by it, and its batch's
    spread is that of the held-out probe, not of the probe fitted on everything."""
    g = torch.Generator().manual_seed(0)
    k, c = 3, 2
    y = torch.arange(300) % k
    fam = torch.arange(300) // 100                       # three families of 100 samples
    centers = torch.randn(3, k, 2 * c, generator=g) * 4  # class centres differ per family
    feats = centers[fam, y] + 0.1 * torch.randn(300, 2 * c, generator=g)
    batch = [feats[fam == 2][:12]]
    got = _held_out_spreads(_held_out_probes(feats, y, fam, k), batch, [torch.full((12,), 2)], k)
    held = ClassProbe.fit(feats[fam != 2], y[fam != 2], k)
    assert got[0] == pytest.approx(float(prediction_spread(held.logits(batch[0]))), rel=1e-6)
    full = ClassProbe.fit(feats, y, k)
    assert got[0] != pytest.approx(float(prediction_spread(full.logits(batch[0]))), rel=1e-3)
    assert _families(["clean", "fog@1", "fog@5", "snow@2", "clean2"]) == [0, 1, 1, 2, 3]


def test_rule_name_reads_as_the_selector_decides():
    """The rule in words: one skew clause, two joined by "or" (the selector's rule), the shift
    limit on the whole skew condition."""
    rn = dk.calibration.rule_name
    assert rn(1.0, -math.inf, None) == "multiple if score >= 1; else single"
    assert rn(1.0, -math.inf, None, 2.0) == "multiple if score >= 1; else single"
    assert rn(1.0, 0.5, None, 2.0) == \
        "multiple if score >= 1; skewed if score < 0.5 and |shift| <= 2; else single"
    assert rn(1.0, 0.5, None, (-3.0, 2.0)) == \
        "multiple if score >= 1; skewed if score < 0.5 and -3 <= shift <= 2; else single"
    assert rn(1.0, -math.inf, 0.3) == "multiple if score >= 1; skewed if spread < 0.3; else single"
    assert rn(1.0, 0.5, 0.3, (-3.0, 2.0)) == ("multiple if score >= 1; skewed if (score < 0.5 or spread "
                                              "< 0.3) and -3 <= shift <= 2; else single")
    sel = dk.ThresholdSelector(1.0, 0.5, 0.3, (-3.0, 2.0))    # what the words say
    assert sel.update(0.4, 0.9, 1.0) == "skewed" and sel.update(0.7, 0.2, -2.5) == "skewed"
    assert sel.update(0.7, 0.9, 1.0) == "single" and sel.update(0.4, 0.2, 3.0) == "single"
    assert sel.update(0.4, 0.2, -3.5) == "single"


def test_class_probe_features_match_float64():
    """SPEC §6's probe features in float64: source-standardised, then centred on the batch
    (``centred=False``: before the centring)."""
    g = torch.Generator().manual_seed(0)
    mean_i, var_i = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g) + 0.1
    sm, sv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    m, v, a, b = (t.double().numpy() for t in (mean_i, var_i, sm, sv))
    raw = np.concatenate([(m - a) / np.sqrt(b + 1e-5), 0.5 * np.log((v + 1e-5) / (b + 1e-5))], axis=1)
    got = ClassProbe.features(mean_i, var_i, sm, sv, 1e-5).double().numpy()
    np.testing.assert_allclose(got, raw - raw.mean(axis=0), rtol=1e-5, atol=1e-6)
    got_raw = ClassProbe.features(mean_i, var_i, sm, sv, 1e-5, centred=False).double().numpy()
    np.testing.assert_allclose(got_raw, raw, rtol=1e-5, atol=1e-6)


def test_class_probe_spread_ignores_a_shift_every_sample_shares():
    """The batch-centred features make the spread blind to what a domain shift does to every
    sample alike (a per-channel offset of the instance means, a per-channel factor on the
    instance variances), on the C++ op and the torch ops; a label-sorted batch stays low."""
    g = torch.Generator().manual_seed(3)
    k, c = 4, 3
    y = torch.arange(400) % k
    centers_m, centers_v = torch.randn(k, c, generator=g) * 2, torch.rand(k, c, generator=g) + 0.5
    mean_i = centers_m[y] + 0.3 * torch.randn(400, c, generator=g)
    var_i = centers_v[y] * (1 + 0.1 * torch.rand(400, c, generator=g))
    sm, sv = torch.zeros(c), torch.ones(c)
    feats = torch.cat([ClassProbe.features(mean_i[i:i + 16], var_i[i:i + 16], sm, sv, 1e-5)
                       for i in range(0, 400, 16)])
    probe = ClassProbe.fit(feats, y, k)
    iid, one = slice(0, 16), (y == 2).nonzero().flatten()[:16]
    offset, factor = torch.randn(c, generator=g) * 5, torch.rand(c, generator=g) * 4 + 2
    for spread in (probe, probe.spread_reference):
        base = spread(mean_i[iid], var_i[iid], sm, sv, 0.0)
        moved = spread(mean_i[iid] + offset, var_i[iid] * factor, sm, sv, 0.0)
        torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-5)
        assert float(base) > 0.6
        assert float(spread(mean_i[one] + offset, var_i[one] * factor, sm, sv, 0.0)) < 0.3 * float(base)


def test_class_probe_refuses_a_version_1_state_dict():
    """A probe saved before the features were centred on the batch (ClassProbe version 1)
    does not load silently into the current one."""
    probe = ClassProbe(3, 4)
    state = probe.state_dict()
    state._metadata[""]["version"] = 1
    with pytest.raises(RuntimeError, match="re-run datta_kernels.calibrate"):
        ClassProbe(3, 4).load_state_dict(state)
    assert probe.state_dict()._metadata[""]["version"] == 2
    ClassProbe(3, 4).load_state_dict(probe.state_dict())
    # inside an adapter's state dict (what users save) too
    m = dk.convert_model(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3),
                                       nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(3, 4)).eval(), "datta")
    adapter = dk.DATTA(m, preset=None, selector=dk.ThresholdSelector(0.5, skew_cut=0.3),
                       class_probe=ClassProbe(3, 4), score_mode="dispersion", daft=False)
    adapter(torch.randn(4, 1, 10, 10))
    state = adapter.state_dict()
    state._metadata["class_probe"]["version"] = 1
    with pytest.raises(RuntimeError, match="class_probe: this probe was saved"):
        adapter.load_state_dict(state)


def test_batch_families_take_the_family_of_most_samples():
    """A stream batch's family is that of most of its samples (ties: the smaller family index),
    its indices counted into the domains concatenated in order."""
    doms = {k: (torch.zeros(n, 1, 2, 2), torch.zeros(n)) for k, n in (("a@1", 4), ("b@1", 3), ("a@2", 2))}
    family = dict(zip(doms, _families(list(doms))))
    assert family == {"a@1": 0, "b@1": 1, "a@2": 0}
    batches = [torch.tensor([0, 1, 4]), torch.tensor([4, 5, 7]), torch.tensor([4, 7, 8, 5]),
               torch.tensor([2, 6])]
    # [a, a, b] -> a; [b, b, a] -> b; [b, a, a, b] -> tie -> a; [a, b] -> tie -> a
    assert _batch_families(doms, family, batches) == [0, 1, 0, 0]


def test_stream_accuracy_decides_each_batch_with_its_probe():
    """``_stream_accuracy(..., probes)`` swaps the adapter's class probe before each batch: the
    spread the rule read on the last batch is the last probe's, not the first's."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 16, generator=g)
    first = ClassProbe.fit(feats, torch.arange(60) % 3, 3)
    last = ClassProbe.fit(feats, torch.randint(0, 3, (60,), generator=g), 3)
    adapter = dk.DATTA(_model(), preset=None, selector=dk.ThresholdSelector(1e9, skew_cut=0.5),
                       class_probe=copy.deepcopy(first), score_mode="dispersion", daft=False,
                       backend="reference")
    x, y = _domains()["noisy"]
    batches = [torch.arange(0, 8), torch.arange(8, 16)]
    acc = dk.calibration._stream_accuracy(adapter, x, y, batches, [first, last])
    assert 0.0 <= acc <= 100.0 and adapter.class_probe is last
    layer = adapter.layers[adapter._score_at]
    stats = (*layer.last_stats, layer.source_mean, layer.source_var, layer.eps)
    assert float(adapter.last_spread) == pytest.approx(float(last(*stats)), rel=1e-5)
    assert float(adapter.last_spread) != pytest.approx(float(first(*stats)), rel=1e-3)


@pytest.mark.parametrize("held_out", [True, False])
def test_calibrate_runs_the_streams_with_held_out_probes(monkeypatch, tmp_path, held_out):
    """``calibrate(held_out_streams=True)`` (the default) decides each batch of the validation
    streams of steps 4-5 with the probe fitted without its family (the family of most of its
    samples), as step 3b's cut does; with False, every batch meets the deployed probe.  The
    adapter always carries the deployed probe; the report says which, and a saved file keeps it."""
    fitted = []
    real = dk.calibration._held_out_probes

    def spy(*args, **kw):
        fitted.append(real(*args, **kw))
        return fitted[-1]
    calls = []

    def fake(adapter, x, y, batches, probes=None):
        calls.append((len(x), batches, probes))
        return 50.0 + (5.0 if adapter.daft else 0.0)
    monkeypatch.setattr(dk.calibration, "_held_out_probes", spy)
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", fake)
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    adapter = calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                        held_out_streams=held_out)
    rep = adapter.calibration
    assert rep.held_out_streams is held_out
    assert fitted and all(set(d) == {0, 1, 2} for d in fitted)     # three families, each held out
    pooled = [c for c in calls if c[0] == 72]                        # the four streams (and the hard one)
    assert pooled
    for _, batches, probes in calls:
        if not held_out:
            assert probes is None
            continue
        assert probes is not None and len(probes) == len(batches)
    for _, batches, probes in pooled if held_out else []:
        for b, p in zip(batches, probes):
            fam = int(torch.bincount(b // 24).argmax())              # 24 images a domain, in order
            assert any(p is d[fam] for d in fitted)
            assert p is not rep.probe
    # the adapter's own probe is the one fitted on every family (never a held-out one)
    assert all(not any(adapter.class_probe is p for p in d.values()) for d in fitted)
    assert torch.equal(adapter.class_probe.weight, rep.probe.weight)
    text = str(rep)
    assert ("fitted without its corruption family" in text) is held_out
    rep.save(tmp_path / "cal.pt")
    assert dk.Calibration.load(tmp_path / "cal.pt").held_out_streams is held_out
    with pytest.raises(TypeError, match="held_out_streams"):
        calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                  held_out_streams="yes")


def test_class_probe_fit_separates_label_skewed_batches():
    """Classes planted in the features: the fitted probe classifies them, an i.i.d. batch has a
    high spread and a one-class batch a low one; forward = spread of logits(features)."""
    g = torch.Generator().manual_seed(0)
    k, c = 4, 3
    y = torch.arange(400) % k
    centers = torch.randn(k, 2 * c, generator=g) * 3
    feats = centers[y] + torch.randn(400, 2 * c, generator=g)
    probe = ClassProbe.fit(feats, y, k)
    assert float((probe.logits(feats).argmax(1) == y).float().mean()) > 0.9
    iid, one = feats[:16], feats[y == 1][:16]
    assert float(prediction_spread(probe.logits(iid))) > 0.7
    assert float(prediction_spread(probe.logits(one))) < 0.3
    mean_i, var_i = torch.randn(8, c, generator=g), torch.rand(8, c, generator=g) + 0.1
    sm, sv = torch.zeros(c), torch.ones(c)
    by_ops = prediction_spread(probe.logits(ClassProbe.features(mean_i, var_i, sm, sv, 1e-5)))
    torch.testing.assert_close(probe(mean_i, var_i, sm, sv, 1e-5), by_ops, rtol=1e-5, atol=1e-6)
    assert torch.equal(probe.spread_reference(mean_i, var_i, sm, sv, 1e-5),
                       prediction_spread(probe.logits(ClassProbe.features(mean_i, var_i, sm, sv, 1e-5))))
    assert set(probe.state_dict()) == {"center", "scale", "weight", "bias"}
    with pytest.raises(ValueError, match="not finite"):
        ClassProbe.fit(feats.clone().fill_(float("nan")), y, k)
    with pytest.raises(ValueError):
        probe.logits(torch.zeros(3, 2 * c + 1))


def _spread_float64(mean_i, var_i, sm, sv, eps, probe):
    """SPEC §6's probe spread in numpy float64, from the formula (not the library's code)."""
    m, v, a, b = (t.double().numpy() for t in (mean_i, var_i, sm, sv))
    f = np.concatenate([(m - a) / np.sqrt(b + eps),
                        0.5 * np.log((np.maximum(v, 0) + eps) / (b + eps))], axis=1)
    f -= f.mean(axis=0)
    ce, sc, w, bias = (t.double().numpy() for t in (probe.center, probe.scale, probe.weight, probe.bias))
    z = ((f - ce) / sc) @ w + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.std(axis=0).sum() / math.sqrt(w.shape[1] - 1)


@pytest.mark.skipif(bool(dk._ext.unavailable_reasons()), reason="needs the compiled extension")
@pytest.mark.parametrize("n, c, k", [(1, 3, 2), (2, 5, 10), (16, 16, 10), (64, 7, 3)])
def test_probe_spread_op_matches_float64(n, c, k):
    """The fused CPU op (what ClassProbe.forward runs on CPU) against the formula in float64 and
    the probe's own PyTorch ops; float16 statistics, a negative variance (clamped) and
    non-finite statistics (NaN out, as the torch ops give) included."""
    g = torch.Generator().manual_seed(n * 100 + c)
    probe = ClassProbe(c, k)
    with torch.no_grad():
        probe.center.copy_(torch.randn(2 * c, generator=g) * 0.1)
        probe.scale.copy_(torch.rand(2 * c, generator=g) + 0.5)
        probe.weight.copy_(torch.randn(2 * c, k, generator=g))
        probe.bias.copy_(torch.randn(k, generator=g))
    mean_i, var_i = torch.randn(n, c, generator=g) * 2, torch.rand(n, c, generator=g) * 3
    var_i[0, 0] = -1e-7                                     # rounding can leave a tiny negative
    sm, sv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    got = torch.ops.datta._probe_spread(mean_i, var_i, sm, sv, 1e-5, probe.center, probe.scale,
                                        probe.weight, probe.bias)
    assert got.dtype == torch.float32 and got.shape == ()
    want = _spread_float64(mean_i, var_i, sm, sv, 1e-5, probe)
    assert abs(float(got) - want) <= 1e-6 + 1e-6 * abs(want)
    torch.testing.assert_close(probe(mean_i, var_i, sm, sv, 1e-5), got)
    torch.testing.assert_close(got, probe.spread_reference(mean_i, var_i, sm, sv, 1e-5), rtol=1e-5, atol=1e-6)
    half = torch.ops.datta._probe_spread(mean_i.half(), var_i.half(), sm, sv, 1e-5, probe.center,
                                         probe.scale, probe.weight, probe.bias)
    want_half = _spread_float64(mean_i.half().float(), var_i.half().float(), sm, sv, 1e-5, probe)
    assert abs(float(half) - want_half) <= 1e-6 + 1e-6 * abs(want_half)
    bad = mean_i.clone()
    bad[0, 0] = float("nan")
    assert math.isnan(float(probe(bad, var_i, sm, sv, 1e-5)))
    assert math.isnan(float(probe.spread_reference(bad, var_i, sm, sv, 1e-5)))
    torch.library.opcheck(torch.ops.datta._probe_spread,
                          (mean_i, var_i, sm, sv, 1e-5, probe.center, probe.scale, probe.weight, probe.bias))
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.datta._probe_spread(mean_i, var_i, sm, sv, 1e-5, probe.center, probe.scale,
                                      probe.weight[:-1], probe.bias)
    with pytest.raises(RuntimeError, match="center must be"):
        torch.ops.datta._probe_spread(mean_i, var_i, sm, sv, 1e-5, probe.center[:-1], probe.scale,
                                      probe.weight, probe.bias)


@pytest.mark.parametrize("n, c", [(1, 3), (2, 5), (16, 16), (64, 7)])
def test_source_shift_matches_float64(n, c):
    """source_shift (on CPU the fused C++ op when built) and its PyTorch ops against SPEC §6's
    formula in float64; 0 at the source's own moments; float16 statistics; NaN propagates;
    the op passes opcheck and refuses mismatched shapes."""
    from datta_kernels.diversity import source_shift, source_shift_reference
    g = torch.Generator().manual_seed(n * 100 + c)
    mean_i, var_i = torch.randn(n, c, generator=g) * 2, torch.rand(n, c, generator=g) * 3
    sm, sv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    want = _shift64(mean_i, var_i, sm, sv, 1e-5)
    for fn in (source_shift, source_shift_reference):
        got = fn(mean_i, var_i, sm, sv, 1e-5)
        assert got.dtype == torch.float32 and got.shape == ()
        assert abs(float(got) - want) <= 1e-6 + 1e-5 * abs(want), fn
        # signed: the sign of the channel mean of log(batch var / source var), both directions
        for scale in (0.01, 1.0, 20.0):        # instance means and variances shrunk / grown
            mi, vi = mean_i * scale ** 0.5, var_i * scale
            w = _shift64(mi, vi, sm, sv, 1e-5, signed=True)
            assert (w < 0) == (scale < 1) or scale == 1.0
            got = fn(mi, vi, sm, sv, 1e-5, signed=True)
            assert abs(float(got) - w) <= 1e-6 + 1e-5 * abs(w), (fn, scale)
            assert float(got) == pytest.approx(float(fn(mi, vi, sm, sv, 1e-5)) * np.sign(w))
        half = fn(mean_i.half(), var_i.half(), sm, sv, 1e-5)
        assert float(half) == pytest.approx(_shift64(mean_i.half().float(), var_i.half().float(), sm, sv,
                                                     1e-5), rel=1e-5, abs=1e-6)
        bad = mean_i.clone()
        bad[0, 0] = float("nan")
        assert math.isnan(float(fn(bad, var_i, sm, sv, 1e-5)))
        # a batch with the source's pooled moments: zero shift
        one = torch.ones(n, c)
        assert float(fn(one * sm, one * sv, sm, sv, 1e-5)) == pytest.approx(0.0, abs=1e-6)
    if dk._ext.unavailable_reasons():
        return
    assert torch.equal(source_shift(mean_i, var_i, sm, sv, 1e-5),
                       torch.ops.datta._source_shift(mean_i, var_i, sm, sv, 1e-5))
    torch.library.opcheck(torch.ops.datta._source_shift, (mean_i, var_i, sm, sv, 1e-5))
    torch.library.opcheck(torch.ops.datta._source_shift, (mean_i * 0.1, var_i * 0.01, sm, sv, 1e-5, True))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.datta._source_shift(mean_i, var_i[:, :-1], sm, sv, 1e-5)
    with pytest.raises(RuntimeError, match="source statistics"):
        torch.ops.datta._source_shift(mean_i, var_i, sm[:-1], sv, 1e-5)


def test_threshold_selector_skew_cut():
    sel = dk.ThresholdSelector(0.5, skew_cut=0.6)
    assert sel.uses_spread and not dk.ThresholdSelector(0.5).uses_spread
    cases = [(0.1, 0.9, "single"), (0.1, 0.3, "skewed"), (0.7, 0.3, "multiple"), (0.7, 0.9, "multiple"),
             (0.1, None, "single"), (float("nan"), 0.3, "multiple"), (0.1, 0.6, "single")]
    for score, bal, want in cases:
        assert sel.update(score, spread=bal) == want
        b = None if bal is None else torch.tensor(bal)
        single = bool(sel.decide_tensor(torch.tensor(score), b))
        skewed = bool(sel.skewed_tensor(torch.tensor(score), b))
        assert (single, skewed) == (want == "single", want == "skewed"), (score, bal)
    both = dk.ThresholdSelector(0.5, low=0.2, skew_cut=0.6)
    assert both.update(0.1, spread=0.9) == "skewed" and both.update(0.3, spread=0.5) == "skewed"
    both.reset()                                      # forgets the stream, keeps the cuts
    assert both.last_decision is None and both.skew_cut == 0.6 and both.low == 0.2
    # the device-side rule (DATTA's sync-free path) against the rule written out in Python
    # floats, NaN/inf included; decide_tensor / skewed_tensor are its two halves
    nan, inf = float("nan"), float("inf")
    selectors = (dk.ThresholdSelector(0.5), dk.ThresholdSelector(0.5, low=0.2), sel, both,
                 dk.ThresholdSelector(0.5, shift_cut=1.0), dk.ThresholdSelector(0.5, low=0.2, shift_cut=1.0),
                 dk.ThresholdSelector(0.5, skew_cut=0.6, shift_cut=1.0),
                 dk.ThresholdSelector(0.5, low=0.2, skew_cut=0.6, shift_cut=1.0),
                 dk.ThresholdSelector(0.5, low=0.2, skew_cut=0.6, shift_cut=(-1.5, 0.5)),
                 dk.ThresholdSelector(0.5, skew_cut=0.6, shift_cut=(0.0, 1.0)))
    for s_ in selectors:
        cut, scut = s_.skew_cut, s_.shift_cut
        lo, hi = scut if scut is not None else (None, None)
        values = ((0.1, 0.3, 0.5, 0.7, nan, inf, -inf), (None, 0.3, 0.6, 0.9, nan),
                  (None, 0.5, 1.0, 2.0, -0.5, -1.0, -2.0, nan, inf, -inf))
        for score, bal, shift in itertools.product(*values):
            read = cut is not None and bal is not None
            can_skew = s_.low != -inf or read
            read_shift = scut is not None and shift is not None and can_skew
            ok = not (read and math.isnan(bal)) and not (read_shift and math.isnan(shift))
            skew = (score < s_.low or (read and bal < cut)) and (not read_shift or lo <= shift <= hi)
            want_skewed_flag = score < 0.5 and ok and skew
            want_single = score < 0.5 and ok and not skew
            want = "single" if want_single else "skewed" if want_skewed_flag else "multiple"
            never_skewed = s_.low == -inf and cut is None and scut is None
            b = None if bal is None else torch.tensor(bal)
            h = None if shift is None else torch.tensor(shift)
            t = torch.tensor(score)
            case = (s_, score, bal, shift)
            assert s_.update(score, spread=bal, shift=shift) == want, case
            got_single, got_skewed = s_.decide_tensors(t, b, h)
            assert bool(got_single) == want_single, case
            assert (got_skewed is None) == never_skewed, case
            assert got_skewed is None or bool(got_skewed) == want_skewed_flag, case
            assert bool(s_.decide_tensor(t, b, h)) == want_single
            assert (s_.skewed_tensor(t, b, h) is None) == never_skewed
    other = dk.ThresholdSelector(1.0)
    other.load_state_dict(both.state_dict())
    assert other.skew_cut == 0.6 and other.uses_spread and "skew_cut=0.6" in repr(other)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="skew_cut"):
            dk.ThresholdSelector(0.5, skew_cut=bad)
    guarded = dk.ThresholdSelector(0.5, skew_cut=0.6, shift_cut=2.0)      # a number c: [-c, c]
    assert guarded.shift_cut == (-2.0, 2.0)
    other.load_state_dict(guarded.state_dict())
    assert other.shift_cut == (-2.0, 2.0) and other.uses_shift and "shift_cut=(-2.0, 2.0)" in repr(other)
    ranged = dk.ThresholdSelector(0.5, skew_cut=0.6, shift_cut=(-3, 1.5))
    other.load_state_dict(ranged.state_dict())
    assert other.shift_cut == (-3.0, 1.5)
    old = guarded.state_dict() | {"shift_cut": 2.0}     # a state saved when the cut was a number
    other.load_state_dict(old)
    assert other.shift_cut == (-2.0, 2.0)
    assert not dk.ThresholdSelector(0.5, skew_cut=0.6).uses_shift
    for bad in (-1.0, float("nan"), float("inf"), (0.5, 1.0), (-1.0, -0.5), (-math.inf, 1.0), (1.0,),
                "wide", (-1.0, float("nan"))):
        with pytest.raises(ValueError, match="shift_cut"):
            dk.ThresholdSelector(0.5, shift_cut=bad)


def test_datta_reads_the_probe_spread_at_the_score_layer():
    """DATTA passes the probe's spread of the score layer's own instance statistics (recomputed
    here from that layer's input) to the selector; host and device decisions agree."""
    x = torch.randn(8, 1, 10, 10)
    probe = ClassProbe(8, 3)
    probe.weight.copy_(torch.randn(16, 3))
    with pytest.raises(ValueError, match="class_probe"):
        dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(1e6, skew_cut=0.5))
    seen = {}
    for daft in (False, True):
        for cut in (1e-3, 1.0):
            a = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(1e6, skew_cut=cut),
                         daft=daft, backend="reference", class_probe=copy.deepcopy(probe))
            layer = a.layers[1]
            hook = layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0].detach()))
            a(x)
            hook.remove()
            var, mean = torch.var_mean(seen["x"], dim=(2, 3), unbiased=True)       # SPEC D1
            want = probe(mean, var, layer.source_mean, layer.source_var, layer.eps)
            torch.testing.assert_close(a.last_spread, want, rtol=1e-4, atol=1e-5)
            assert a.last_decision == ("skewed" if float(want) < cut else "single"), (daft, cut)


def test_datta_limits_skewed_by_the_source_shift_at_the_score_layer():
    """With a shift cut, DATTA passes the score layer's signed source shift (``last_shift``,
    against a float64 rendering of SPEC §6) and a batch whose shift lies outside the cut's range
    is ``single``, not ``skewed``, on the host path (DAFT) and the device path alike; a range
    open on one side only limits that side."""
    probe = ClassProbe(8, 3)
    seen = set()
    x = torch.randn(8, 1, 10, 10) * 3 + 2
    for source_scale in (1e-3, 1e3):        # source variances far below / above the batch's
        model = _model()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(source_scale)
        for daft in (False, True):
            got, signs = {}, set()
            for shift_cut in (0.0, 1e9, (-1e9, 0.0), (0.0, 1e9)):
                a = dk.DATTA(copy.deepcopy(model), score_mode="dispersion", backend="reference", daft=daft,
                             selector=dk.ThresholdSelector(1e6, skew_cut=1.0, shift_cut=shift_cut),
                             class_probe=copy.deepcopy(probe))      # a zero probe: spread 0 < 1
                a(x)
                layer = a.layers[a._score_at]
                want = _shift64(*layer.last_stats, layer.source_mean, layer.source_var, layer.eps,
                                signed=True)
                assert want != 0 and float(a.last_shift) == pytest.approx(want, rel=1e-5)
                got[shift_cut] = a.last_decision
                signs.add(want > 0)
            assert len(signs) == 1
            grown = signs.pop()
            seen.add(grown)
            assert got == {0.0: "single", 1e9: "skewed", (-1e9, 0.0): "single" if grown else "skewed",
                           (0.0, 1e9): "skewed" if grown else "single"}, (daft, grown)
    assert seen == {True, False}                       # both directions exercised
    assert dk.DATTA(_model(), score_mode="dispersion", selector=0.5).last_shift is None


def test_best_skew_rule_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 30
    kinds = np.array(KINDS * (n // 3))
    scores, spread = rng.random(n), rng.random(n)
    acc = {d: rng.random(n) for d in DECISIONS}
    high, cut, obj = _best_skew_rule(scores, spread, acc, kinds)
    table = np.stack([acc[d] for d in DECISIONS])

    def value(hi, c):
        said = np.where(scores < hi, np.where(spread < c, 0, 1), 2)
        return _objective(np.choose(said, table), kinds)
    assert value(high, cut) == pytest.approx(obj)
    grid = np.concatenate([[-1.0], np.sort(scores) + 1e-9, [2.0]])
    best = max(value(h, c) for h in grid for c in np.concatenate([[-math.inf], np.sort(spread) + 1e-9]))
    assert obj == pytest.approx(best)


@pytest.mark.parametrize("bs", [8, 7])
def test_validation_streams_use_every_image_once(bs):
    dom = _domains(40)
    dom["short"] = (dom["noisy"][0][:22], dom["noisy"][1][:22])   # 22 = 3 * 7 + 1: a batch of one
    xs, ys, streams = _streams(dom, bs, seed=3)
    assert list(streams) == ["single", "mixed", "dynamic", "sorted"]
    sizes = [40, 40, 40, 22]
    starts = np.cumsum([0] + sizes)
    assert torch.equal(xs[starts[3]:], dom["short"][0]) and torch.equal(ys[: starts[1]], dom["clean"][1])
    domain_of = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    for name, batches in streams.items():
        flat = torch.cat(batches)
        dropped = len(ys) - len(flat)
        assert all(2 <= len(b) <= bs for b in batches)
        assert len(flat.unique()) == len(flat)                       # no image twice
        # every image once, save a left-over batch of one (its statistics are undefined): at
        # bs 7 the 22-image domain leaves one in the single-domain streams
        if name in ("single", "sorted"):
            assert dropped == (1 if bs == 7 else 0)
        else:
            assert dropped <= (1 if name == "mixed" else len(dom))
        if name in ("single", "sorted"):
            doms = [domain_of[b] for b in batches]
            assert all(len(d.unique()) == 1 for d in doms)           # one domain per batch
            order = [int(d[0]) for d in doms]
            assert order == sorted(order)                            # domains one after another
        if name == "sorted":
            for d in range(4):
                labels = torch.cat([ys[b] for b in batches if int(domain_of[b[0]]) == d])
                assert torch.equal(labels, labels.sort().values)
    again = _streams(dom, bs, seed=3)[2]
    assert all(torch.equal(a, b) for a, b in zip(streams["mixed"], again["mixed"]))


class _TorchRule(dk.ThresholdSelector):
    """The same rule on the torch-op path of ``decide_stats`` (the C++ op is used only for
    ``ThresholdSelector`` itself)."""


@pytest.mark.parametrize("n, c", [(1, 3), (2, 5), (16, 16)])
def test_threshold_decide_op_is_the_selectors_rule(n, c):
    """``datta::_threshold_decide`` (DATTA's CPU decision: probe spread, signed source shift and
    the rule in one op) gives ``ThresholdSelector.update`` / ``decide_tensors``' decision on the
    separate ops' values, bit for bit: every kind of selector, scores on both sides of and
    exactly at the threshold, spreads and shifts exactly at their cuts, NaN / inf statistics."""
    g = torch.Generator().manual_seed(n * 100 + c)
    mean_i = torch.randn(n, c, generator=g) * 0.5
    var_i = torch.rand(n, c, generator=g) * 2 + 0.1
    sm, sv = torch.randn(c, generator=g) * 0.2, torch.rand(c, generator=g) + 0.5
    probe = ClassProbe(c, 4)
    probe.weight.copy_(torch.randn(2 * c, 4, generator=g))
    probe.bias.copy_(torch.randn(4, generator=g))
    spread = float(probe(mean_i, var_i, sm, sv, 1e-5))
    shift = float(dk.diversity.source_shift(mean_i, var_i, sm, sv, 1e-5, signed=True))
    at_shift = (min(shift, 0.0), max(shift, 0.0))          # a range with the shift at one end
    nan = float("nan")
    bad_mean = mean_i.clone()
    bad_mean[0, 0] = nan
    bad_var = var_i.clone()
    bad_var[-1, -1] = float("inf")
    cut = spread if spread > 0 else 0.25                   # N = 1: spread 0
    rules = [dict(), dict(low=0.2), dict(skew_cut=cut), dict(skew_cut=min(1.0, cut * 1.5)),
             dict(skew_cut=cut * 0.5), dict(low=0.2, skew_cut=1.0), dict(shift_cut=at_shift),
             dict(skew_cut=1.0, shift_cut=at_shift), dict(skew_cut=1.0, shift_cut=abs(shift) * 0.5),
             dict(low=0.2, skew_cut=1.0, shift_cut=(-1e-9, 1e-9)), dict(skew_cut=1.0, shift_cut=1e9)]
    threshold = float(torch.tensor(0.3))                   # a float32 value: a score can equal it
    scores = (0.1, 0.25, threshold, 0.5, nan, float("inf"), -float("inf"))
    seen = set()
    for rule, score, (mi, vi), with_probe in itertools.product(
            rules, scores, ((mean_i, var_i), (bad_mean, var_i), (mean_i, bad_var)), (True, False)):
        fast, slow = dk.ThresholdSelector(threshold, **rule), _TorchRule(threshold, **rule)
        p = probe if with_probe else None
        s = torch.tensor(score)
        case = (rule, score, with_probe, mi is bad_mean, vi is bad_var)
        got = fast.decide_stats(s, mi, vi, sm, sv, 1e-5, p)
        want = slow.decide_stats(s, mi, vi, sm, sv, 1e-5, p)
        assert got[0] == want[0] == fast.last_decision, case
        seen.add(got[0])
        for a, b in zip(got[1:], want[1:]):                # the values it read, as the ops give them
            assert (a is None) == (b is None), case
            if a is not None:
                assert torch.equal(a, b) or (a.isnan() and b.isnan()), case
        on_dev = fast.decide_stats(s, mi, vi, sm, sv, 1e-5, p, on_device=True)[0]
        ref = slow.decide_stats(s, mi, vi, sm, sv, 1e-5, p, on_device=True)[0]
        assert bool(on_dev[0]) == bool(ref[0]) == (want[0] == "single"), case
        assert bool(on_dev[1]) == (want[0] == "skewed"), case
        assert ref[1] is None or bool(ref[1]) == bool(on_dev[1]), case
    assert seen == {"single", "multiple", "skewed"}
    args = (torch.tensor(0.1), mean_i, var_i, sm, sv, 1e-5, probe.center, probe.scale, probe.weight,
            probe.bias, threshold, -math.inf, 0.5, -1.0, 1.0)
    torch.library.opcheck(torch.ops.datta._threshold_decide, args)
    with pytest.raises(RuntimeError, match="all four probe tensors"):
        torch.ops.datta._threshold_decide(*args[:6], probe.center, None, *args[8:])
    with pytest.raises(RuntimeError, match="both ends"):
        torch.ops.datta._threshold_decide(*args[:-1], None)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.datta._threshold_decide(*args[:8], probe.weight[:-1], *args[9:])
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.datta._threshold_decide(args[0], mean_i, var_i[:, :-1], *args[3:])


def test_fused_score_layer_is_the_separate_ops(monkeypatch):
    """DATTA's fused CPU score layer (``datta::_dabn_decide_forward``: statistics, score, rule,
    decision writes and normalisation in one op) gives bit for bit what the separate ops give:
    logits, score, spread, shift, decisions, every layer's decision buffers and, under DAFT, the
    fine-tuned parameters; with DAFT off it decides without a host sync.  It is not taken on
    another backend, with clusters, or by another selector."""
    from datta_kernels import adapt

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 1, 10, 10, generator=g)
    stream = [torch.randn(8, 1, 10, 10, generator=g) * s + o for s, o in ((1, 0), (3, 1), (0.3, -1))]
    stream += [base[i % 2].expand(8, 1, 10, 10) + 0.05 * torch.randn(8, 1, 10, 10, generator=g)
               for i in range(2)]                                   # near-duplicate samples: low spread
    probe = ClassProbe(8, 3)
    probe.weight.copy_(torch.randn(16, 3, generator=g) * 3)
    weights = ((0.0, 1.0, 0.0), (0.2, 0.6, 0.2), (0.4, 0.0, 0.6))
    used = []
    real = adapt.DATTA._score_forward

    def spy(self, layer, x):
        try:
            y = real(self, layer, x)
        except adapt._FineTune:            # decided single under DAFT: fused, then run again
            used.append(True)
            raise
        used.append(y is not None)
        return y
    monkeypatch.setattr(adapt.DATTA, "_score_forward", spy)

    def make(rule, daft, shrink_k=None, stream=None):
        adapter = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(**rule),
                           daft=daft, lr=1e-2, class_probe=copy.deepcopy(probe), weights=weights,
                           shrink_k=shrink_k)
        for layer in adapter.layers:
            layer.set_stream(stream)        # SPEC §3c: the op folds at the score layer
        return adapter
    seen = set()
    for rule, daft, shrink_k, rate in itertools.product(
            (dict(threshold=0.5), dict(threshold=0.5, low=0.05), dict(threshold=0.5, skew_cut=0.5),
             dict(threshold=2.0, skew_cut=0.6, shift_cut=(-0.5, 0.5)), dict(threshold=2.0, skew_cut=1.0),
             dict(threshold=1e-3, skew_cut=1.0, shift_cut=3.0)), (False, True), (None, 0.5), (None, 0.3)):
        fused, plain = make(rule, daft, shrink_k, rate), make(rule, daft, shrink_k, rate)
        for x in stream:
            used.clear()
            got = fused(x)
            assert used == [True]
            with monkeypatch.context() as m:
                m.setattr(adapt, "_HAS_SCORE_OPS", False)
                want = plain(x)
            assert used[-1] is False
            case = (rule, daft, shrink_k, rate)
            assert torch.equal(got, want), case
            assert fused.last_decision == plain.last_decision, case
            seen.add(fused.last_decision)
            assert float(fused.last_score) == float(plain.last_score), case
            for name in ("last_spread", "last_shift"):
                a, b = getattr(fused, name), getattr(plain, name)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (case, name)
            for la, lb in zip(fused.layers, plain.layers):
                assert torch.equal(la.decision, lb.decision) and torch.equal(la.skewed, lb.skewed), case
                assert torch.equal(la.stream_mean, lb.stream_mean), case
                assert torch.equal(la.stream_var, lb.stream_var), case
        assert fused.n_updates == plain.n_updates, case
        for pa, pb in zip(fused.parameters(), plain.parameters()):
            assert torch.equal(pa, pb), case
    assert seen == {"single", "multiple", "skewed"}

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the adapter step")
    quiet = make(dict(threshold=2.0, skew_cut=0.6, shift_cut=3.0), False)
    quiet(stream[0])               # the layers check their blend values once (tolist on a CPU tensor)
    for x in stream:
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "cpu", "numpy", "tolist"):
                m.setattr(torch.Tensor, name, no_sync)
            quiet(x)
        assert quiet._last_decision_t is not None and used[-1] is True
    for kw in (dict(backend="reference"), dict(selector=dk.KDESelector())):
        other = dk.DATTA(_model(), score_mode="dispersion", weights=weights, shrink_k=None,
                         **({"selector": 0.5} | kw))
        used.clear()
        other(stream[0])
        assert used == [False], kw
    clustered = dk.DATTA(_model(), score_mode="dispersion", selector=0.5, cluster=True, shrink_k=None)
    used.clear()
    clustered(stream[0])
    assert used == [False]


def _calibrate_stubbed(monkeypatch, stream_accuracy):
    """``calibrate`` on the tiny model with the validation streams' accuracies stubbed by
    ``stream_accuracy(adapter, x, y, batches, probes)`` (DATTA adapters only: step 5 ranks by the mean,
    no rivals run) and a band rule that can say skewed (it wins the tie of step 4)."""
    monkeypatch.setattr(dk.calibration, "_stream_accuracy", stream_accuracy)
    monkeypatch.setattr(dk.calibration, "_best_band", lambda scores, acc, kinds, allow_low=True: (
        float(np.median(scores)) if allow_low else -math.inf, float(np.max(scores)) + 1, 0.0))
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 0.2, 0.4))
    return calibrate(_model(), _domains(), batch_size=8, n_batches=4, backend="reference", grid=grid,
                     daft_objective="mean")


@pytest.mark.parametrize("favour", [None, 0, 1])
def test_calibrate_chooses_the_pre_blend_on_the_validation_streams(monkeypatch, favour):
    """Step 2b ranks the blends of the layers before the score layer on its batches; the best
    PRE_CANDIDATES each go through steps 2c-4e and the validation streams without DAFT choose
    (ties: step 2b's order); the adapter's early layers carry the choice, the report shows it."""
    ranks = []

    def fake(adapter, x, y, batches, probes=None):
        pre = tuple(round(v, 1) for v in adapter.layers[0].blend_single.tolist())
        if not ranks:
            ranks.append(pre)               # step 2b's best is tried first
        elif pre not in ranks:
            ranks.append(pre)
        if adapter.daft:
            return 40.0
        return 50.0 + (5.0 if favour is not None and ranks.index(pre) == favour else 0.0)
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    means = {w: np.mean(list(v.values())) for w, v in rep.pre_table.items()}
    grid = list(rep.pre_table)
    ranked = sorted(grid, key=lambda w: (-means[w], grid.index(w)))
    assert ranks == ranked[:2] and list(rep.pre_streams) == ranked[:2]
    want = ranked[favour or 0]
    assert rep.pre_blend == want
    assert all(v == pytest.approx(55.0 if favour is not None else 50.0)
               for v in rep.pre_streams[want].values())
    assert adapter.layers[0].blend_single.tolist() == pytest.approx(want)
    assert adapter.layers[0].blend_multiple.tolist() == pytest.approx(want)
    text = str(rep)
    assert "the best 2 of them" in text
    assert sum(line.endswith("<- before the score layer") for line in text.splitlines()) == 2
    adapter(_domains()["noisy"][0][:8])
    adapter.reset()
    assert adapter.layers[0].blend_single.tolist() == pytest.approx(want)


@pytest.mark.parametrize("gain,want", [(0.5, True), (0.0, False), (-0.5, False)])
def test_calibrate_chooses_the_pre_single_blend_on_the_validation_streams(monkeypatch, tmp_path, gain,
                                                                          want):
    """Step 5b: with DAFT on, its second forward of a single batch with the layers before the
    score layer on the ``single`` blend (``DATTA(daft_pre_single=True)``), kept only when the
    mean over the validation streams and the hard stream rises (a tie keeps the pre blend);
    the adapter's early layers carry it in their single slot, the report and a saved file too.
    The pre blend is forced to (1, 0, 0) and the single blend to (0, 1, 0); the streams'
    accuracies are stubbed (DAFT on wins)."""
    search, behind = dk.calibration._search_blends, dk.calibration._blends_behind

    def first_pre(*args, **kw):
        found = search(*args, **kw)
        found["pre_ranked"] = [(1.0, 0.0, 0.0)]
        return found

    def batch_single(*args, **kw):
        return behind(*args, **kw) | {"single": (0.0, 1.0, 0.0)}
    monkeypatch.setattr(dk.calibration, "_search_blends", first_pre)
    monkeypatch.setattr(dk.calibration, "_blends_behind", batch_single)

    def fake(adapter, x, y, batches, probes=None):
        if not adapter.daft:
            return 50.0
        return 55.0 + (gain if adapter.daft_pre_single else 0.0) - (1.0 if adapter.daft_multiple else 0.0)
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    assert rep.daft and rep.pre_blend == (1.0, 0.0, 0.0) and rep.single_blend == (0.0, 1.0, 0.0)
    row = f"on, lr {rep.lr:g}, pre single (0.0, 1.0, 0.0)"
    assert row in rep.daft_table
    assert rep.pre_single_blend == ((0.0, 1.0, 0.0) if want else None)
    assert adapter.daft_pre_single == want
    assert list(rep.daft_table)[-1] == (row if want else f"on, lr {rep.lr:g}") + ", +multiple"
    assert not rep.daft_multiple
    pre = adapter.layers[0]
    assert pre.blend_single.tolist() == pytest.approx((0.0, 1.0, 0.0) if want else (1.0, 0.0, 0.0))
    assert pre.blend_multiple.tolist() == pytest.approx((1.0, 0.0, 0.0))
    assert ("in its second forward of a single batch" in str(rep)) == want
    rep.save(tmp_path / "cal.pt")
    again = dk.Calibration.load(tmp_path / "cal.pt")
    assert again.pre_single_blend == rep.pre_single_blend
    assert again.adapter(_model(), backend="reference").daft_pre_single == want
    # a file saved before the field existed reads as the pre blend there (None)
    doc = torch.load(tmp_path / "cal.pt", weights_only=True)
    del doc["fields"]["pre_single_blend"]
    torch.save(doc, tmp_path / "old.pt")
    old = dk.Calibration.load(tmp_path / "old.pt")
    assert old.pre_single_blend is None and not old.adapter(_model(), backend="reference").daft_pre_single


@pytest.mark.parametrize("peak,want,chosen", [
    (0.05, [0.025, 0.05, 0.1], 0.05),                        # the start is best: one step each way
    (0.0125, [0.0125, 0.025, 0.05, 0.1], 0.0125),           # halved while the mean rises (to 1/128)
    (0.3, [0.025, 0.05, 0.1, 0.2, 0.4], 0.4),                 # doubled up to STREAM_LIMITS
    (None, [0.025, 0.05, 0.1], None),                        # never above the source statistics
])
def test_calibrate_chooses_the_stream_momentum_on_the_validation_streams(monkeypatch, peak, want, chosen):
    """Step 4b: skewed batches on the source statistics or on the stream statistics (SPEC §3c)
    at a momentum found from STREAM_START by halving and doubling while the mean over the
    validation streams rises; ties: the source statistics.  The streams' accuracies are
    stubbed (DAFT off wins); the adapter's layers from the score layer on carry the choice,
    and ``reset`` keeps the calibrated configuration."""
    def fake(adapter, x, y, batches, probes=None):
        rate = adapter.layers[-1].stream_momentum
        if adapter.daft or rate is None:
            return 50.0
        # a reset never helps here (step 4c keeps none)
        worse = 0.0 if adapter.layers[-1].stream_reset is None else 1.0
        return 49.0 if peak is None else 55.0 - abs(math.log2(rate / peak)) - worse
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    tried = sorted(float(k.split("momentum ")[1]) for k in rep.stream_table
                   if k != "source" and "reset" not in k and "blend" not in k)
    assert tried == pytest.approx(want) and list(rep.stream_table)[0] == "source"
    assert rep.stream_momentum == (None if chosen is None else pytest.approx(chosen))
    assert rep.stream_reset is None and not rep.daft
    at = adapter._score_at
    for i, layer in enumerate(adapter.layers):
        assert layer.stream_momentum == (rep.stream_momentum if i >= at else None)
        if i >= at:
            want_skewed = STREAM_BLEND if chosen is not None else rep.skewed_blend
            assert layer.blend_skewed.tolist() == pytest.approx(want_skewed)
    text = str(rep)
    assert ("skewed batches on the stream statistics at momentum" in text) == (chosen is not None)
    adapter(_domains()["noisy"][0][:8])
    adapter.reset()
    for i, layer in enumerate(adapter.layers):
        assert layer.stream_momentum == (rep.stream_momentum if i >= at else None)
        assert layer.blend_single.tolist() == pytest.approx(rep.single_blend if i >= at else rep.pre_blend)
        assert torch.equal(layer.stream_mean, layer.source_mean)


@pytest.mark.parametrize("peak,want,chosen", [
    (None, [0.5, 1.0, 2.0], None),                          # no cut beats none: no reset
    (1.0, [0.5, 1.0, 2.0], 1.0),                             # the start is best: one step each way
    (0.25, [0.125, 0.25, 0.5, 1.0, 2.0], 0.25),              # halved while the mean rises
    (64.0, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], 16.0),           # doubled up to RESET_LIMITS
])
def test_calibrate_chooses_the_stream_reset_on_the_validation_streams(monkeypatch, peak, want, chosen):
    """Step 4c: with the stream statistics chosen, a reset cut on a batch's divergence from
    them, found from RESET_START by halving and doubling while the mean over the validation
    streams rises; ties: no reset.  Stubbed accuracies as in step 4b's test; the adapter's
    layers from the score layer on carry the cut (and DAFT's runs use it)."""
    seen = []

    def fake(adapter, x, y, batches, probes=None):
        rate, reset = adapter.layers[-1].stream_momentum, adapter.layers[-1].stream_reset
        seen.append((adapter.daft, reset))
        if adapter.daft or rate is None:
            return 50.0 if rate is None else 40.0
        base = 55.0 - abs(math.log2(rate / 0.05))
        if reset is None:
            return base
        return base - 1.0 if peak is None else base + 5.0 - abs(math.log2(reset / peak))
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    assert rep.stream_momentum == pytest.approx(0.05)
    tried = sorted(float(k.split("reset ")[1]) for k in rep.stream_table if "reset" in k and "blend" not in k)
    assert tried == pytest.approx(want)
    assert rep.stream_reset == (None if chosen is None else pytest.approx(chosen))
    assert {r for daft, r in seen if daft} == {rep.stream_reset}       # step 5 runs with the cut
    at = adapter._score_at
    for i, layer in enumerate(adapter.layers):
        assert layer.stream_reset == (rep.stream_reset if i >= at else None)
    text = str(rep)
    assert ("restarted by a batch whose divergence" in text) == (chosen is not None)
    assert rep.as_dict()["stream_reset"] == rep.stream_reset
    adapter(_domains()["noisy"][0][:8])
    adapter.reset()
    assert all(layer.stream_reset == rep.stream_reset for layer in adapter.layers[at:])


@pytest.mark.parametrize("peak,want,chosen", [
    (None, [0.2], 0.0),                                  # no batch weight beats none
    (0.4, [0.2, 0.4, 0.6], 0.4),                         # raised while the mean rises
    (5.0, [0.2, 0.4, 0.6, 0.8, 1.0], 1.0),               # up to the batch statistics alone
])
def test_calibrate_chooses_the_stream_blend_on_the_validation_streams(monkeypatch, peak, want, chosen):
    """Step 4d: with the stream statistics chosen, ``skewed`` batches take the blend
    ``(1 - b, b, 0)`` of the stream and the batch statistics, ``b`` raised from 0 by
    STREAM_BATCH_STEP while the mean over the validation streams rises (ties: the smaller);
    the adapter's layers from the score layer on carry it, step 5's runs use it, ``reset``
    keeps it."""
    seen = []

    def fake(adapter, x, y, batches, probes=None):
        layer = adapter.layers[-1]
        rate, b = layer.stream_momentum, float(layer.blend_skewed[1])
        seen.append((adapter.daft, rate, b))
        if adapter.daft or rate is None:
            return 50.0 if rate is None else 40.0
        base = 55.0 - abs(math.log2(rate / 0.05)) - (0.0 if layer.stream_reset is None else 1.0)
        return base - (5.0 * b if peak is None else 0.5 * abs(b - peak))
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    assert rep.stream_momentum == pytest.approx(0.05) and rep.stream_reset is None
    tried = sorted(float(k.split("blend (")[1].split(",")[1]) for k in rep.stream_table if "blend" in k)
    assert tried == pytest.approx(want)
    assert rep.stream_blend == pytest.approx((1.0 - chosen, chosen, 0.0))
    assert [b for daft, rate, b in seen if daft] == pytest.approx([chosen] * sum(d for d, _, _ in seen))
    at = adapter._score_at
    for layer in adapter.layers[at:]:
        assert layer.blend_skewed.tolist() == pytest.approx(rep.stream_blend)
    assert f"blend ({1 - chosen:.1f}, {chosen:.1f}, 0.0)" in str(rep)
    assert rep.as_dict()["stream_blend"] == rep.stream_blend
    adapter(_domains()["noisy"][0][:8])
    adapter.reset()
    assert all(lyr.blend_skewed.tolist() == pytest.approx(rep.stream_blend) for lyr in adapter.layers[at:])


@pytest.mark.parametrize("peak,want,chosen", [
    (None, [0.55, 0.6, 0.65], None),                      # no cut beats none: no check
    (0.6, [0.55, 0.6, 0.65], 0.6),                        # the start is best: one step each way
    (0.45, [0.4, 0.45, 0.5, 0.55, 0.6, 0.65], 0.45),      # lowered while the mean rises
    (1.5, [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0], 1.0),   # raised up to 1
])
def test_calibrate_chooses_the_output_check_on_the_validation_streams(monkeypatch, tmp_path, peak, want,
                                                                       chosen):
    """Step 4e: no output check, or a cut on the output's prediction spread found from
    RELEASE_START by lowering and raising it by RELEASE_STEP while the mean over the validation
    streams without DAFT rises (ties: no check); step 5's runs and the adapter carry it, the
    report and a saved file keep it, an oracle selector drops it."""
    seen = []

    def fake(adapter, x, y, batches, probes=None):
        cut = adapter.output_spread_cut
        seen.append((adapter.daft, cut))
        if adapter.daft:
            return 40.0
        if cut is None:
            return 50.0
        return 49.0 if peak is None else 55.0 - 2 * abs(cut - peak)
    adapter = _calibrate_stubbed(monkeypatch, fake)
    rep = adapter.calibration
    tried = sorted(float(k.split("cut ")[1]) for k in rep.release_table if k != "none")
    assert tried == pytest.approx(want) and list(rep.release_table)[0] == "none"
    assert rep.output_spread_cut == (None if chosen is None else pytest.approx(chosen))
    assert adapter.output_spread_cut == rep.output_spread_cut and not rep.daft
    assert {c for daft, c in seen if daft} == {rep.output_spread_cut}       # step 5 runs with it
    assert ("is forwarded again as single" in str(rep)) == (chosen is not None)
    rep.save(tmp_path / "cal.pt")
    again = dk.Calibration.load(tmp_path / "cal.pt")
    assert again.output_spread_cut == rep.output_spread_cut and again.release_table == rep.release_table
    assert again.adapter(_model(), backend="reference").output_spread_cut == rep.output_spread_cut
    oracle = rep.adapter(_model(), selector=dk.ThresholdSelector(1e9), backend="reference")
    assert oracle.output_spread_cut is None


def _severity_domains(n: int = 20) -> dict:
    """Clean images and two corruptions at two severities, named as the demo names them."""
    g = torch.Generator().manual_seed(5)
    y = torch.arange(n) % 3
    base = torch.randn(n, 1, 10, 10, generator=g) + y[:, None, None, None].float()
    out = {"clean_heldout": (base, y)}
    for sev in (1, 2):
        out[f"noise@{sev}"] = (base + sev * torch.randn(base.shape, generator=g), y)
        out[f"scale@{sev}"] = (base * (1 + sev), y)
    return out


def test_mixing_groups_by_severity_and_explicit():
    names = ["clean_heldout", "noise@1", "scale@1", "noise@2", "scale@2"]
    assert mixing_groups(names) is None and mixing_groups(names, "all") is None
    assert mixing_groups(names, "severity") == [["clean_heldout"], ["noise@1", "scale@1"],
                                                ["noise@2", "scale@2"]]
    # a name with "@" in its corruption part: the severity is what follows the last one
    assert mixing_groups(["a@b@1", "c@1", "d"], "severity") == [["a@b@1", "c@1"], ["d"]]
    groups = [["noise@1", "noise@2"], ["clean_heldout", "scale@1", "scale@2"]]
    assert mixing_groups(names, groups) == groups
    for bad in ([["noise@1"]], [names, ["noise@1"]], [names[:2], [], names[2:]], [names + ["other"]],
                "by-severity", 3):
        with pytest.raises(ValueError, match="mixing"):
            mixing_groups(names, bad)


@pytest.mark.parametrize("bs", [4, 7])
def test_validation_streams_mix_within_a_group(bs):
    dom = _severity_domains()
    names = list(dom)
    groups = mixing_groups(names, "severity")
    xs, ys, streams = _streams(dom, bs, seed=2, groups=groups)
    _, _, pooled = _streams(dom, bs, seed=2)
    sizes = [len(v[1]) for v in dom.values()]
    domain_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    group_of = torch.tensor([next(i for i, g in enumerate(groups) if n in g) for n in names])[domain_of]
    for name, batches in streams.items():
        flat = torch.cat(batches)
        assert len(flat.unique()) == len(flat) and all(2 <= len(b) <= bs for b in batches)
        assert len(ys) - len(flat) <= len(names)                 # every image once (save batches of one)
        # each batch within one group; the groups one after another
        owners = [group_of[b].unique() for b in batches]
        assert all(len(o) == 1 for o in owners)
        order = [int(o[0]) for o in owners]
        assert order == sorted(order)
        if name in ("mixed", "dynamic"):   # a mixed batch of a severity holds both of its corruptions
            assert any(len(domain_of[b].unique()) == 2 for b in batches)
        else:                              # single-domain streams: the same batches as without groups
            assert all(torch.equal(a, b) for a, b in zip(batches, pooled[name]))
    # one group of every domain is no grouping: the same batches as without
    _, _, one = _streams(dom, bs, seed=2, groups=[names])
    assert all(torch.equal(a, b) for k in one for a, b in zip(one[k], pooled[k]))
    assert [len(v) for v in one.values()] == [len(v) for v in pooled.values()]


def test_validation_batches_mix_within_a_group():
    dom = _severity_domains()
    names = list(dom)
    groups = mixing_groups(names, "severity")
    sizes = [len(v[1]) for v in dom.values()]
    domain_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    xs = torch.cat([v[0] for v in dom.values()])
    n = 6
    fam: dict = {}
    val = _batches(dom, 5, n, torch.Generator().manual_seed(0), fam, groups)
    assert all(len(v) == n for v in val.values())
    for i, (x, _) in enumerate(val["mixed"]):
        # which images: match each back to the pool (images are distinct)
        idx = torch.cdist(x.flatten(1), xs.flatten(1)).argmin(1)
        doms = {names[int(d)] for d in domain_of[idx]}
        # groups of two or more domains take turns; the clean images (a group of one) never mix
        assert doms <= set(groups[1 + i % 2]) and "clean_heldout" not in doms
    # no grouping: mixed batches may pool every domain; the other types do not depend on it
    plain = _batches(dom, 5, n, torch.Generator().manual_seed(0), None, [names])
    old = _batches(dom, 5, n, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[0], b[0]) for k in KINDS for a, b in zip(plain[k], old[k]))


def test_calibrate_with_severity_mixing_records_its_groups(tmp_path):
    grid = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 0.2, 0.4))
    dom = _severity_domains(24)
    adapter = calibrate(_model(), dom, batch_size=8, n_batches=4, backend="reference", grid=grid,
                        mixing="severity")
    rep = adapter.calibration
    assert rep.mixing == [["clean_heldout"], ["noise@1", "scale@1"], ["noise@2", "scale@2"]]
    assert "pool one group of domains at a time: clean_heldout | noise@1, scale@1 | noise@2, scale@2" \
        in str(rep)
    rep.save(tmp_path / "c.pt")
    assert dk.Calibration.load(tmp_path / "c.pt").mixing == rep.mixing
    assert calibrate(_model(), dom, batch_size=8, n_batches=4, backend="reference",
                     grid=grid).calibration.mixing is None
    with pytest.raises(ValueError, match="mixing"):
        calibrate(_model(), dom, batch_size=8, n_batches=4, backend="reference", grid=grid, mixing="rows")
