"""FusedDABN as a drop-in BatchNorm2d: conversion, checkpoints, copies, presets, compile."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import FusedDABN, convert_model, revert_model
from datta_kernels.nn import dabn_layers
from datta_kernels.testing import tol

from .conftest import backend_params

BACKENDS = backend_params("reference", "cpu", "triton")   # a row that cannot run skips with the reason
DABN_KEYS = {"source_mean", "source_var", "blend_single", "blend_multiple", "blend_skewed", "decision",
             "skewed", "stream_mean", "stream_var"}


class Block(nn.Module):
    """ResNet basic block with a downsampling shortcut (conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A 7-BN ResNet: stem (conv, bn1) -> two blocks -> pool -> fc.  (N, 3, H, W) -> (N, K)."""

    def __init__(self, classes: int = 5, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_resnet(seed: int = 0, classes: int = 5) -> TinyResNet:
    """A TinyResNet in eval mode with non-trivial running statistics and affine parameters
    (what a trained model looks like to BatchNorm), measured on a reference input."""
    torch.manual_seed(seed)
    model = TinyResNet(classes)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None          # cumulative average: exact source statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        for _ in range(4):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def test_convert_keeps_everything():
    model = tiny_resnet()
    model.layer1.bn2.weight.requires_grad_(False)
    model.layer2.train()
    plain = model.state_dict()
    convert_model(model, "datta", backend="reference")
    layers = dabn_layers(model)
    assert len(layers) == 7 and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    sd = model.state_dict()
    assert set(sd) == set(plain) | {f"{k.rsplit('.', 1)[0]}.{b}" for k in plain
                                    if k.endswith("running_mean") for b in DABN_KEYS}
    for k, v in plain.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    for name, layer in model.named_modules():
        if isinstance(layer, FusedDABN):
            torch.testing.assert_close(layer.source_mean, plain[f"{name}.running_mean"], rtol=0, atol=0)
            torch.testing.assert_close(layer.source_var, plain[f"{name}.running_var"], rtol=0, atol=0)
            assert layer.backend == "reference" and layer.preset == "datta" and layer.shrink_k == 4.0
    assert not model.layer1.bn2.weight.requires_grad and model.layer1.bn1.weight.requires_grad
    assert model.layer2.bn1.training and not model.bn1.training


def test_convert_sync_batchnorm():
    """DDP-trained models carry nn.SyncBatchNorm: converted like BatchNorm2d, same outputs as
    converting the equivalent BatchNorm2d model (local statistics when torch.distributed is
    not initialised; tests/test_distributed.py covers the synchronised case)."""
    plain = tiny_resnet()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    a, b = convert_model(plain, "datta"), convert_model(synced, "datta")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in b.modules())
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_plain_checkpoint_loads_strict():
    src = tiny_resnet(1)
    model = convert_model(tiny_resnet(2))
    model.bn1.set_decision("multiple")
    result = model.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model.bn1.source_mean, src.bn1.running_mean, rtol=0, atol=0)
    assert not bool(model.bn1.decision)  # not in the checkpoint: kept
    # a DABN checkpoint restores everything, including the decision and blend weights
    other = convert_model(tiny_resnet(3), weights=((0.5, 0.5, 0.0), (1.0, 0.0, 0.0)))
    other.load_state_dict(model.state_dict(), strict=True)
    assert not bool(other.bn1.decision)
    torch.testing.assert_close(other.bn1.blend_multiple, torch.tensor([0.85, 0.0, 0.15]))
    # a checkpoint missing a real BN key still fails strictly
    bad = src.state_dict()
    del bad["bn1.weight"]
    with pytest.raises(RuntimeError, match="bn1.weight"):
        model.load_state_dict(bad, strict=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_preset_equals_eval_batchnorm(backend):
    model = tiny_resnet()
    x = torch.randn(4, 3, 12, 12)
    want = model(x)
    got = convert_model(copy.deepcopy(model), "source", backend=backend)(x)
    torch.testing.assert_close(got, want, **tol(torch.float32, 5))
    # the score layer flag does not change the output
    conv = convert_model(copy.deepcopy(model), "source", backend=backend)
    conv.bn1.compute_score = True
    torch.testing.assert_close(conv(x), want, **tol(torch.float32, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_functional_for_both_decisions(backend):
    layer = FusedDABN(6, preset="datta", backend=backend)
    with torch.no_grad():
        layer.set_source_stats(torch.randn(6), torch.rand(6) + 0.5)
        layer.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, 5, 5)
    for decision in ("single", "multiple"):
        layer.set_decision(decision)
        want = dk.dabn(x, layer.weight, layer.bias, layer.source_mean, layer.source_var,
                       getattr(dk.PRESETS["datta"], decision), shrink_k=4.0, backend="reference")
        torch.testing.assert_close(layer(x), want, **tol(torch.float32))
    running = layer.running_mean.clone()
    layer.train()
    y_train = layer(x)
    layer.eval()
    torch.testing.assert_close(y_train, layer(x), rtol=0, atol=0)  # train/eval: same semantics
    torch.testing.assert_close(layer.running_mean, running, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == 0


def test_source_copy_survives_tent_style_surgery():
    layer = FusedDABN(4, preset="source")
    layer.set_source_stats(torch.arange(4.0), torch.full((4,), 2.0))
    x = torch.randn(2, 4, 3, 3)
    want = layer(x)
    layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


def test_copies_pickle_and_dtype():
    model = convert_model(tiny_resnet())
    model.bn1.set_decision("multiple")
    x = torch.randn(3, 3, 12, 12)
    want = model(x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        assert not bool(other.bn1.decision)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = convert_model(tiny_resnet(5))
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    m64 = copy.deepcopy(model).to(torch.float64)
    assert m64.bn1.source_mean.dtype == torch.float64 and m64.bn1.blend_single.dtype == torch.float32
    torch.testing.assert_close(m64(x.double()).float(), want, **tol(torch.float32))
    half = copy.deepcopy(model).half()  # blend weights stay exact float32 (fp16 would not sum to 1)
    torch.testing.assert_close(half.bn1.blend_multiple, model.bn1.blend_multiple, rtol=0, atol=0)


def test_revert_round_trip():
    model = tiny_resnet()
    plain = copy.deepcopy(model.state_dict())
    conv = convert_model(copy.deepcopy(model))
    with torch.no_grad():
        conv.bn1.weight.add_(0.25)      # an adapted gamma
        conv.bn1.running_mean.zero_()   # damaged running stats: the source copy wins
    back = revert_model(conv)
    assert type(back.bn1) is nn.BatchNorm2d and not dabn_layers(back)
    assert set(back.state_dict()) == set(plain)
    torch.testing.assert_close(back.bn1.running_mean, plain["bn1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(back.bn1.weight, plain["bn1.weight"] + 0.25, rtol=0, atol=0)
    torch.testing.assert_close(back.layer1.bn2.weight, plain["layer1.bn2.weight"], rtol=0, atol=0)
    assert isinstance(convert_model(nn.BatchNorm2d(3)), FusedDABN)
    assert type(revert_model(FusedDABN(3))) is nn.BatchNorm2d


def test_repr_like_batchnorm():
    bn, layer = nn.BatchNorm2d(8, eps=1e-3, momentum=None), FusedDABN(8, eps=1e-3, momentum=None)
    assert repr(layer) == repr(bn).replace("BatchNorm2d", "FusedDABN")[:-1] + ", preset='datta')"
    assert "shrink_k=2.0" in repr(FusedDABN(8, shrink_k=2.0))


def test_score_flag_stores_score():
    layer = FusedDABN(6, compute_score=True, score_mode="instance")
    layer.set_source_stats(torch.randn(6), torch.ones(6))
    x = torch.randn(5, 6, 4, 4)
    layer(x)
    want, angles = dk.diversity_score(x, layer.source_mean, mode="instance")
    torch.testing.assert_close(layer.last_score, want)
    torch.testing.assert_close(layer.last_angles, angles)


def test_compile_does_not_recompile_on_decision_flip():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = convert_model(tiny_resnet(), backend="reference")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    for i, decision in enumerate(["single", "multiple", "single", "multiple"]):
        for layer in dabn_layers(model):
            layer.set_decision(decision)
        if i == 3:
            for layer in dabn_layers(model):
                layer.set_preset("bn_adapt", shrink_k=4.0)  # new weights, same shrink_k
        torch.testing.assert_close(compiled(x), model(x), **tol(torch.float32))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_with_auto_backend(dtype):
    """The default backend ("auto") resolves while the graph is traced: no graph break, one
    frame (resolution reads extension state that dynamo cannot trace)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = convert_model(tiny_resnet()).to(dtype)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    for decision in ("single", "multiple"):
        for layer in dabn_layers(model):
            layer.set_decision(decision)
        torch.testing.assert_close(compiled(x), model(x), **tol(dtype))
    assert counter.frame_count == 1


def test_autocast_bf16_matches_reference_backend():
    """Under CPU autocast the convs hand bf16 activations to FusedDABN (fp32 parameters):
    the fused backend follows the reference, and a DATTA step still updates gamma/beta."""
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for backend in ("auto", "reference"):
        model = convert_model(tiny_resnet(), backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x))
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **tol(torch.bfloat16, 2.0))
    model = convert_model(tiny_resnet())
    adapter = dk.DATTA(model, selector=dk.ThresholdSelector(1e9), lr=1e-2)
    params = [p for layer in dabn_layers(model) for p in (layer.weight, layer.bias)]
    before = [p.detach().clone() for p in params]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapter(x)
    assert adapter.last_decision == "single"
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset 'dataa'"):
        FusedDABN(4, preset="dataa")
    with pytest.raises(ValueError, match="sum to 1"):
        FusedDABN(4, weights=((0.5, 0.4, 0.0), (1.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match=">= 0"):
        FusedDABN(4, weights=((1.5, -0.5, 0.0), (1.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="pair"):
        FusedDABN(4, weights=(0.6, 0.4, 0.0))
    with pytest.raises(ValueError, match="shrink_k"):
        FusedDABN(4, shrink_k=-1.0)
    with pytest.raises(ValueError, match="'single', 'multiple', 'skewed'"):
        FusedDABN(4).set_decision("singel")
    with pytest.raises(ValueError, match="no nn.BatchNorm2d"):
        convert_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(ValueError, match="already has 7 FusedDABN"):
        convert_model(convert_model(tiny_resnet()))
    with pytest.raises(ValueError, match="unknown preset"):
        convert_model(tiny_resnet(), "nope")
    with pytest.raises(ValueError, match="no FusedDABN"):
        revert_model(tiny_resnet())
