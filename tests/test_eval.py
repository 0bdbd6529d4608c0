"""datta_kernels.eval: idx loading, corruptions, streams, model cache, runner and report.

Everything runs on a tiny synthetic idx directory written into ``tmp_path``, so the Debian
``dataset-fashion-mnist`` package is needed only by the one test marked to skip without it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json

import numpy as np
import pytest
import torch

from datta_kernels import DATTA, ThresholdSelector
from datta_kernels.adapt import TBN, Tent
from datta_kernels.eval import datasets as ds
from datta_kernels.eval.corruptions import CORRUPTIONS, corrupt, corrupt_all
from datta_kernels.eval.models import (
    RECORDED_WEIGHTS,
    SmallResNet,
    TrainConfig,
    copy_note,
    load_or_train,
    weights_digest,
)
from datta_kernels.eval.oracle import OracleSelector
from datta_kernels.eval.report import CSV_FIELDS, format_tables, write_outputs
from datta_kernels.eval.runner import (
    DemoConfig,
    RunResult,
    detector_metrics,
    run_demo,
    run_lockstep,
    run_stream,
)
from datta_kernels.eval.streams import STREAMS, build_pool, make_stream

# Corruptions with no randomness: for them "another seed changes the output" does not apply.
DETERMINISTIC = {"defocus_blur", "gaussian_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                 "jpeg_compression"}
TINY_TRAIN = TrainConfig(width=4, epochs=1, train_subset=128, batch_size=32)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return ds.write_synthetic(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = ds.write_synthetic(tmp_path_factory.mktemp("small"), n_train=8, n_test=32)
    return ds.load_fashion_mnist(root).test_x


# --- datasets -----------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_idx_round_trip(tmp_path, gz, dtype):
    a = (np.arange(2 * 3 * 5) % 100).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    ds.write_idx(path, a)
    b = ds.read_idx(path)
    assert b.shape == a.shape and np.array_equal(b, a)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        ds.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="bytes"):
        ds.read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
def test_load_synthetic(tmp_path, gz):
    root = ds.write_synthetic(tmp_path, n_train=20, n_test=10, gz=gz)
    d = ds.load_fashion_mnist(root)
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and 0 <= d.train_x.min() and d.train_x.max() <= 1
    assert d.train_y.dtype == torch.int64 and d.test_y.max() < 10
    assert d.root == root


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ds.DataNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        ds.find_data_dir(tmp_path)
    assert "--data-dir" in str(e.value) and str(tmp_path) in str(e.value)
    monkeypatch.setenv(ds.ENV_VAR, str(ds.write_synthetic(tmp_path / "env", 4, 4)))
    assert ds.find_data_dir() == tmp_path / "env"


@pytest.mark.skipif(not all(p.is_dir() for p in ds.DEFAULT_DIRS[:1]),
                    reason="needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist():
    d = ds.load_fashion_mnist()
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.test_y).tolist() == [1000] * 10


# --- corruptions --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_contract(images, name):
    x = images[:16]
    y = corrupt(x, name, seed=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.005, "the corruption must visibly change the image"
    torch.testing.assert_close(corrupt(x, name, seed=3), y, rtol=0, atol=0)
    if name not in DETERMINISTIC:
        assert not torch.equal(corrupt(x, name, seed=4), y)


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "contrast", "pixelate"])
def test_severity_orders_damage(images, name):
    damage = [float((corrupt(images, name, s) - images).abs().mean()) for s in range(1, 6)]
    assert damage == sorted(damage)


def test_spatter_liquid_and_mud(images):
    """Severities 1-3 add translucent bright liquid (pixels only brighten), 4-5 opaque dark mud
    (covered pixels move to the mud's grey); the covered share grows within each mode."""
    from datta_kernels.eval.corruptions import _MUD
    covered = []
    for s in range(1, 6):
        out = corrupt(images, "spatter", s)
        assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        changed = (out - images).abs() > 1e-6
        covered.append(float(changed.float().mean()))
        if s <= 3:
            assert bool((out >= images - 1e-6).all())
        else:
            moved = out[changed] - _MUD
            assert float(moved.abs().mean()) < float((images[changed] - _MUD).abs().mean())
    assert covered[0] < covered[1] < covered[2] and covered[3] < covered[4]
    assert 0.01 < covered[0] and covered[4] < 0.9


def test_corruption_bad_arguments(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "rain")
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "fog", severity=6)
    with pytest.raises(ValueError, match="float"):
        corrupt(images[0], "fog")


def test_corrupt_all_independent_of_selection(images):
    full = corrupt_all(images[:4])
    part = corrupt_all(images[:4], ["fog", "elastic_transform"])
    assert set(full) == set(CORRUPTIONS) and list(part) == ["fog", "elastic_transform"]
    torch.testing.assert_close(full["fog"], part["fog"], rtol=0, atol=0)


# --- streams ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    n, names = 50, ["a", "b", "c"]
    y = torch.arange(n) % 10
    return build_pool({k: torch.full((n, 1, 2, 2), float(i)) for i, k in enumerate(names)}, y)


@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("name", STREAMS)
def test_stream_composition(pool, name, bs):
    s = make_stream(pool, name, bs, seed=1)
    flat = torch.cat(s.batches)
    assert torch.equal(flat.sort().values, torch.arange(len(pool))), "every sample exactly once"
    assert len(s.kinds) == len(s.domains) == len(s) and s.num_samples == len(pool)
    assert all(1 <= len(b) <= bs for b in s.batches)
    for b, kind, dom in zip(s.batches, s.kinds, s.domains):
        doms = set(pool.domain[b].tolist())
        if kind == "single":
            assert doms == {pool.names.index(dom)}
        else:
            assert kind == "mixed" and dom == "mixed"
    again = make_stream(pool, name, bs, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(s.batches, again.batches))
    assert not all(torch.equal(a, b) for a, b in zip(s.batches, make_stream(pool, name, bs, seed=2).batches))


def test_stream_kinds(pool):
    single = make_stream(pool, "single", 16)
    assert set(single.kinds) == {"single"}
    order = list(dict.fromkeys(single.domains))
    assert order == pool.names, "one corruption after another"
    noniid = make_stream(pool, "single_noniid", 16)
    for d in pool.names:
        labels = torch.cat([b for b, dom in zip(noniid.batches, noniid.domains) if dom == d])
        assert torch.equal(pool.y[labels], pool.y[labels].sort().values), "label-sorted in a domain"
    assert set(make_stream(pool, "mixed", 16).kinds) == {"mixed"}
    dyn = make_stream(pool, "dynamic", 16)
    n_alt = 2 * min(dyn.kinds.count("single"), dyn.kinds.count("mixed"))
    assert dyn.kinds[:n_alt] == ["single", "mixed"] * (n_alt // 2)
    mixed_batches = [b for b, k in zip(dyn.batches, dyn.kinds) if k == "mixed"]
    assert any(len(set(pool.domain[b].tolist())) > 1 for b in mixed_batches)


def test_stream_bad_arguments(pool):
    with pytest.raises(ValueError, match="unknown stream"):
        make_stream(pool, "sorted", 16)
    with pytest.raises(ValueError, match="batch_size"):
        make_stream(pool, "mixed", 0)


# --- model cache --------------------------------------------------------------------------

def test_model_shapes():
    m = SmallResNet(width=4)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 9


def test_model_cache_checksum(tmp_path):
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    m1, info1 = load_or_train(TINY_TRAIN, x, y, cache=tmp_path, progress=False)
    assert info1["source"] == "trained"
    m2, info2 = load_or_train(TINY_TRAIN, x, y, cache=tmp_path, progress=False)
    assert info2["source"] == "cache"
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    path = tmp_path / info1["path"].rsplit("/", 1)[-1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _, info3 = load_or_train(TINY_TRAIN, x, y, cache=tmp_path, progress=False)
    assert info3["source"] == "trained" and "checksum" in info3["why"]
    _, info4 = load_or_train(TINY_TRAIN, x, y, cache=tmp_path, retrain=True, progress=False)
    assert info4["source"] == "trained"
    # the weights' digest, from the cache and from training alike
    assert info1["weights_sha256"] == info2["weights_sha256"] == weights_digest(m1)


def test_weights_digest_and_copy_note():
    torch.manual_seed(0)
    m = SmallResNet(width=4)
    d = weights_digest(m)
    by_hand = hashlib.sha256(b"".join(t.numpy().tobytes() for t in m.state_dict().values()))
    assert d == by_hand.hexdigest() and len(d) == 64
    with torch.no_grad():
        m.fc.bias[0] += 1e-7        # one float's last bits: another copy
    assert weights_digest(m) != d
    # the recorded copy, and any other recipe: no note; another copy of the default recipe: a note
    assert copy_note(TrainConfig(), RECORDED_WEIGHTS + "0" * 48) is None
    assert copy_note(TrainConfig(seed=1), d) is None
    assert copy_note(TrainConfig(numerics="native"), d) is None
    note = copy_note(TrainConfig(), d)
    assert note is not None and d[:16] in note and RECORDED_WEIGHTS in note


# --- runner and report --------------------------------------------------------------------

def test_detector_metrics():
    kinds = ["single", "mixed"] * 4
    decisions = ["multiple", "multiple", "single", "multiple", "single", "single", "multiple", "multiple"]
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]
    r = RunResult("datta", "dynamic", 8, [1] * 8, [8] * 8, [1.0] * 8, scores, decisions, kinds,
                  ["x"] * 8, warmup=2)
    m = detector_metrics(r)
    assert m["batches"] == 6
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["score_auroc"] == 1.0


def test_oracle_selector():
    sel = OracleSelector(["single", "mixed", "single"])
    assert sel.warmup == 0
    assert sel.update(0.9) == "single" and sel.update(0.0) == "multiple"
    state = sel.state_dict()
    other = OracleSelector([])
    other.load_state_dict(state)
    assert other.update(1.0) == "single" and sel.update(1.0) == "single"
    with pytest.raises(IndexError):
        sel.update(0.5)
    sel.reset()
    assert sel.update(0.5) == "single"
    with pytest.raises(ValueError, match="not an OracleSelector"):
        other.load_state_dict({"kind": "threshold"})


class _Recorder(torch.nn.Module):
    """An adapter that logs its name on every call (the turn order of run_lockstep)."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return torch.zeros(len(x), 3)


def test_run_lockstep_matches_runs_on_their_own_and_rotates_the_turns():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (24,))
    pool = build_pool({"a": torch.rand(24, 1, 28, 28), "b": torch.rand(24, 1, 28, 28) * 0.3}, y)
    stream = make_stream(pool, "dynamic", 8, 0)
    model = SmallResNet(width=4).eval()
    adapters = {"tent": Tent(copy.deepcopy(model), lr=1e-2),
                "datta": DATTA(copy.deepcopy(model), lr=1e-2, selector=ThresholdSelector(0.5)),
                "tbn": TBN(copy.deepcopy(model))}
    alone = {m: run_stream(copy.deepcopy(a), m, pool, stream) for m, a in adapters.items()}
    together = run_lockstep(adapters, stream, pool.batches(stream))
    assert [r.method for r in together] == list(adapters)
    for r in together:
        a = alone[r.method]
        assert (r.correct, r.decisions, r.updated, r.scores) == (a.correct, a.decisions, a.updated, a.scores)
        assert len(r.ms) == len(stream.batches) and all(t > 0 for t in r.ms)
    assert any(together[0].updated) and not any(together[2].updated)
    log = []
    run_lockstep({n: _Recorder(n, log) for n in "abc"}, stream, itertools.islice(pool.batches(stream), 4))
    assert log == list("abc" "bca" "cab" "abc")


@pytest.fixture(scope="module")
def tiny_cfg(synth_dir, tmp_path_factory):
    return DemoConfig(data_dir=str(synth_dir), per_domain=24,
                      corruptions=("gaussian_noise", "fog", "contrast"),
                      batch_sizes=(8,), check_batches=2, train=TINY_TRAIN, validation_per_domain=16,
                      calibration_batches=2,
                      calibration_grid=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.4, 0.2, 0.4)),
                      cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


@pytest.fixture(scope="module")
def tiny_doc(tiny_cfg):
    return run_demo(tiny_cfg, command="test", log=lambda *a: None)


def test_run_demo_reuses_the_calibration_for_another_severity(tiny_cfg, tiny_doc):
    """calibrate's choices depend on the validation data, not the test severity: a second run at
    another severity loads them from the cache, and --recalibrate computes them again (equal)."""
    assert tiny_doc["datta_cal_cache"]["8"]["source"] == "calibrated"
    logs = []
    cfg = dataclasses.replace(tiny_cfg, severity=5, methods=("datta_cal",), streams=("single",),
                              check_batches=0)
    doc = run_demo(cfg, command="test", log=logs.append)
    info = doc["datta_cal_cache"]["8"]
    assert info["source"] == "cache" and info["path"] == tiny_doc["datta_cal_cache"]["8"]["path"]
    assert any("loaded from the calibration cache" in line for line in logs)
    assert doc["datta_cal"] == tiny_doc["datta_cal"]
    # back at the first run's severity, from the cache: its datta_cal row, batch by batch
    again = run_demo(dataclasses.replace(cfg, severity=tiny_cfg.severity), command="test",
                     log=lambda *a: None)
    first = next(r for r in tiny_doc["_runs"] if r.method == "datta_cal" and r.stream == "single")
    assert again["datta_cal_cache"]["8"]["source"] == "cache"
    assert next(r for r in again["_runs"] if r.method == "datta_cal").correct == first.correct
    fresh = run_demo(dataclasses.replace(cfg, recalibrate=True), command="test", log=lambda *a: None)
    assert fresh["datta_cal_cache"]["8"]["source"] == "calibrated"
    assert fresh["datta_cal"] == tiny_doc["datta_cal"]


def test_run_demo_document(tiny_doc):
    rows = tiny_doc["results"]
    assert len(rows) == len(STREAMS) * len(DemoConfig().methods)
    for r in rows:
        assert {"method", "stream", "batch_size", "accuracy", "ms_per_batch"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["ms_per_batch"] > 0 and r["samples"] == 72
    assert set(rows[0]["per_corruption"]) == {"gaussian_noise", "fog", "contrast"}
    assert {d["method"] for d in tiny_doc["detector"]} == {"datta", "datta_icme", "datta_noft", "datta_disp",
                                                          "datta_cal"}
    assert set(tiny_doc["calibration"]) == {"8"} and tiny_doc["calibration"]["8"]["single_scores"]
    assert set(tiny_doc["datta_cal"]) == {"8"} and tiny_doc["datta_cal"]["8"]["domains"][0] == "clean_heldout"
    assert tiny_doc["reported_on_validation"] == []
    # each oracle decides "single" exactly on the single-domain batches, from the first batch on
    # (datta_cal's: label-sorted batches are "skewed"), with its rule's score layer
    kinds = {r.stream: r.kinds for r in tiny_doc["_runs"]}
    runs = {(r.method, r.stream): r for r in tiny_doc["_runs"]}
    for r in rows:
        if r["method"] in ("datta_oracle", "datta_disp_oracle", "datta_cal_oracle"):
            truth = kinds[r["stream"]]
            single = 0 if r["method"] == "datta_cal_oracle" and r["stream"] == "single_noniid" else \
                truth.count("single") / len(truth)
            assert r["single_fraction"] == pytest.approx(single)
    skewed = runs[("datta_cal_oracle", "single_noniid")].decisions
    assert set(skewed) == {"skewed"}
    # the single-domain stream's decisions per corruption: every deciding row has them, they
    # recount the run's own decisions, and the oracles' are all "single"
    for r in rows:
        run = runs[(r["method"], r["stream"])]
        deciding = any(d is not None for d in run.decisions)
        assert ("decisions_per_corruption" in r) == (deciding and r["stream"].startswith("single"))
        if "decisions_per_corruption" not in r:
            continue
        for dom, share in r["decisions_per_corruption"].items():
            mine = [d for d, k in zip(run.decisions, run.domains) if k == dom]
            assert share == {d: pytest.approx(mine.count(d) / len(mine)) for d in set(mine)}
        if r["method"].endswith("_oracle") and r["stream"] == "single":
            assert all(share == {"single": 1.0} for share in r["decisions_per_corruption"].values())
    # fine-tuned batches are recorded: tent updates on every batch, source never, and DATTA
    # exactly on the batches it decided "single" (DAFT), so its no-update time leaves them out
    for (method, _), run in runs.items():
        assert len(run.updated) == len(run.ms)
        if method == "tent":
            assert all(run.updated) and run.ms_per_batch_no_update is None
        if method == "source":
            assert not any(run.updated) and run.ms_per_batch_no_update == pytest.approx(run.ms_per_batch)
        if method == "datta":
            assert run.updated == [d == "single" for d in run.decisions]
    cal = next(r for r in runs.values() if r.method == "datta_cal")
    plain = [t for i, (t, u) in enumerate(zip(cal.ms, cal.updated)) if i and not u]
    assert cal.ms_per_batch_no_update == (pytest.approx(sum(plain) / len(plain)) if plain else None)
    chk = tiny_doc["backend_check"]
    assert chk["prediction_agreement"] == 1.0 and chk["batches"] == 2
    meta = tiny_doc["meta"]
    assert meta["machine"]["torch"] == torch.__version__ and meta["command"] == "test"
    assert meta["commit"]  # the git commit of the code that ran (or "unknown ...")
    assert meta["backend"] in ("cpu", "reference", "cuda", "triton")


def test_decisions_by_counts_each_label():
    """``RunResult.decisions_by``: per label, the share of its batches given each decision;
    batches without a decision are left out, a label with none is absent."""
    r = RunResult("datta_cal", "single", 4, [1] * 6, [4] * 6, [1.0] * 6, [None] * 6,
                  ["single", "skewed", "single", None, "multiple", None], ["single"] * 6,
                  ["fog", "fog", "fog", "fog", "jpeg", "snow"])
    assert r.decisions_by(r.domains) == {"fog": {"single": 2 / 3, "skewed": 1 / 3}, "jpeg": {"multiple": 1.0}}
    assert r.row()["decisions_per_corruption"] == r.decisions_by(r.domains)
    assert "decisions_per_corruption" not in dataclasses.replace(r, stream="mixed").row()
    # batches the output check released (SPEC §4): the share per corruption, only when some were
    assert "released_fraction" not in r.row()
    released = dataclasses.replace(r, released=[False, True, True, False, False, False])
    assert released.row()["released_fraction"] == 2 / 6
    assert released.row()["released_per_corruption"] == {"fog": 0.5, "jpeg": 0.0, "snow": 0.0}
    assert "released_per_corruption" not in dataclasses.replace(released, stream="mixed").row()


def test_decisions_table_shows_released_batches():
    """The single-domain decisions table adds a 'released' column for a method whose output
    check released batches (SPEC §4), and none for the others."""
    from datta_kernels.eval.report import _decisions_per_corruption
    rows = [{"method": "datta_cal", "stream": "single", "batch_size": 16,
             "decisions_per_corruption": {"fog": {"single": 0.75, "skewed": 0.25}, "snow": {"single": 1.0}},
             "released_per_corruption": {"fog": 0.5, "snow": 0.0}},
            {"method": "datta_disp", "stream": "single", "batch_size": 16,
             "decisions_per_corruption": {"fog": {"single": 1.0}, "snow": {"multiple": 1.0}}}]
    lines = _decisions_per_corruption({"results": rows}, ["datta_disp", "datta_cal"], [16])
    assert "released" in lines[1]
    assert lines[2].split() == ["corruption", "datta_disp", "datta_cal", "released"]
    assert lines[3].split() == ["fog", "100/0/0", "75/0/25", "50"]
    assert lines[4].split() == ["snow", "0/100/0", "100/0/0", "0"]
    del rows[0]["released_per_corruption"]
    lines = _decisions_per_corruption({"results": rows}, ["datta_disp", "datta_cal"], [16])
    assert "released" not in "".join(lines)


def test_report_outputs(tiny_doc, tmp_path):
    paths = write_outputs(tiny_doc, tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert "_runs" not in doc and len(doc["results"]) == len(tiny_doc["results"])
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert tuple(header) == CSV_FIELDS
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_tables(tiny_doc)
    assert "datta_icme" in table and "precision" in table and "Backend check" in table
    # the detector's reading of each single-domain corruption, per batch size, oracles left out
    block = table[table.index("Decisions on the single-domain stream, bs 8"):].splitlines()
    assert "datta_cal" in block[1] and "oracle" not in block[1]
    cal = next(r for r in tiny_doc["results"] if r["method"] == "datta_cal" and r["stream"] == "single")
    fog = next(line for line in block[2:] if line.startswith("fog"))
    share = cal["decisions_per_corruption"]["fog"]
    expect = "/".join(f"{100 * share.get(d, 0.0):.0f}" for d in ("single", "multiple", "skewed"))
    assert fog.split()[1 + block[1].split()[1:].index("datta_cal")] == expect
    assert paths["summary"].read_text().strip() == table.strip()


def test_validation_severities_decide_the_calibration_domains(synth_dir, tiny_doc, tmp_path):
    """``validation_severities=(5,)``: datta_disp is calibrated on clean + the validation corruptions
    at severity 5 only, and the summary says so; the default document says nothing of it."""
    cfg = DemoConfig(data_dir=str(synth_dir), per_domain=8, corruptions=("fog",), streams=("single",),
                     methods=("source", "datta_disp"), batch_sizes=(8,), check_batches=0, train=TINY_TRAIN,
                     validation_per_domain=8, validation_severities=(5,), calibration_batches=2,
                     cache_dir=str(tmp_path / "cache"), progress=False)
    doc = run_demo(cfg, command="test", log=lambda *a: None)
    assert doc["calibration"]["8"]["domains"] == ["clean_heldout", "speckle_noise@5", "gaussian_blur@5",
                                                  "spatter@5"]
    note = "calibrated on the validation corruptions at severity 5 only"
    assert note in format_tables(doc) and "--validation-severities" not in format_tables(tiny_doc)


def test_validation_mixing_reaches_the_calibration(tiny_cfg):
    """``validation_mixing="severity"``: datta_cal's mixed validation batches pool the validation
    corruptions of one severity (clean images apart), recorded in the calibration the document
    holds; the default pools every domain."""
    cfg = dataclasses.replace(tiny_cfg, methods=("datta_cal",), streams=("mixed",), check_batches=0,
                              validation_severities=(2, 5), validation_mixing="severity")
    doc = run_demo(cfg, command="test", log=lambda *a: None)
    assert doc["datta_cal"]["8"]["mixing"] == [["clean_heldout"],
                                               ["speckle_noise@2", "gaussian_blur@2", "spatter@2"],
                                               ["speckle_noise@5", "gaussian_blur@5", "spatter@5"]]
    assert "pool one group of domains at a time" in format_tables(doc)
    with pytest.raises(ValueError, match="validation_mixing"):
        dataclasses.replace(tiny_cfg, validation_mixing="corruption").validate()


def test_daft_objective_reaches_the_calibration(tiny_cfg):
    """``daft_objective="margin"``: datta_cal's step 5 ranks DAFT by its smallest margin against
    the plain alternatives, whose validation-stream accuracies the document then holds; the
    summary says so.  A bad value is refused."""
    cfg = dataclasses.replace(tiny_cfg, methods=("datta_cal",), streams=("mixed",), check_batches=0,
                              daft_objective="margin")
    doc = run_demo(cfg, command="test", log=lambda *a: None)
    cal = doc["datta_cal"]["8"]
    assert cal["daft_objective"] == "margin" and set(cal["rival_table"]) == {"source", "tbn", "bn_adapt",
                                                                           "tent", "dyn"}
    assert "smallest margin against the plain alternatives" in format_tables(doc)
    with pytest.raises(ValueError, match="daft_objective"):
        dataclasses.replace(tiny_cfg, daft_objective="median").validate()


# --- the protocol -----------------------------------------------------------------------------

@pytest.mark.parametrize("per_domain", [2, 17, 1000, 5000])
def test_reported_and_validation_images_are_disjoint(per_domain):
    from datta_kernels.eval.validation import reported_images, validation_images
    for seed in (0, 3):
        rep, val = reported_images(10000, per_domain, seed), validation_images(10000, per_domain, seed)
        assert len(rep) == len(val) == per_domain
        assert len(set(rep.tolist())) == per_domain and len(set(val.tolist())) == per_domain
        assert not set(rep.tolist()) & set(val.tolist())
        assert rep.max() < 5000 <= val.min()


def test_protocol_refuses_overlap_and_validation_corruptions(synth_dir):
    from datta_kernels.eval.models import held_out_indices, training_indices
    from datta_kernels.eval.validation import TEST, VALIDATION, reported_images, test_pool, validation_domains
    with pytest.raises(ValueError, match="disjoint halves"):
        reported_images(10000, 5001, 0)
    data = ds.load_fashion_mnist(synth_dir)
    with pytest.raises(ValueError, match="validation corruptions"):
        test_pool(data, 8, 3, 0, ("fog", VALIDATION[0]))
    pool = test_pool(data, 8, 3, 0, ("fog", VALIDATION[0]), allow_validation=True)
    assert pool.names == ["fog", VALIDATION[0]]
    with pytest.raises(ValueError, match="report-validation"):
        DemoConfig(corruptions=("fog", "speckle_noise")).validate()
    # clean held-out images: never in the training subset
    train = set(training_indices(TINY_TRAIN, 256).tolist())
    held = held_out_indices(TINY_TRAIN, 256)
    assert len(train) == 128 and not train & set(held.tolist()) and len(held) == 128
    dom = validation_domains(data, 8, 0, severities=(2, 5), train=TINY_TRAIN)
    assert list(dom) == ["clean_heldout", "speckle_noise@2", "gaussian_blur@2", "spatter@2",
                         "speckle_noise@5", "gaussian_blur@5", "spatter@5"]
    assert set(VALIDATION) == {"speckle_noise", "gaussian_blur", "spatter"}
    assert not set(VALIDATION) & set(TEST)
    # the validation images are test images of the second half: none is a reported image
    val_x = dom["speckle_noise@2"][0]
    assert val_x.shape == (8, 1, 28, 28)
    rep = set(reported_images(len(data.test_y), 32, 0).tolist())
    from datta_kernels.eval.validation import validation_images
    assert not rep & set(validation_images(len(data.test_y), 8, 0).tolist())


def test_validation_corruptions_are_chosen_and_never_reported(synth_dir, tmp_path):
    """``validation_corruptions``: another set decides (datta_disp's calibration domains), the
    test corruptions default to every other one (resolved and recorded by the run), a chosen
    validation corruption is refused as a test corruption without ``report_validation``, and the
    summary says the set is not the default."""
    from datta_kernels.eval.corruptions import CORRUPTIONS
    from datta_kernels.eval.validation import TEST, VALIDATION, reported_corruptions, test_pool
    assert DemoConfig().test_corruptions == TEST == reported_corruptions()
    chosen = ("fog", "speckle_noise")
    cfg = DemoConfig(data_dir=str(synth_dir), per_domain=8, streams=("single",),
                     methods=("source", "datta_disp"), batch_sizes=(8,), check_batches=0, train=TINY_TRAIN,
                     validation_per_domain=8, validation_severities=(5,), calibration_batches=2,
                     validation_corruptions=chosen,
                     cache_dir=str(tmp_path / "cache"), progress=False)
    rest = tuple(c for c in CORRUPTIONS if c not in chosen)
    assert cfg.test_corruptions == rest and "gaussian_blur" in rest and "spatter" in rest
    doc = run_demo(cfg, command="test", log=lambda *a: None)
    assert doc["calibration"]["8"]["domains"] == ["clean_heldout", "fog@5", "speckle_noise@5"]
    assert tuple(doc["meta"]["config"]["corruptions"]) == rest
    assert {r["stream"] for r in doc["results"]} == {"single"} and not doc["reported_on_validation"]
    assert set(next(r for r in doc["results"] if r["method"] == "source")["per_corruption"]) == set(rest)
    assert "validation corruptions fog, speckle_noise (--validation-corruptions)" in format_tables(doc)
    data = ds.load_fashion_mnist(synth_dir)
    with pytest.raises(ValueError, match="validation corruptions"):
        test_pool(data, 8, 3, 0, ("fog",), validation=chosen)
    assert test_pool(data, 8, 3, 0, (VALIDATION[1],), validation=chosen).names == [VALIDATION[1]]
    with pytest.raises(ValueError, match="report-validation"):
        dataclasses.replace(cfg, corruptions=("fog", "contrast")).validate()
    dataclasses.replace(cfg, corruptions=("fog", "contrast"), report_validation=True).validate()


@pytest.mark.parametrize("bad, needle", [((), "at least one"), (("fog", "fog"), "each once"),
                                         (("magic",), "unknown validation corruption"),
                                         (None, "at least one test corruption")])
def test_validation_corruptions_refused(bad, needle):
    from datta_kernels.eval.corruptions import CORRUPTIONS
    from datta_kernels.eval.validation import check_validation
    bad = CORRUPTIONS if bad is None else bad
    with pytest.raises(ValueError, match=needle):
        check_validation(bad)
    with pytest.raises(ValueError, match=needle):
        DemoConfig(validation_corruptions=bad).validate()
