"""``Calibration.save`` / ``load`` and the demo's calibration cache (``eval.cal_cache``)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import datta_kernels.eval.cal_cache as cal_cache
from datta_kernels.calibration import SAVE_FORMAT, SAVE_VERSION, Calibration, calibrate
from datta_kernels.diversity import ClassProbe
from datta_kernels.eval.models import write_checksum

from .test_calibrate import _domains, _model

GRID = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 0.2, 0.4))
SETTINGS = {"n_batches": 4, "backend": "reference", "grid": GRID, "lr": (2e-3, 5e-4), "seed": 0}


@pytest.fixture(scope="module")
def report() -> Calibration:
    return calibrate(_model(), _domains(), batch_size=8, **SETTINGS).calibration


def _same(a: Calibration, b: Calibration) -> None:
    assert a.as_dict() == b.as_dict()
    assert (a.probe is None) == (b.probe is None)
    if a.probe is not None:
        sa, sb = a.probe.state_dict(), b.probe.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_runs_the_same_adapter(report, tmp_path):
    path = tmp_path / "cal.pt"
    report.save(path)
    assert not (tmp_path / "cal.pt.tmp").exists()
    doc = torch.load(path, weights_only=True)       # plain values and tensors only
    assert doc["format"] == SAVE_FORMAT and doc["version"] == SAVE_VERSION
    loaded = Calibration.load(path)
    _same(report, loaded)
    assert report.probe is not None and loaded.probe is not report.probe
    # tables keyed by blend tuples come back as tuples (not lists or strings)
    assert set(loaded.blend_table) == set(report.blend_table)
    assert all(isinstance(k, tuple) for k in loaded.blend_table)
    assert isinstance(loaded.pre_blend, tuple) and loaded.low == report.low
    a = report.adapter(_model(), backend="reference")
    b = loaded.adapter(_model(), backend="reference")
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 3.0, 0.3, 1.0):
        x = torch.randn(8, 1, 10, 10, generator=g) * scale
        assert torch.equal(a(x), b(x)) and a.last_decision == b.last_decision


def test_save_writes_plain_values_only(report, tmp_path):
    odd = dataclasses.replace(report, threshold=np.float32(0.25), hard_domains=np.array(["a"]).tolist())
    odd.save(tmp_path / "np.pt")
    assert Calibration.load(tmp_path / "np.pt").threshold == pytest.approx(0.25)
    bad = dataclasses.replace(report, decision_table={"x": torch.ones(2)})
    with pytest.raises(TypeError, match="field 'decision_table' holds a Tensor"):
        bad.save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda d: {"something": "else"}, "not a saved datta_kernels Calibration"),
    (lambda d: {**d, "version": SAVE_VERSION + 1}, "format version"),
    (lambda d: {**d, "fields": {**d["fields"], "new_choice": 1}}, r"fields \['new_choice'\] unknown"),
    (lambda d: {**d, "fields": {k: v for k, v in d["fields"].items() if k != "threshold"}},
     r"\['threshold'\] missing"),
    (lambda d: {**d, "probe": {**d["probe"], "version": ClassProbe._version - 1}}, "class probe is version"),
])
def test_load_refuses_what_it_cannot_read(report, tmp_path, edit, match):
    report.save(tmp_path / "cal.pt")
    doc = torch.load(tmp_path / "cal.pt", weights_only=True)
    torch.save(edit(doc), tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=match):
        Calibration.load(tmp_path / "edited.pt")


def test_key_covers_every_input():
    model, domains = _model(), _domains()
    base = cal_cache.calibration_key(model, domains, 8, **SETTINGS)
    assert cal_cache.calibration_key(copy.deepcopy(model), copy.deepcopy(domains), 8, **SETTINGS) == base
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        other_model[1].running_var[0] += 1e-6          # a BN statistic, not only the weights
    nudged = dict(domains)
    x, y = domains["noisy"]
    nudged["noisy"] = (x.clone().index_put_((torch.tensor(0),), x[0] + 1e-6), y)
    relabelled = {**domains, "noisy": (x, y.roll(1))}
    renamed = {("noisy2" if k == "noisy" else k): v for k, v in domains.items()}
    keys = [cal_cache.calibration_key(other_model, domains, 8, **SETTINGS),
            cal_cache.calibration_key(model, nudged, 8, **SETTINGS),
            cal_cache.calibration_key(model, relabelled, 8, **SETTINGS),
            cal_cache.calibration_key(model, renamed, 8, **SETTINGS),
            cal_cache.calibration_key(model, domains, 16, **SETTINGS)]
    for key, value in (("seed", 1), ("lr", (1e-3,)), ("n_batches", 5), ("backend", "cpu"),
                       ("grid", GRID[:2])):
        keys.append(cal_cache.calibration_key(model, domains, 8, **{**SETTINGS, key: value}))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        keys.append(cal_cache.calibration_key(model, domains, 8, **SETTINGS))
    finally:
        torch.set_num_threads(threads)
    assert base not in keys and len(set(keys)) == len(keys)
    assert len(cal_cache.code_fingerprint()) == 64


def test_code_change_misses_the_cache(monkeypatch):
    model, domains = _model(), _domains()
    base = cal_cache.calibration_key(model, domains, 8, **SETTINGS)
    monkeypatch.setattr(cal_cache, "code_fingerprint", lambda: "another version of the library")
    assert cal_cache.calibration_key(model, domains, 8, **SETTINGS) != base


def test_cached_calibrate_computes_once_then_loads(report, tmp_path, monkeypatch):
    calls = []

    def fake(model, domains, batch_size, **kw):       # calibrate's result, counted
        calls.append(kw)
        return type("Adapter", (), {"calibration": report})()

    monkeypatch.setattr(cal_cache, "calibrate", fake)
    model, domains = _model(), _domains()
    before = copy.deepcopy(model.state_dict())
    first, info = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **SETTINGS)
    assert info["source"] == "calibrated" and "why" not in info and len(calls) == 1 and calls[0] == SETTINGS
    second, info2 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **SETTINGS)
    assert info2 == {**info, "source": "cache"} and len(calls) == 1
    _same(first, second)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # other inputs: another file, calibrated
    _, info3 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **{**SETTINGS, "seed": 1})
    assert info3["source"] == "calibrated" and info3["path"] != info["path"] and len(calls) == 2
    # asked to recalibrate: calibrated again and rewritten
    _, info4 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", refresh=True, **SETTINGS)
    assert info4["source"] == "calibrated" and info4["why"] == "recalibrate requested" and len(calls) == 3
    # a damaged file: refused by its checksum, calibrated again
    path = tmp_path / "c" / info["path"].split("/")[-1]
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    _, info5 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **SETTINGS)
    assert info5["source"] == "calibrated" and info5["why"].startswith("checksum mismatch")
    assert len(calls) == 4
    _, info6 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **SETTINGS)
    assert info6["source"] == "cache" and len(calls) == 4
    # a file this version cannot read (its checksum verifies): calibrated again
    doc = torch.load(path, weights_only=True)
    torch.save({**doc, "version": SAVE_VERSION + 1}, path)
    write_checksum(path)
    _, info7 = cal_cache.cached_calibrate(model, domains, 8, cache=tmp_path / "c", **SETTINGS)
    assert info7["source"] == "calibrated" and "unreadable" in info7["why"] and len(calls) == 5
