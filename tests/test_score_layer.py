"""The score layer in one pass of statistics, and the ``"dispersion"`` score (SPEC §2).

* ``dabn(..., stats=instance_stats(x))`` (the ``dabn_normalize`` op) equals ``dabn`` on every
  backend, shape, dtype, layout and preset, forward and backward, and passes ``opcheck``;
* the dispersion score of every backend equals the reference, with its edge rules (N = 1,
  H*W = 1, constant channels, NaN);
* a scoring ``FusedDABN`` reads x as often as the design card allows (counted backend calls);
* the default score layer, the prefix layers' blend, and the threshold calibration.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import datta_kernels as dk
from datta_kernels import backends, ops
from datta_kernels import reference as ref
from datta_kernels.diversity import ThresholdSelector, calibrate_threshold
from datta_kernels.eval.models import SmallResNet
from datta_kernels.nn import dabn_layers, first_nonlinear_layer
from datta_kernels.testing import LAYOUTS, SHAPES_ODD, make_inputs, tol

from .conftest import HAS_EXT, backend_param, backend_params

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
BACKENDS = backend_params(*BACKEND_NAMES)   # rows that cannot run here skip with the reason
DTYPES = {"reference": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
          "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
          "triton": (torch.float32, torch.float16, torch.bfloat16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
#: Triton runs in the interpreter on CPU: small shapes only
SHAPES = {"small": (4, 6, 5, 7), **{k: v for k, v in SHAPES_ODD.items() if k != "c1000"}}
BLENDS = {"datta_multiple": ((0.85, 0.0, 0.15), 4.0), "bn_adapt": ((0.6, 0.4, 0.0), None),
          "mixed3": ((0.5, 0.3, 0.2), 4.0), "instance": ((0.0, 0.0, 1.0), None)}


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _cases():
    for backend in BACKEND_NAMES:
        for dtype in DTYPES[backend]:
            for shape_name in SHAPES:
                yield backend_param(backend, dtype, shape_name)


# ------------------------------------------------------------------ dabn given its statistics
@pytest.mark.parametrize("backend,dtype,shape_name", list(_cases()))
@pytest.mark.parametrize("blend_name", list(BLENDS))
def test_dabn_with_stats_equals_dabn(backend, dtype, shape_name, blend_name):
    w, k = BLENDS[blend_name]
    inp = make_inputs(SHAPES[shape_name], dtype, _device(backend), seed=3)
    args = (inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, w)
    stats = ops.instance_stats_op(inp.x, backend)
    y = dk.dabn(*args, shrink_k=k, backend=backend, stats=stats)
    expect = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var,
                      torch.tensor(w, dtype=torch.float64), k, 1e-5)
    torch.testing.assert_close(y, expect, **tol(dtype, 4))
    # the backend's own unfused forward: bitwise where both derive the batch statistics from
    # the instance statistics alike; Triton's forward merges them from its partials instead
    same = dict(atol=0, rtol=0) if backend != "triton" else tol(dtype, 0.1)
    torch.testing.assert_close(y, dk.dabn(*args, shrink_k=k, backend=backend), **same)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("blend_name", list(BLENDS))
def test_fused_gradients_unchanged(backend, layout, blend_name):
    """Gradients through dabn_normalize equal those of the unfused dabn (and the reference)."""
    w, k = BLENDS[blend_name]
    dtype = torch.float32
    inp = make_inputs((3, 4, 5, 6), dtype, _device(backend), layout=layout, seed=5)
    dy = torch.randn(inp.x.shape, generator=torch.Generator().manual_seed(1)).to(inp.x.device)

    def grads(use_stats: bool):
        x = inp.x.detach().clone().requires_grad_()
        wt = inp.weight.detach().clone().requires_grad_()
        b = inp.bias.detach().clone().requires_grad_()
        stats = ops.instance_stats_op(x.detach(), backend) if use_stats else None
        y = dk.dabn(x, wt, b, inp.source_mean, inp.source_var, w, shrink_k=k, backend=backend,
                    stats=stats)
        (y * dy).sum().backward()
        return x.grad, wt.grad, b.grad

    for fused, plain in zip(grads(True), grads(False)):
        torch.testing.assert_close(fused, plain, atol=0, rtol=0)


def test_dabn_normalize_gradcheck_and_opcheck():
    inp = make_inputs((2, 3, 3, 4), torch.float64, "cpu", seed=7)
    blend = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for backend in [b for b in BACKENDS if b in ("reference", "cpu")]:
        def f(x, w, b, backend=backend):
            st = ops.instance_stats_op(x.detach(), backend)
            return ops.dabn_normalize_op(x, w, b, inp.source_mean, inp.source_var, blend, 4.0, 1e-5,
                                      *st, backend)

        xs = (inp.x.clone().requires_grad_(), inp.weight.clone().requires_grad_(),
              inp.bias.clone().requires_grad_())
        assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6)
        x32 = make_inputs((2, 3, 3, 4), torch.float32, "cpu", seed=8)
        st = ops.instance_stats_op(x32.x, backend)
        torch.library.opcheck(ops.dabn_normalize_op, (
            x32.x.requires_grad_(), x32.weight.requires_grad_(), x32.bias, x32.source_mean,
            x32.source_var, blend.float(), 4.0, 1e-5, *st, backend))


def test_stats_argument_is_checked():
    inp = make_inputs((2, 3, 4, 4))
    args = (inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, "tbn")
    with pytest.raises(ValueError, match=r"stats mean_i must be .*\(2, 3\)"):
        dk.dabn(*args, stats=(torch.zeros(3, 2), torch.zeros(2, 3)))
    with pytest.raises(TypeError, match="pair"):
        dk.dabn(*args, stats=torch.zeros(2, 3))


# ------------------------------------------------------------------ the dispersion score
def _disp_ref(x, sm, sv, eps=1e-5):
    """The dispersion score in float64 straight from SPEC §2's words."""
    xd = x.double()
    m = xd.shape[2] * xd.shape[3]
    mu = xd.mean((2, 3))
    cols = [(mu - sm.double()) / (sv.double() + eps).sqrt()]
    if m > 1:
        var = xd.var((2, 3), unbiased=True)
        cols.append(0.5 * torch.log((var + eps) / (sv.double() + eps)))
    z = torch.cat(cols, 1)
    return z.std(0, unbiased=False).mean(), (z - z.mean(0)).square().mean(1).sqrt()


@pytest.mark.parametrize("backend,dtype,shape_name", list(_cases()))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dispersion_score_matches_spec(backend, dtype, shape_name, layout):
    if layout != "nchw" and shape_name not in ("small", "prime"):
        pytest.skip("layouts are swept on two shapes")
    inp = make_inputs(SHAPES[shape_name], dtype, _device(backend), layout=layout, seed=11)
    score, per = dk.diversity_score(inp.x, inp.source_mean, mode="dispersion",
                                    source_var=inp.source_var, backend=backend)
    exp_score, exp_per = _disp_ref(inp.x, inp.source_mean, inp.source_var)
    assert score.shape == () and per.shape == (inp.x.shape[0],) and score.dtype == torch.float32
    t = dict(atol=1e-4, rtol=1e-4) if dtype in (torch.float32, torch.float64) else tol(dtype, 1)
    torch.testing.assert_close(score.double().cpu(), exp_score.cpu(), **t)
    torch.testing.assert_close(per.double().cpu(), exp_per.cpu(), **t)
    # the per-sample output and the score's variance form agree: mean_n d_n^2 = mean_f var_n z
    var_score, _ = dk.diversity_score(inp.x, inp.source_mean, mode="dispersion", stat="var",
                                      source_var=inp.source_var, backend=backend)
    torch.testing.assert_close(var_score, per.square().mean(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispersion_edges(backend):
    dev = _device(backend)
    sm, sv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    one = torch.randn(1, 3, 4, 4, device=dev)
    s, per = dk.diversity_score(one, sm, mode="dispersion", source_var=sv, backend=backend)
    assert float(s) == 0 and per.tolist() == [0.0]                         # N = 1
    const = torch.full((5, 3, 4, 4), 2.0, device=dev)
    s, per = dk.diversity_score(const, sm, mode="dispersion", source_var=sv, backend=backend)
    assert abs(float(s)) < 1e-6 and torch.isfinite(per).all()             # no spread, finite
    x = torch.randn(5, 3, 4, 4, device=dev)
    x[:, 1] = 7.0                                                         # one constant channel
    s, _ = dk.diversity_score(x, sm, mode="dispersion", source_var=sv, backend=backend)
    assert torch.isfinite(s)
    x[2, 0, 1, 1] = float("nan")
    s, per = dk.diversity_score(x, sm, mode="dispersion", source_var=sv, backend=backend)
    assert torch.isnan(s) and torch.isnan(per).all()      # NaN propagates; selectors say multiple
    assert KDE_says_multiple(s)
    hw1 = torch.randn(6, 3, 1, 1, device=dev)                             # only z_mu is defined
    s, _ = dk.diversity_score(hw1, sm, mode="dispersion", source_var=sv, backend=backend)
    torch.testing.assert_close(s.cpu(), (hw1[:, :, 0, 0] / (1 + 1e-5) ** 0.5).std(0, unbiased=False)
                               .mean().cpu(), atol=1e-6, rtol=1e-5)


def KDE_says_multiple(score) -> bool:
    sel = dk.KDESelector(warmup=1, window=10)
    return sel.update(score) == "multiple" and sel.count == 0


def test_dispersion_needs_source_var_and_valid_mode():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="source_var"):
        dk.diversity_score(x, torch.zeros(3), mode="dispersion")
    with pytest.raises(ValueError, match="mode must be one of"):
        dk.diversity_score(x, torch.zeros(3), mode="nosuch")
    with pytest.raises(ValueError, match="score_mode"):
        dk.FusedDABN(3, score_mode="nosuch")
    with pytest.raises(ValueError, match="score_mode"):
        dk.DATTA(SmallResNet(width=4), score_mode="nosuch")


# ------------------------------------------------------------------ passes over x
class _Counter:
    """Wraps a backend implementation and counts its calls (each documents its passes over x)."""

    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __getattr__(self, name):
        fn = getattr(self.impl, name)

        def wrapped(*a, **k):
            self.calls.append(name)
            return fn(*a, **k)
        return wrapped


#: reads of x per backend call (writes: one for each forward/normalize)
READS = {"instance_stats": 1, "diversity_angles": 1, "dispersion_score": 0, "dabn_forward": 2,
         "dabn_normalize": 1}


@pytest.mark.parametrize("mode,reads", [("dispersion", 2), ("instance", 2), ("pixel", 3)])
@pytest.mark.parametrize("grad", [False, True])
def test_score_layer_reads_x_at_most(mode, reads, grad, monkeypatch):
    name = "cpu" if HAS_EXT else "reference"
    counter = _Counter(backends.get(name).impl())
    monkeypatch.setitem(backends._LOADED, name, counter)
    layer = dk.FusedDABN(4, compute_score=True, score_mode=mode, backend=name)
    x = torch.randn(3, 4, 5, 5, requires_grad=grad)
    y = layer(x)
    assert layer.last_score is not None and layer.last_per_sample.shape == (3,)
    assert sum(READS[c] for c in counter.calls) == reads, counter.calls
    assert "dabn_forward" not in counter.calls
    # and the output is the plain layer's
    plain = dk.FusedDABN(4, backend=name)
    torch.testing.assert_close(y, plain(x), atol=0, rtol=0)


class _XReads(TorchDispatchMode):
    """Records every aten op that reads ``x``'s memory and is not a view of it (a view moves
    no bytes): measured traffic over x, not a table."""

    def __init__(self, x):
        super().__init__()
        self.ptr, self.ops = x.untyped_storage().data_ptr(), []

    def _touches(self, tree):
        return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == self.ptr
                   for t in tree_leaves(tree))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._touches((args, kwargs)) and not self._touches(out):
            self.ops.append(func.overloadpacket.__name__)
        return out


class _Measured:
    """Wraps the (pure PyTorch) reference backend: each call runs under ``_XReads``."""

    def __init__(self, impl, x):
        self.impl, self.x, self.calls = impl, x, []

    def __getattr__(self, name):
        fn = getattr(self.impl, name)

        def wrapped(*a, **k):
            with _XReads(self.x) as mode:
                out = fn(*a, **k)
            self.calls.append((name, mode.ops))
            return out
        return wrapped


@pytest.mark.parametrize("mode", ["dispersion", "instance", "pixel"])
def test_score_layer_reference_reads_measured(mode, monkeypatch):
    """The reference path's passes over x, measured op by op: the same backend calls as the
    kernels (no dabn_forward: the statistics are computed once and reused), and each call's
    reads of x are those of its PyTorch ops.  The compiled kernels fuse each call into the
    passes of ``READS`` (their design, not measurable from Python: bench_score_layer times it)."""
    x = torch.randn(3, 4, 5, 5)
    measured = _Measured(backends.get("reference").impl(), x)
    monkeypatch.setitem(backends._LOADED, "reference", measured)
    layer = dk.FusedDABN(4, compute_score=True, score_mode=mode, backend="reference")
    with torch.no_grad():
        layer(x)
    score_call = {"pixel": "diversity_angles", "instance": None, "dispersion": "dispersion_score"}
    assert [name for name, _ in measured.calls] == [
        c for c in ("instance_stats", score_call[mode], "dabn_normalize") if c], measured.calls
    reads = {name: len(ops) for name, ops in measured.calls}
    # measured: instance_stats reads x twice (mean, then the centred variance), the angles
    # twice (x - mu_s, x - mu_B), normalize once, the dispersion score never; the kernels'
    # design is one read per call (READS): 2, 2, 3 against these 3, 3, 5
    assert reads == {"instance_stats": 2, "dabn_normalize": 1,
                     **({"diversity_angles": 2} if mode == "pixel" else {}),
                     **({"dispersion_score": 0} if mode == "dispersion" else {})}, measured.calls
    assert sum(reads.values()) == {"dispersion": 3, "instance": 3, "pixel": 5}[mode]


# ------------------------------------------------------------------ score layer, prefix, selector
def test_first_nonlinear_layer():
    model = dk.convert_model(SmallResNet(width=4))
    layers = dabn_layers(model)
    before = copy.deepcopy(model.state_dict())
    model.train()
    i = first_nonlinear_layer(model, torch.zeros(2, 1, 28, 28))
    assert [n for n, m in model.named_modules() if m is layers[i]] == ["layers.0.bn1"]
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    # a purely affine stack (conv -> BN -> conv -> BN) has no nonlinear BN input: layer 0
    lin = dk.convert_model(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1),
                                         nn.BatchNorm2d(3)))
    assert first_nonlinear_layer(lin, torch.zeros(1, 1, 8, 8)) == 0
    relu = dk.convert_model(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                          nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    assert first_nonlinear_layer(relu, torch.zeros(1, 1, 8, 8)) == 1


def test_datta_dispersion_prefix_uses_multiple_blend():
    """Layers before the score layer normalise with the 'multiple' blend; the decision reaches
    the score layer and every later one."""
    torch.manual_seed(0)
    model = SmallResNet(width=4).eval()
    x = torch.randn(8, 1, 28, 28)
    ad = dk.DATTA(copy.deepcopy(model), score_mode="dispersion", selector=ThresholdSelector(1e9),
                  daft=False)
    assert ad.score_layer is None
    out = ad(x)
    assert ad.score_layer == "layers.0.bn1" and ad.last_decision == "single"
    # the layers before the score layer keep 'multiple' (what they normalised with); the
    # decision is written into the score layer and every later one
    assert [bool(lyr.decision) for lyr in ad.layers] == [False] + [True] * (len(ad.layers) - 1)
    state = ad.state_dict()                         # a loaded state: the prefix is written again
    state["model.bn1.decision"] = torch.tensor(True)
    ad.load_state_dict(state)
    assert bool(ad.layers[0].decision)
    ad(x)
    assert [bool(lyr.decision) for lyr in ad.layers] == [False] + [True] * (len(ad.layers) - 1)
    # the same logits by hand: bn1 on 'multiple', every other layer on 'single'
    ref_model = dk.convert_model(copy.deepcopy(model))
    for i, lyr in enumerate(dabn_layers(ref_model)):
        lyr.set_decision("multiple" if i == 0 else "single")
    with torch.no_grad():
        torch.testing.assert_close(out, ref_model(x), atol=0, rtol=0)
    # the authors' score layer stays the first one
    assert dk.DATTA(copy.deepcopy(model)).score_layer == "bn1"
    named = dk.DATTA(copy.deepcopy(model), score_mode="dispersion", score_layer="layers.1.bn1")
    named(x)
    assert named.score_layer == "layers.1.bn1"


def test_datta_dispersion_compiles_once():
    """DATTA(torch.compile(model), score_mode="dispersion"): after the first batches (the
    score-layer probe, the first decisions) no batch compiles again while decisions flip, and
    predictions match the eager adapter."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SmallResNet(width=4).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 1, 28, 28, generator=g) * (1 + 3 * (k % 2)) for k in range(10)]
    scores = dk.DATTA(copy.deepcopy(model), score_mode="dispersion", daft=False, selector=0.0)
    vals = []
    for x in batches:
        scores(x)
        vals.append(scores.last_score)
    t = sorted(vals)[len(vals) // 2]
    counter = CompileCounter()
    eager = dk.DATTA(copy.deepcopy(model), score_mode="dispersion", daft=False, selector=t)
    compiled = dk.DATTA(torch.compile(copy.deepcopy(model), backend=counter),
                        score_mode="dispersion", daft=False, selector=t)
    frames, decisions = [], []
    for x in batches:
        torch.testing.assert_close(compiled(x), eager(x), **tol(torch.float32, 5.0))
        decisions.append(eager.last_decision)
        frames.append(counter.frame_count)
    assert len(set(decisions)) == 2, "the stream must flip the decision"
    assert frames[-1] == frames[len(frames) // 2], frames


def test_calibrate_threshold():
    assert calibrate_threshold([0.1, 0.2, 0.3], [0.5, 0.6]) == pytest.approx(0.4)
    # overlapping: the cut with the best balanced accuracy, at the middle of its gap
    t = calibrate_threshold([0.1, 0.2, 0.35, 0.9], [0.3, 0.5, 0.6, 0.7])
    assert 0.2 < t < 0.3 or 0.35 < t < 0.5
    assert calibrate_threshold([0.1, float("nan")], [0.2]) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="finite"):
        calibrate_threshold([float("nan")], [0.1])


@pytest.mark.skipif(not HAS_EXT, reason="needs the compiled extension")
@pytest.mark.parametrize("parts", ["mean", "logstd", "both"])
@pytest.mark.parametrize("stat", ["std", "var"])
@pytest.mark.parametrize("m", [1, 20])
def test_cpu_dispersion_kernel_matches_reference(parts, stat, m):
    g = torch.Generator().manual_seed(2)
    mean, var = torch.randn(7, 5, generator=g), torch.rand(7, 5, generator=g)
    sm, sv = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1
    got = torch.ops.datta._dispersion_score(mean, var, sm, sv, m, 1e-5, parts, stat)
    want = ref.dispersion_score(mean, var, sm, sv, m, 1e-5, parts, stat)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.library.opcheck(torch.ops.datta._dispersion_score, (mean, var, sm, sv, m, 1e-5, parts, stat))
    with pytest.raises(RuntimeError, match="parts must be"):
        torch.ops.datta._dispersion_score(mean, var, sm, sv, m, 1e-5, "nosuch", stat)
