"""``datta-kernels run`` and its pieces (eval/benchmarks.py, protocols.py, zoo.py, bench_runner.py)
on tiny files written here in exactly the published layouts: CIFAR-10-C ``.npy`` files and an
ImageNet-C JPEG tree."""
from __future__ import annotations

import copy
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from datta_kernels.cli import main
from datta_kernels.eval.benchmarks import (
    BenchmarkDataError,
    decode_image,
    load_cifar_c,
    load_imagenet_c,
    write_synthetic_cifar_c,
)
from datta_kernels.eval.protocols import GRADUAL_LEVELS, PROTOCOLS, build_stream
from datta_kernels.eval.runner import METHODS
from datta_kernels.eval.zoo import (
    CheckpointError,
    Normalize,
    WideResNet,
    build_model,
    default_normalization,
    load_checkpoint,
    resnet26,
    wrn28_10,
)
from datta_kernels.nn import _DABN_KEYS
from datta_kernels.surgery import convert_model, dabn_layers
from datta_kernels.testing import tol

CORR = ("gaussian_noise", "fog")
N = 12        # images per severity in the tiny files (published: 10 000)


def write_cifar_c(root, corruptions=CORR, n=N, num_classes=10, seed=0, labels_len=None):
    """The published CIFAR-10-C layout with ``n`` images per severity: ``<c>.npy`` (5n, 32, 32, 3)
    uint8, ``labels.npy`` (5n,) int64 (the n labels repeated per severity)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    for c in corruptions:
        np.save(root / f"{c}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(labels, 5)[: labels_len or 5 * n].astype(np.int64))
    return root


def write_imagenet_c(root, corruptions=CORR, severities=(1, 2, 3, 4, 5), wnids=("n01440764", "n01443537",
                     "n01484850"), per_class=2, size=(40, 30)):
    """The published ImageNet-C layout: ``<c>/<s>/<wnid>/<name>.JPEG``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in severities:
            for w in wnids:
                d = root / c / str(s) / w
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(arr).save(d / f"ILSVRC2012_val_{w[-3:]}{i:05d}.JPEG", quality=90)
    return root


# --- datasets -------------------------------------------------------------------------------

def test_cifar_c_index_and_pixels(tmp_path):
    root = write_cifar_c(tmp_path / "c10c")
    b = load_cifar_c(root, CORR, (2, 5), main_severity=5, num_ex=5)
    assert b.pool.names == ["gaussian_noise@2", "gaussian_noise", "fog@2", "fog"]
    assert len(b.dataset) == 4 * 5 and b.per_domain["fog"] == 5 and b.num_classes == 10
    assert b.dataset._arrays == {}, "nothing is opened before a batch is asked for"
    x, y = b.dataset[[6, 0, 19]]           # gaussian_noise@5 #1, gaussian_noise@2 #0, fog@5 #4
    g, f = np.load(root / "gaussian_noise.npy"), np.load(root / "fog.npy")
    labels = np.load(root / "labels.npy")
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    torch.testing.assert_close(x[0], torch.from_numpy(g[4 * N + 1]).permute(2, 0, 1))
    torch.testing.assert_close(x[1], torch.from_numpy(g[N + 0]).permute(2, 0, 1))
    torch.testing.assert_close(x[2], torch.from_numpy(f[4 * N + 4]).permute(2, 0, 1))
    assert y.tolist() == [labels[1], labels[0], labels[4]]
    assert isinstance(b.dataset._arrays[root / "fog.npy"], np.memmap)
    # Labels of one severity's length are accepted too.
    write_cifar_c(tmp_path / "short", labels_len=N)
    assert load_cifar_c(tmp_path / "short", CORR, (5,), 5).dataset[[0]][1].item() == labels[0]
    # The synthetic writer (CI smoke run, loader timing) writes the same layout.
    syn = load_cifar_c(write_synthetic_cifar_c(tmp_path / "syn", CORR, n=3), CORR, (1, 5), 5)
    assert len(syn.dataset) == 12 and syn.dataset[[11]][0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("case", ["missing", "shape", "not5", "dtype", "labels_len", "no_labels", "lengths",
                                  "label_range"])
def test_cifar_c_bad_files_name_the_file(tmp_path, case):
    root = write_cifar_c(tmp_path / "d")
    target = root / ("labels.npy" if case in ("no_labels", "labels_len", "label_range") else "fog.npy")
    if case == "missing":
        (root / "fog.npy").unlink()
    elif case == "shape":
        np.save(target, np.zeros((5 * N, 32, 32), np.uint8))
    elif case == "not5":
        np.save(target, np.zeros((5 * N + 1, 32, 32, 3), np.uint8))
    elif case == "dtype":
        np.save(target, np.zeros((5 * N, 32, 32, 3), np.float32))
    elif case == "labels_len":
        np.save(target, np.zeros(5 * N - 1, np.int64))
    elif case == "no_labels":
        target.unlink()
    elif case == "lengths":
        np.save(target, np.zeros((5 * (N + 1), 32, 32, 3), np.uint8))
    elif case == "label_range":
        np.save(target, np.full(5 * N, 10, np.int64))
    with pytest.raises(BenchmarkDataError) as e:
        load_cifar_c(root, CORR, (5,), 5)
    assert str(target) in str(e.value)


def test_imagenet_c_index_decode_and_subset(tmp_path):
    root = write_imagenet_c(tmp_path / "inc", severities=(5,))
    b = load_imagenet_c(root, CORR, (5,), 5, subset=None)
    assert b.num_classes == 3 and len(b.dataset) == 2 * 6
    assert b.pool.y[:6].tolist() == [0, 0, 1, 1, 2, 2], "class index = position of the sorted wnid"
    x, y = b.dataset[[0, 11]]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.uint8 and y.tolist() == [0, 2]
    small = decode_image(b.dataset.domains[0].files[0], resize=36, crop=32)
    assert small.shape == (3, 32, 32)
    sub = load_imagenet_c(root, CORR, (5,), 5, subset=4)
    again = load_imagenet_c(root, CORR, (5,), 5, subset=4)
    assert sub.dataset.domains[0].files == again.dataset.domains[0].files, "the subset is a fixed list"
    assert len(sub.dataset) == 8
    assert len(load_imagenet_c(root, CORR, (5,), 5, num_ex=3, subset=None).dataset) == 6


@pytest.mark.parametrize("case", ["corruption", "severity", "empty_class", "wnids"])
def test_imagenet_c_bad_layout(tmp_path, case):
    root = write_imagenet_c(tmp_path / "inc", severities=(5,))
    if case == "corruption":
        target = root / "fog"
        for p in sorted(target.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        target.rmdir()
    elif case == "severity":
        target = root / "fog" / "5"
        target.rename(root / "fog" / "4")
    elif case == "empty_class":
        target = root / "fog" / "5" / "n01443537"
        for p in target.iterdir():
            p.unlink()
    else:
        target = root / "fog" / "5"
        (target / "n99999999").mkdir()
        (target / "n99999999" / "a.JPEG").write_bytes((root / "gaussian_noise" / "5").rglob("*.JPEG")
                                                      .__next__().read_bytes())
    with pytest.raises(BenchmarkDataError, match=str(target)):
        load_imagenet_c(root, CORR, (5,), 5)


def test_unreadable_image_names_the_file(tmp_path):
    root = write_imagenet_c(tmp_path / "inc", corruptions=("fog",), severities=(5,))
    broken = sorted((root / "fog" / "5" / "n01440764").iterdir())[0]
    broken.write_bytes(b"not a jpeg")
    b = load_imagenet_c(root, ("fog",), (5,), 5)
    with pytest.raises(BenchmarkDataError, match=str(broken)):
        b.dataset[[0]]


# --- streams --------------------------------------------------------------------------------

@pytest.fixture
def pool(tmp_path):
    return load_cifar_c(write_cifar_c(tmp_path / "c", corruptions=("a", "b", "c"), n=20), ("a", "b", "c"),
                        (1, 2, 3, 4, 5), 5).pool


@pytest.mark.parametrize("name", [p for p in PROTOCOLS if p != "gradual"])
def test_streams_cover_the_main_severity_once(pool, name):
    s = build_stream(pool, name, 8, seed=1)
    idx = torch.cat(s.batches)
    main = torch.cat([pool.indices(pool.names.index(c)) for c in "abc"])
    assert sorted(idx.tolist()) == sorted(main.tolist()), "every image at --severity exactly once"
    assert s.name == name and len(s.kinds) == len(s.batches) == len(s.domains)
    assert build_stream(pool, name, 8, seed=1).batches[0].tolist() == s.batches[0].tolist()
    if name == "continual":
        assert [d for i, d in enumerate(s.domains) if i == 0 or d != s.domains[i - 1]] == ["a", "b", "c"]
    if name.startswith("dynamic"):
        assert {"single", "mixed"} == set(s.kinds)
    if name == "mixed_domains":
        assert len({int(pool.domain[i]) for i in s.batches[0]}) > 1


def test_gradual_rises_and_falls(pool):
    s = build_stream(pool, "gradual", 10, severity=5)
    runs = [d for i, d in enumerate(s.domains) if i == 0 or d != s.domains[i - 1]]
    expect = [c if lv == 5 else f"{c}@{lv}" for c in "abc" for lv in GRADUAL_LEVELS]
    assert runs == expect and s.num_samples == 20 * len(expect)
    for b, d in zip(s.batches, s.domains):
        assert {pool.names[int(pool.domain[i])] for i in b} == {d}


def test_correlated_dirichlet_concentration(pool):
    def classes_per_batch(alpha):
        s = build_stream(pool, "correlated", 10, seed=0, dirichlet=alpha)
        assert sorted(torch.cat(s.batches).tolist()) == sorted(
            torch.cat([pool.indices(pool.names.index(c)) for c in "abc"]).tolist())
        return np.mean([len(set(pool.y[b].tolist())) for b in s.batches])
    assert classes_per_batch(0.01) < classes_per_batch(100.0)
    sorted_stream = build_stream(pool, "single_noniid", 10)   # the demo's name is an alias
    assert sorted_stream.name == "correlated"
    with pytest.raises(ValueError, match="unknown stream"):
        build_stream(pool, "nope", 10)


# --- models and checkpoints -----------------------------------------------------------------

def test_wrn28_10_has_the_public_checkpoint_keys():
    sd = wrn28_10().state_dict()
    for key in ("conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight",
                "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
                "block3.layer.3.conv2.weight", "block3.layer.3.bn2.running_var", "bn1.weight",
                "bn1.running_mean", "fc.weight", "fc.bias"):
        assert key in sd, key
    assert "block1.layer.1.convShortcut.weight" not in sd and "block1.layer.4.bn1.weight" not in sd
    assert sd["block1.layer.0.conv1.weight"].shape == (160, 16, 3, 3)
    assert sd["block3.layer.0.convShortcut.weight"].shape == (640, 320, 1, 1)
    assert sd["fc.weight"].shape == (10, 640)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "tracked" not in k) == 36_479_194


def test_wrn_block_is_pre_activation():
    """The public checkpoint's block: the 1x1 shortcut sees the *pre-activated* input when the
    width changes, the raw input otherwise."""
    from torch.nn.functional import relu

    torch.manual_seed(0)
    net = WideResNet(16, 2).eval()
    for blk in (net.block2.layer[0], net.block2.layer[1]):
        for bn in (blk.bn1, blk.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, blk.conv1.in_channels, 8, 8)
        act = relu(blk.bn1(x))
        body = blk.conv2(relu(blk.bn2(blk.conv1(act))))
        short = blk.convShortcut(act) if hasattr(blk, "convShortcut") else x
        torch.testing.assert_close(blk(x), body + short)
    assert hasattr(net.block2.layer[0], "convShortcut") and not hasattr(net.block2.layer[1], "convShortcut")


@pytest.mark.parametrize("arch", [lambda: WideResNet(28, 1), lambda: resnet26(width=4)])
@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model"])
def test_checkpoint_round_trip(tmp_path, arch, wrap):
    torch.manual_seed(0)
    src = arch().eval()
    sd = src.state_dict()
    if wrap != "plain":
        sd = {f"module.{k}": v for k, v in sd.items()}
        sd.pop(next(k for k in sd if k.endswith("num_batches_tracked")))   # older checkpoints lack them
    obj = ({"state_dict": sd, "epoch": 3, "best_acc": torch.tensor(0.9)} if wrap == "state_dict"
           else {"model": sd} if wrap == "model" else sd)
    torch.save(obj, tmp_path / "ck.pt")
    dst = arch()
    load_checkpoint(dst, tmp_path / "ck.pt")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src(x))


def test_checkpoint_errors_list_the_keys(tmp_path):
    sd = resnet26(width=4).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        load_checkpoint(resnet26(width=4), tmp_path / "ck.pt")
    torch.save(resnet26(width=8).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="shape of conv1.weight"):
        load_checkpoint(resnet26(width=4), tmp_path / "wide.pt")
    torch.save({"epoch": 1}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(resnet26(width=4), tmp_path / "none.pt")


class TinyImageNet(nn.Module):
    """A stand-in for a torchvision classifier: conv-BN stem, pool, 1000-way head."""

    def __init__(self, weights=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 7, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x):
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


@pytest.fixture
def fake_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(resnet50=TinyImageNet)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    return tv


def test_torchvision_models(tmp_path, fake_torchvision, monkeypatch):
    model, info = build_model("torchvision:resnet50", 3, random_init=True,
                              normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert isinstance(model[0], Normalize) and isinstance(model[1], TinyImageNet)
    assert info["normalization"]["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(CheckpointError, match="no model 'resnet9000'"):
        build_model("torchvision:resnet9000", 3, random_init=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)        # import torchvision -> ImportError
    with pytest.raises(CheckpointError, match="needs torchvision, which is not installed"):
        build_model("torchvision:resnet50", 3, random_init=True)
    # installed but built for another torch (its compiled ops fail while importing)
    import datta_kernels.eval.zoo as zoo

    def broken(name):
        raise RuntimeError("operator torchvision::nms does not exist\nmore")
    monkeypatch.setattr(zoo.importlib, "import_module", broken)
    with pytest.raises(CheckpointError, match=r"does not import against this torch .*nms does not exist\); "
                                              "install the torchvision build"):
        build_model("torchvision:resnet50", 3, random_init=True)


_TV_OPS: list = []   # the stand-in op library below must stay alive for the session


def real_torchvision():
    """The installed torchvision (the test skips without it; scripts/install.sh installs it).

    The package index's torchvision wheel is built for a CUDA torch: its compiled ops (nms,
    roi_align, ...) do not load against a CPU torch, and its import then stops registering fake
    kernels for ``torchvision::nms`` / ``qnms``, which do not exist (pytorch/vision#9085). The
    models are pure Python and use none of those ops, so declaring the two schemas lets the
    import finish; nothing here calls them."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        if os.environ.get("DATTA_REQUIRE_TORCHVISION") == "1":      # CI: a skip would hide the test
            pytest.fail("DATTA_REQUIRE_TORCHVISION=1 but torchvision is not installed")
        pytest.skip("torchvision is not installed (scripts/install.sh installs it)")
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_OPS.append(lib)
    return importlib.import_module("torchvision")


def test_real_torchvision_resnet50_checkpoint(tmp_path):
    """torchvision's own ResNet-50 (weights=None) through ``run``'s path: a DataParallel-wrapped
    checkpoint file -> build_model -> the ``source`` and ``datta`` methods (convert_model)."""
    tv = real_torchvision()
    torch.manual_seed(0)
    plain = tv.models.resnet50(weights=None)
    with torch.no_grad():          # BN layers unlike a fresh one, so a layer left unloaded shows
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    plain.eval()
    state = plain.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r50.pth")

    spec = "torchvision:resnet50"
    model, info = build_model(spec, 1000, checkpoint=str(tmp_path / "r50.pth"),
                              normalization=default_normalization(spec))
    assert info["architecture"] == "ResNet" and info["parameters"] == 25_557_032
    assert info["tensors"] == len(state)
    loaded = model[1].state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = plain(model[0](x))
        source = METHODS["source"](copy.deepcopy(model), "auto", 1e-3, {}, None)
        got = source(x)
    layers = dabn_layers(source.model)
    assert len(layers) == 53                       # every BatchNorm2d of ResNet-50 converted
    assert not any(type(m) is nn.BatchNorm2d for m in source.model.modules())
    # the checkpoint's tensors stay under BatchNorm2d's keys; the DABN state is added beside them
    converted = source.model[1].state_dict()
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert {k.rsplit(".", 1)[1] for k in set(converted) - set(state)} == set(_DABN_KEYS)
    assert all(torch.equal(m.source_mean, m.running_mean) and torch.equal(m.source_var, m.running_var)
               for m in layers)
    # source blend = the running statistics = the plain model in eval mode; 53 layers of float32
    # rounding in another order between them
    torch.testing.assert_close(got, want, **tol(torch.float32, scale=10))
    # and the plain checkpoint loads strictly into a converted ResNet-50 (no missing DABN keys)
    again = convert_model(tv.models.resnet50(weights=None), "source").eval()
    again.load_state_dict(state)
    assert all(torch.equal(v, converted[k]) for k, v in again.state_dict().items())

    datta = METHODS["datta"](copy.deepcopy(model), "auto", 1e-3,
                             {"score_layer": None, "score_mode": "pixel"}, None)
    out = datta(x)
    assert out.shape == (2, 1000) and out.isfinite().all()
    assert len(dabn_layers(datta.model)) == 53 and datta.n_batches == 1


# --- the command, end to end ----------------------------------------------------------------

BASE = ["--no-progress", "--workers", "0", "--batch-size", "8"]


def _run(tmp_path, capsys, *args):
    out = tmp_path / "out"
    rc = main(["run", "--out", str(out), *BASE, *args])
    captured = capsys.readouterr()
    return rc, captured, out


@pytest.mark.parametrize("model", ["resnet26", "wrn28-10", "whole"])
def test_run_cifar10c_each_model_kind(tmp_path, capsys, model):
    data = write_cifar_c(tmp_path / "c10c")
    torch.manual_seed(0)
    if model == "whole":
        path = tmp_path / "whole.pt"
        torch.save(resnet26(width=4), path)
        margs = ["--model", str(path)]
    else:
        net = resnet26(width=4) if model == "resnet26" else wrn28_10(width=1)
        wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
        torch.save(wrapped, tmp_path / "ck.pt")
        margs = ["--model", model, "--width", "4" if model == "resnet26" else "1", "--checkpoint",
                 str(tmp_path / "ck.pt")]
    methods = ("source", "tbn", "tent", "datta") if model == "resnet26" else ("source", "tent")
    rc, cap, out = _run(tmp_path, capsys, "--dataset", "cifar10-c", "--data-dir", str(data), *margs,
                        "--corruptions", ",".join(CORR), "--streams", "continual,mixed_domains",
                        "--methods", ",".join(methods))
    assert rc == 0, cap.err
    assert "Top-1 accuracy (%) on CIFAR-10-C" in cap.out and "Per-corruption accuracy" in cap.out
    assert "device cpu" in cap.out and "s waiting for data" in cap.out
    doc = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["stream"]) for r in doc["results"]} == {
        (m, s) for m in methods for s in ("continual", "mixed_domains")}
    cont = next(r for r in doc["results"] if r["method"] == "source" and r["stream"] == "continual")
    assert cont["samples"] == 2 * N and set(cont["per_corruption"]) == set(CORR)
    assert doc["source_accuracy_per_corruption"] == cont["per_corruption"]
    assert "decisions_per_corruption" not in cont       # no selector, no decisions
    if "datta" in methods:          # DATTA's reading of each corruption of the continual stream
        dat = next(r for r in doc["results"] if r["method"] == "datta" and r["stream"] == "continual")
        assert set(dat["decisions_per_corruption"]) == set(CORR)
        assert all(sum(v.values()) == pytest.approx(1.0) for v in dat["decisions_per_corruption"].values())
        assert "Decisions on the single-domain stream" in cap.out
    assert doc["meta"]["device"] == "cpu" and doc["model"]["name"] == margs[1]
    assert doc["meta"]["numerics"]["mode"] == "native" and "numerics native (" in cap.out
    assert doc["meta"]["seconds_in_methods"] > 0 and doc["meta"]["seconds_waiting_for_data"] > 0
    # the methods recorded their updates: tent fine-tunes every batch, source never, so only
    # source has a time on batches it did not fine-tune
    for r in doc["results"]:
        if r["method"] in ("source", "tent"):
            assert r["updated_fraction"] == (r["method"] == "tent")
            assert (r["ms_per_batch_no_update"] is None) == (r["method"] == "tent")
    assert (out / "results.csv").is_file() and (out / "datta_demo.png").read_bytes()[:4] == b"\x89PNG"


def test_run_every_stream_random_init_and_workers(tmp_path, capsys):
    data = write_cifar_c(tmp_path / "c10c", n=4)
    with pytest.warns(UserWarning, match="meaningless"):
        rc, cap, out = _run(tmp_path, capsys, "--dataset", "cifar10-c", "--data-dir", str(data), "--model",
                            "resnet26", "--width", "2", "--random-init", "--corruptions", ",".join(CORR),
                            "--streams", ",".join(PROTOCOLS), "--dirichlet", "0.1", "--severity", "3",
                            "--workers", "1", "--methods", "datta", "--numerics", "portable")
    assert rc == 0, cap.err
    doc = json.loads((out / "results.json").read_text())
    # asked for portable numerics in a process that has long run kernels: said, not hidden
    numerics = doc["meta"]["numerics"]
    assert numerics["mode"] == doc["meta"]["config"]["numerics"] == "portable"
    assert numerics["portable"] or "ran in this process" in numerics["why"]
    assert "numerics NOT portable" in cap.out or "numerics portable (AVX2, 2 threads)" in cap.out
    assert {r["stream"] for r in doc["results"]} == set(PROTOCOLS)
    grad = next(r for r in doc["results"] if r["stream"] == "gradual")
    assert grad["samples"] == 2 * 4 * len(GRADUAL_LEVELS) and "fog@1" in grad["per_corruption"]
    dyn = next(r for r in doc["results"] if r["stream"] == "dynamic" and r["method"] == "datta")
    assert set(dyn["by_batch_type"]) == {"single", "mixed"}


def test_run_imagenet_c_torchvision(tmp_path, capsys, fake_torchvision):
    data = write_imagenet_c(tmp_path / "inc", severities=(5,))
    torch.save(TinyImageNet().state_dict(), tmp_path / "r50.pt")
    rc, cap, out = _run(tmp_path, capsys, "--dataset", "imagenet-c", "--data-dir", str(data), "--model",
                        "torchvision:resnet50", "--checkpoint", str(tmp_path / "r50.pt"), "--corruptions",
                        ",".join(CORR), "--streams", "continual,dynamic", "--subset", "4")
    assert rc == 0, cap.err
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["classes"] == 3 and doc["data"]["per_domain"] == {"gaussian_noise": 4, "fog": 4}
    assert doc["model"]["normalization"]["std"] == [0.229, 0.224, 0.225]
    assert "ImageNet-C" in cap.out


def _bad(tmp_path, capsys, *args):
    rc, cap, _ = _run(tmp_path, capsys, *args)
    assert rc == 2 and cap.err.startswith("error: ") and cap.err.count("\n") == 1, cap.err
    return cap.err


def test_run_rejects_bad_arguments_before_loading(tmp_path, capsys):
    data = str(write_cifar_c(tmp_path / "c10c"))
    ok = ["--dataset", "cifar10-c", "--data-dir", data, "--model", "resnet26", "--random-init"]
    cases = {
        "unknown dataset": ["--dataset", "svhn-c", "--data-dir", data, "--model", "resnet26",
                            "--random-init"],
        "not a directory": ["--dataset", "cifar10-c", "--data-dir", data + "/nope", "--model", "resnet26",
                            "--random-init"],
        "needs --checkpoint": ["--dataset", "cifar10-c", "--data-dir", data, "--model", "resnet26"],
        "neither a built-in": ["--dataset", "cifar10-c", "--data-dir", data, "--model", "vit",
                               "--random-init"],
        "exclude each other": ok + ["--checkpoint", data + "/labels.npy"],
        "severity must be": ok + ["--severity", "6"],
        "unknown stream": ok + ["--streams", "continual,bogus"],
        "unknown method": ok + ["--methods", "tent,nope"],
        "--num-ex must be": ok + ["--num-ex", "0"],
        "need 3 values": ok + ["--mean", "0.5", "--std", "0.5"],
        "--dirichlet must be": ok + ["--dirichlet", "0", "--streams", "correlated"],
        "add correlated": ok + ["--dirichlet", "0.5"],
        "--backend nope": ok + ["--backend", "nope"],
        "imagenet-c only": ok + ["--subset", "100"],
    }
    for expect, args in cases.items():
        assert expect in _bad(tmp_path, capsys, *args), expect
    missing = str(tmp_path / "c10c" / "snow.npy")
    assert missing in _bad(tmp_path, capsys, *ok, "--corruptions", "fog,snow")


def test_run_reports_data_and_checkpoint_errors_in_one_line(tmp_path, capsys, fake_torchvision):
    data = write_imagenet_c(tmp_path / "inc", corruptions=("fog",), severities=(5,))
    broken = sorted((data / "fog" / "5" / "n01484850").iterdir())[-1]
    broken.write_bytes(b"\xff\xd8 truncated")
    torch.save(TinyImageNet().state_dict(), tmp_path / "ok.pt")
    err = _bad(tmp_path, capsys, "--dataset", "imagenet-c", "--data-dir", str(data), "--model",
               "torchvision:resnet50", "--checkpoint", str(tmp_path / "ok.pt"), "--corruptions", "fog",
               "--workers", "1",
               "--subset", "6", "--methods", "source")
    assert str(broken) in err and "cannot read image" in err
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    err = _bad(tmp_path, capsys, "--dataset", "imagenet-c", "--data-dir", str(data), "--model",
               "torchvision:resnet50", "--checkpoint", str(tmp_path / "bad.pt"), "--corruptions", "fog")
    assert "missing keys: bn1.weight" in err and str(tmp_path / "bad.pt") in err


def test_run_imagenet_c_without_pillow(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "PIL" else real(name, *a))
    err = _bad(tmp_path, capsys, "--dataset", "imagenet-c", "--data-dir", str(tmp_path), "--model",
               "resnet26", "--random-init")
    assert "pip install pillow" in err


def test_run_calibrates_on_validation_corruptions(tmp_path, capsys):
    """--calibrate-on: datta_disp's threshold from corruptions that are never reported; dyn runs;
    datta_cal without validation corruptions, or with reported ones, is refused."""
    data = write_cifar_c(tmp_path / "c10c", corruptions=(*CORR, "speckle_noise", "spatter"))
    common = ["--dataset", "cifar10-c", "--data-dir", str(data), "--model", "resnet26", "--width", "4",
              "--random-init", "--corruptions", ",".join(CORR), "--streams", "dynamic"]
    with pytest.warns(UserWarning, match="meaningless"):
        rc, cap, out = _run(tmp_path, capsys, *common, "--methods", "source,dyn,datta_disp",
                            "--calibrate-on", "speckle_noise,spatter")
    assert rc == 0, cap.err
    doc = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in doc["results"]} == {"source", "dyn", "datta_disp"}
    assert "calibration on speckle_noise, spatter" in cap.out
    rc, cap, _ = _run(tmp_path, capsys, *common, "--methods", "datta_cal")
    assert rc == 2 and "--calibrate-on" in cap.err
    rc, cap, _ = _run(tmp_path, capsys, *common, "--methods", "datta_cal", "--calibrate-on", CORR[0])
    assert rc == 2 and "disjoint" in cap.err


def test_run_reuses_datta_cal_from_the_calibration_cache(tmp_path, capsys):
    """datta_cal's choices depend on the model, the --calibrate-on data and the settings, not on
    the reported corruptions: a second run loads them from --cache-dir, --recalibrate does not."""
    data = write_cifar_c(tmp_path / "c10c", corruptions=(*CORR, "speckle_noise", "spatter"))
    common = ["--dataset", "cifar10-c", "--data-dir", str(data), "--model", "resnet26", "--width", "4",
              "--random-init", "--streams", "continual", "--methods", "datta_cal",
              "--calibrate-on", "speckle_noise,spatter", "--calibration-batches", "2",
              "--cache-dir", str(tmp_path / "cache")]
    runs = []
    for extra in (["--corruptions", "fog"], ["--corruptions", "gaussian_noise"],
                  ["--corruptions", "fog", "--recalibrate"]):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="meaningless"):
            rc, cap, out = _run(tmp_path, capsys, *common, *extra)
        assert rc == 0, cap.err
        runs.append((cap.out, json.loads((out / "results.json").read_text())["results"][0]))
    assert "loaded from the calibration cache" not in runs[0][0]
    assert "loaded from the calibration cache" in runs[1][0]
    assert "loaded from the calibration cache" not in runs[2][0]
    assert len(list((tmp_path / "cache").glob("calibration_*.pt"))) == 1
    assert runs[2][1]["accuracy"] == runs[0][1]["accuracy"]
