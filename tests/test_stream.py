"""Stream statistics for ``skewed`` batches (SPEC §3c): the fold, the C++ op, the layer, the
adapter, ``torch.compile`` and checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import ops
from datta_kernels import reference as ref
from datta_kernels.nn import FusedDABN, stream_anchor

needs_op = pytest.mark.skipif(not ops.HAS_KERNEL_OPS, reason="C++ extension not built")
DECISIONS = {"single": (True, False), "multiple": (False, False), "skewed": (False, True),
             "single, skewed flag set": (True, True)}


def _batch64(mean_i, var_i, m):
    """D4's batch statistics from the instance statistics (unbiased over N M), float64 numpy."""
    mu, var = mean_i.double().numpy(), var_i.double().numpy()
    n = mu.shape[0]
    mu_b = mu.mean(0)
    ss = ((m - 1) * var + m * (mu - mu_b) ** 2).sum(0)
    return mu_b, (ss / (n * m - 1) if n * m > 1 else np.zeros_like(mu_b))


def _div64(mean_i, var_i, m, stream_mean, stream_var, eps=1e-5):
    """SPEC §3c "reset": the symmetric KL divergence of the per-channel Gaussians of the batch
    and of the stream statistics, averaged over channels (float64)."""
    mu_b, var_b = _batch64(mean_i, var_i, m)
    a, b = var_b + eps, stream_var.double().numpy() + eps
    d2 = (mu_b - stream_mean.double().numpy()) ** 2
    return float(np.mean(0.5 * (a / b + b / a) - 1 + 0.5 * d2 * (1 / a + 1 / b)))


def _fold64(mean_i, var_i, m, stream_mean, stream_var, momentum, reset=None):
    """SPEC §3c in float64 numpy: D4's batch statistics, then s + momentum (b - s); with a
    ``reset`` cut, momentum 1 where the batch's divergence from the stream exceeds it."""
    mu_b, var_b = _batch64(mean_i, var_i, m)
    if reset is not None and _div64(mean_i, var_i, m, stream_mean, stream_var) > reset:
        momentum = 1.0
    sm, sv = stream_mean.double().numpy(), stream_var.double().numpy()
    return sm + momentum * (mu_b - sm), sv + momentum * (var_b - sv)


def _case(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g), torch.rand(n, c, generator=g) + 0.1,
            torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5,
            torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)


@pytest.mark.parametrize("decision", list(DECISIONS))
@pytest.mark.parametrize("n,c,m", [(5, 3, 16), (1, 4, 9), (1, 2, 1), (7, 1, 1)])
@pytest.mark.parametrize("momentum", [0.05, 1.0])
@pytest.mark.parametrize("reset", ["none", "far", "near"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("op", marks=needs_op)])
def test_stream_anchor_matches_float64(decision, n, c, m, momentum, reset, impl):
    """The fold (and with a reset cut below / above the batch's divergence from the stream, the
    restart / the plain fold) against float64."""
    mean_i, var_i, sm, sv, src_m, src_v = _case(n, c)
    stream = (sm.clone(), sv.clone())
    single, skewed = (torch.tensor(v) for v in DECISIONS[decision])
    div = _div64(mean_i, var_i, m, sm, sv)
    cut = {"none": None, "far": div / 2, "near": div * 2}[reset]
    if impl == "op":
        got = torch.ops.datta._stream_anchor(mean_i, var_i, m, *stream, src_m, src_v, single, skewed,
                                             momentum, cut, 1e-5)
    else:
        got = stream_anchor(mean_i, var_i, m, *stream, src_m, src_v, single, skewed, momentum, cut, 1e-5)
    folds = decision != "multiple"
    want_m, want_v = (_fold64(mean_i, var_i, m, sm, sv, momentum, cut) if folds
                      else (sm.double(), sv.double()))
    if reset == "far" and folds:        # restarted at the batch statistics
        torch.testing.assert_close(want_m, _batch64(mean_i, var_i, m)[0])
    torch.testing.assert_close(stream[0].double(), torch.as_tensor(want_m), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stream[1].double(), torch.as_tensor(want_v), rtol=1e-6, atol=1e-6)
    anchor = stream if decision == "skewed" else (src_m, src_v)
    assert torch.equal(got[0], anchor[0]) and torch.equal(got[1], anchor[1])
    # the inputs other than the stream buffers are not written
    again = _case(n, c)
    for a, b in zip((mean_i, var_i, src_m, src_v), (again[0], again[1], again[4], again[5])):
        assert torch.equal(a, b)


@needs_op
def test_stream_anchor_op_is_the_torch_function_and_checks_its_input():
    mean_i, var_i, sm, sv, src_m, src_v = _case(6, 5, seed=3)
    for single, skewed in DECISIONS.values():
        a, b = (sm.clone(), sv.clone()), (sm.clone(), sv.clone())
        flags = (torch.tensor(single), torch.tensor(skewed))
        for cut in (None, 0.05, 1e3):
            a, b = (sm.clone(), sv.clone()), (sm.clone(), sv.clone())
            got = torch.ops.datta._stream_anchor(mean_i, var_i, 12, *a, src_m, src_v, *flags, 0.3, cut)
            want = stream_anchor(mean_i, var_i, 12, *b, src_m, src_v, *flags, 0.3, cut)
            for x, y in zip(got + a, want + b):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    args = [mean_i, var_i, 12, sm.clone(), sv.clone(), src_m, src_v, torch.tensor(False),
            torch.tensor(True), 0.3]
    for i, bad, match in [(9, 0.0, "momentum"), (9, 1.5, "momentum"), (3, sm[:-1].clone(), "stream"),
                          (7, torch.tensor(1), "bool"), (1, var_i[:, :-1], "equal"),
                          (0, mean_i[:0], "non-empty"), (2, 0, "m >= 1"), (5, src_m[:-1], "source")]:
        bad_args = list(args)
        bad_args[i] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.datta._stream_anchor(*bad_args)
    for bad in (0.0, -1.0):
        with pytest.raises(RuntimeError, match="reset cut"):
            torch.ops.datta._stream_anchor(*args, bad)


def _layer(c=3, backend="auto"):
    layer = FusedDABN(c, weights=((0.0, 1.0, 0.0), (0.2, 0.6, 0.2), (1.0, 0.0, 0.0)), shrink_k=None,
                      backend=backend).eval()
    g = torch.Generator().manual_seed(5)
    layer.set_source_stats(torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
    return layer


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_layer_blends_the_stream_statistics_on_skewed_batches(backend):
    """A stream of batches decided single / multiple / skewed: the stream statistics fold every
    batch not decided multiple (float64 rendering), a skewed batch's source term is the updated
    stream statistics, the others' the source statistics."""
    layer, plain = _layer(backend=backend), _layer(backend=backend)
    layer.set_stream(0.25)
    g = torch.Generator().manual_seed(9)
    sm, sv = layer.source_mean.clone(), layer.source_var.clone()
    for k, decision in enumerate(["single", "skewed", "multiple", "skewed", "single", "skewed"]):
        x = torch.randn(4, 3, 5, 6, generator=g) * (1 + k) + k
        for lay in (layer, plain):
            lay.set_decision(decision)
        with torch.no_grad():
            y = layer(x)
        if decision != "multiple":
            mean_i, var_i = ref.instance_stats(x)
            sm, sv = (torch.as_tensor(v) for v in _fold64(mean_i, var_i, 30, sm, sv, 0.25))
        torch.testing.assert_close(layer.stream_mean.double(), sm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.stream_var.double(), sv, rtol=1e-5, atol=1e-6)
        anchor = (sm.float(), sv.float()) if decision == "skewed" else (layer.source_mean, layer.source_var)
        want = ref.dabn(x, layer.weight, layer.bias, *anchor, layer.blend(), None, layer.eps)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        if decision != "skewed":        # the other decisions: the plain layer's output
            with torch.no_grad():
                torch.testing.assert_close(y, plain(x), rtol=1e-6, atol=1e-6)
    # set_stream restarts from the source statistics; None: the source statistics again
    layer.set_stream(None)
    assert torch.equal(layer.stream_mean, layer.source_mean) and layer.stream_momentum is None
    layer.set_decision("skewed")
    plain.set_decision("skewed")
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="momentum"):
            layer.set_stream(bad)
    for momentum, reset in ((None, 1.0), (0.1, 0.0), (0.1, -1.0), (0.1, float("nan"))):
        with pytest.raises(ValueError, match="reset"):
            layer.set_stream(momentum, reset)
    layer.set_stream(0.1, 2.0)
    assert (layer.stream_momentum, layer.stream_reset) == (0.1, 2.0)


def test_layer_stream_gradients_and_checkpoints():
    """With a graph (DAFT's pass) the output still differentiates to x and gamma/beta; the
    stream buffers round-trip in the state_dict, and a checkpoint without them (a plain
    BatchNorm2d's, or an older FusedDABN's) starts them at the running statistics."""
    layer = _layer()
    layer.set_stream(0.5)
    layer.set_decision("skewed")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert not torch.equal(layer.stream_mean, layer.source_mean)
    state = layer.state_dict()
    assert {"stream_mean", "stream_var"} <= set(state)
    other = _layer()
    other.load_state_dict(state)
    assert torch.equal(other.stream_mean, layer.stream_mean)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    fresh = FusedDABN(3)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    assert torch.equal(fresh.stream_mean, bn.running_mean) and torch.equal(fresh.stream_var, bn.running_var)
    older = {k: v for k, v in state.items() if not k.startswith("stream_")}
    fresh.load_state_dict(older, strict=True)
    assert torch.equal(fresh.stream_mean, state["running_mean"])


def test_layer_stream_compiles_once():
    """The stream fold is tensor state: a compiled model follows the decisions and the stream
    buffers of the eager one across batches, in one frame."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(2, 3, 3), _layer(), nn.ReLU())
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m[1].set_stream(0.2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for decision in ("single", "skewed", "multiple", "skewed"):
        x = torch.randn(4, 2, 7, 7, generator=g)
        for m in (model, twin):
            m[1].set_decision(decision)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), twin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[1].stream_mean, twin[1].stream_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model[1].stream_var, twin[1].stream_var, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("daft", [False, True])
@pytest.mark.parametrize("reset", [None, 0.5])
def test_adapter_folds_each_batch_once(daft, reset):
    """Under DATTA, each layer from the score layer on folds every batch not decided multiple
    exactly once, DAFT's second forward of a single batch included (the fused CPU score layer
    undoes its fold before that forward); the layers before the score layer never fold.  With a
    reset cut, each layer restarts where its own divergence exceeds it (both happen here)."""
    adapter = dk.DATTA(_model(), score_mode="dispersion", selector=dk.ThresholdSelector(0.2, low=0.01),
                       daft=daft, lr=1e-2, weights=((0.0, 1.0, 0.0), (0.2, 0.6, 0.2), (1.0, 0.0, 0.0)),
                       shrink_k=None)
    seen = {}
    for i, layer in enumerate(adapter.layers):
        layer.set_stream(0.3, reset)
        layer.register_forward_pre_hook(lambda mod, inp, i=i: seen.setdefault(i, []).append(inp[0].detach()))
    g = torch.Generator().manual_seed(4)
    expected = {i: (layer.stream_mean.double(), layer.stream_var.double())
                for i, layer in enumerate(adapter.layers)}
    decisions, restarts = [], []
    for k in range(8):
        x = torch.randn(8, 1, 12, 12, generator=g) * (0.2 + k % 3) + (k % 4)
        if k % 4 == 3:      # near-duplicates: skewed
            x = x[:1].expand(8, 1, 12, 12) + 0.01 * torch.randn(8, 1, 12, 12, generator=g)
        if k % 4 == 1:      # two domains: multiple
            x = torch.cat([x[:4], x[4:] * 5 - 3])
        seen.clear()
        adapter(x)
        decisions.append(adapter.last_decision)
        score_at = adapter._score_at
        for i, layer in enumerate(adapter.layers):
            if i >= score_at and adapter.last_decision != "multiple":
                inp = seen[i][-1]           # the forward whose output was kept
                stats = (*ref.instance_stats(inp), inp.shape[2] * inp.shape[3])
                if reset is not None:
                    restarts.append(_div64(*stats, *expected[i]) > reset)
                expected[i] = tuple(torch.as_tensor(v) for v in _fold64(*stats, *expected[i], 0.3, reset))
            torch.testing.assert_close(layer.stream_mean.double(), expected[i][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.stream_var.double(), expected[i][1], rtol=1e-5, atol=1e-6)
    assert adapter._score_at > 0 and set(decisions) == {"single", "multiple", "skewed"}
    assert reset is None or set(restarts) == {True, False}
    assert not daft or adapter.n_updates > 0
    adapter.reset()
    for layer in adapter.layers:
        assert torch.equal(layer.stream_mean, layer.source_mean) and layer.stream_momentum == 0.3


@needs_op
@pytest.mark.parametrize("decision", ["single", "multiple", "skewed"])
@pytest.mark.parametrize("reset", [None, 1e-3])
@pytest.mark.parametrize("dtype,channels_last,shrink_k", [(torch.float32, False, None),
                                                          (torch.float32, True, 4.0),
                                                          (torch.float64, False, None),
                                                          (torch.bfloat16, False, None)], ids=str)
def test_stream_forward_op_is_the_separate_ops(decision, reset, dtype, channels_last, shrink_k):
    """``datta::_dabn_stream_forward`` (the layer's graph-free CPU path) gives bit for bit what
    _instance_stats + _stream_anchor + _dabn_normalize give: y and the stream statistics."""
    layer = _layer(4)
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(5, 4, 6, 7, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    blends = [torch.tensor(w) for w in ((0.0, 1.0, 0.0), (0.2, 0.6, 0.2), (0.6, 0.0, 0.4))]
    single, skewed = (torch.tensor(v) for v in DECISIONS[decision])
    sm, sv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    a, b = (sm.clone(), sv.clone()), (sm.clone(), sv.clone())
    common = (layer.weight, layer.bias, layer.source_mean, layer.source_var)
    y = torch.ops.datta._dabn_stream_forward(x, *common, *blends, shrink_k, 1e-5, *a, single, skewed, 0.2,
                                             reset)
    mean_i, var_i = torch.ops.datta._instance_stats(x)
    am, av = torch.ops.datta._stream_anchor(mean_i, var_i, 42, *b, layer.source_mean, layer.source_var,
                                            single, skewed, 0.2, reset, 1e-5)
    blend = blends[{"single": 0, "multiple": 1, "skewed": 2}[decision]]
    want = torch.ops.datta._dabn_normalize(x, layer.weight, layer.bias, am, av, blend, shrink_k, 1e-5,
                                           mean_i, var_i)
    assert torch.equal(y, want) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], sm) == (decision == "multiple")
    with pytest.raises(RuntimeError, match="momentum"):
        torch.ops.datta._dabn_stream_forward(x, *common, *blends, shrink_k, 1e-5, *a, single, skewed, 0.0)
