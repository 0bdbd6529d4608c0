"""Every backend against the reference: shape x dtype x layout x preset x shrink, odd shapes,
gradients, gradcheck, bad input, and torch.compile.

The Triton backend has its own tiny-shape module (``test_triton.py``) because its CPU
interpreter is too slow for this sweep.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import datta_kernels as dk
from datta_kernels import backends
from datta_kernels import reference as ref
from datta_kernels.backends.base import acc_dtype
from datta_kernels.testing import LAYOUTS, SHAPES_ODD, make_inputs, to_layout, tol

from .conftest import HAS_EXT, backend_params

#: a row per backend; rows that cannot run here skip with the reason (conftest)
SWEEP_BACKENDS = backend_params("reference", "cpu", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

#: (label, blend, shrink_k): every SPEC preset/decision that differs, plus arbitrary weights
BLENDS = [
    ("datta-single", (0.6, 0.4, 0.0), None),
    ("datta-multiple", (0.85, 0.0, 0.15), 4.0),
    ("icme-multiple", (0.85, 0.15, 0.0), None),
    ("tbn", (0.0, 1.0, 0.0), None),
    ("source", (1.0, 0.0, 0.0), None),
    ("instance", (0.0, 0.0, 1.0), None),
    ("custom", (0.2, 0.3, 0.5), None),
    ("custom-shrink", (0.2, 0.3, 0.5), 1.0),
]


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _run(inp, blend, shrink_k, backend, eps=1e-5):
    return dk.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, blend,
                   shrink_k=shrink_k, eps=eps, backend=backend)


def _expect(inp, blend, shrink_k, eps=1e-5):
    bl = torch.tensor(blend, dtype=torch.float64, device=inp.x.device)
    return ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, bl, shrink_k, eps)


def _same_format(y, x):
    for fmt in (torch.contiguous_format, torch.channels_last):
        if x.is_contiguous(memory_format=fmt) and not (fmt == torch.channels_last and x.is_contiguous()):
            return y.is_contiguous(memory_format=fmt)
    return y.is_contiguous()  # strided inputs come back NCHW-contiguous


# ---------------------------------------------------------------- forward sweep
@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,blend,shrink_k", BLENDS, ids=[b[0] for b in BLENDS])
@pytest.mark.parametrize("shape", [(4, 8, 6, 6), (3, 17, 9, 5)])
def test_forward_sweep(backend, dtype, layout, label, blend, shrink_k, shape):
    inp = make_inputs(shape, dtype, _device_for(backend), layout, seed=sum(map(ord, label)))
    y = _run(inp, blend, shrink_k, backend)
    assert y.dtype == dtype and y.shape == inp.x.shape
    assert _same_format(y, inp.x)
    assert_close(y, _expect(inp, blend, shrink_k), **tol(dtype))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES_ODD))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_odd_shapes(backend, name, layout, dtype):
    inp = make_inputs(SHAPES_ODD[name], dtype, _device_for(backend), layout)
    for blend, k in (((0.2, 0.3, 0.5), 1.0), ((0.0, 1.0, 0.0), None), ((0.0, 0.0, 1.0), None)):
        y = _run(inp, blend, k, backend)
        assert torch.isfinite(y).all()
        assert_close(y, _expect(inp, blend, k), **tol(dtype))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_offset_fp32(backend, layout):
    """``1e4 + noise``: raw sum-of-squares variance in fp32 would be garbage here."""
    inp = make_inputs((4, 5, 16, 16), torch.float32, _device_for(backend), layout, offset=1e4)
    x64 = inp.x.double()
    for blend, k in (((0.0, 0.0, 1.0), None), ((0.0, 1.0, 0.0), None), ((0.85, 0.0, 0.15), 4.0)):
        y = _run(inp, blend, k, backend)
        bl = torch.tensor(blend, dtype=torch.float64)
        exact = ref.dabn(x64, inp.weight.double(), inp.bias.double(), inp.source_mean.double(),
                         inp.source_var.double(), bl, k)
        # x itself is only representable to ulp(1e4) ~ 1e-3 in fp32, so compare at that scale
        assert_close(y.double(), exact, atol=5e-3, rtol=5e-3)
    mean, var = dk.instance_stats(inp.x, backend=backend)
    assert_close(var.double(), x64.var(dim=(2, 3)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_stats(backend, dtype, layout):
    inp = make_inputs((3, 7, 5, 6), dtype, _device_for(backend), layout)
    mean, var = dk.instance_stats(inp.x, backend=backend)
    em, ev = ref.instance_stats(inp.x)
    assert mean.dtype == acc_dtype(dtype) and mean.shape == (3, 7)
    assert_close(mean, em, **tol(torch.float32 if dtype != torch.float64 else dtype))
    assert_close(var, ev, **tol(torch.float32 if dtype != torch.float64 else dtype))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("mode", ["pixel", "instance"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_diversity_score(backend, mode, layout, dtype):
    inp = make_inputs((6, 9, 5, 5), dtype, _device_for(backend), layout)
    score, angles = dk.diversity_score(inp.x, inp.source_mean, mode=mode, backend=backend)
    escore, eangles = ref.diversity_score(inp.x, inp.source_mean, mode=mode)
    assert score.dtype == torch.float32 and score.dim() == 0 and angles.shape == (6,)
    assert score.device == inp.x.device
    assert_close(angles, eangles, atol=1e-4, rtol=1e-4)
    assert_close(score, escore, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label,blend,shrink_k", BLENDS, ids=[b[0] for b in BLENDS])
def test_backward_sweep(backend, dtype, layout, label, blend, shrink_k):
    inp = make_inputs((3, 6, 5, 4), dtype, _device_for(backend), layout)
    dy = to_layout(torch.randn(inp.x.shape, generator=torch.Generator().manual_seed(1)).to(dtype), layout)

    def grads(fn):
        x = inp.x.detach().clone().requires_grad_()
        w = inp.weight.detach().clone().requires_grad_()
        b = inp.bias.detach().clone().requires_grad_()
        y = fn(x, w, b)
        return torch.autograd.grad(y, (x, w, b), dy)

    bl = torch.tensor(blend, dtype=torch.float64)
    got = grads(lambda x, w, b: dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend,
                                        shrink_k=shrink_k, backend=backend))
    exp = grads(lambda x, w, b: ref.dabn(x, w, b, inp.source_mean, inp.source_var, bl, shrink_k))
    assert got[0].dtype == dtype and _same_format(got[0], inp.x)
    assert_close(got[0], exp[0], **tol(dtype, 2.0))
    # weight/bias grads are sums over N*H*W products of rounded values: wider tolerance
    assert_close(got[1], exp[1], **tol(torch.float32 if dtype == torch.float32 else dtype, 10.0))
    assert_close(got[2], exp[2], **tol(torch.float32 if dtype == torch.float32 else dtype, 10.0))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("blend,shrink_k", [((0.3, 0.3, 0.4), None), ((0.2, 0.3, 0.5), 0.7),
                                            ((0.0, 1.0, 0.0), None), ((0.0, 0.0, 1.0), 0.3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(backend, blend, shrink_k, layout):
    inp = make_inputs((3, 4, 3, 2), torch.float64, _device_for(backend), layout)
    args = [t.detach().clone().requires_grad_() for t in (inp.x, inp.weight, inp.bias)]
    fn = lambda x, w, b: dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend,
                                 shrink_k=shrink_k, backend=backend)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
def test_no_affine_and_partial_grads(backend):
    inp = make_inputs((2, 3, 4, 4), torch.float32, _device_for(backend))
    x = inp.x.clone().requires_grad_()
    y = dk.dabn(x, None, None, inp.source_mean, inp.source_var, (0.2, 0.3, 0.5), backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    xr = inp.x.clone().requires_grad_()
    yr = ref.dabn(xr, None, None, inp.source_mean, inp.source_var,
                  torch.tensor([0.2, 0.3, 0.5]), None)
    (gr,) = torch.autograd.grad(yr.square().sum(), xr)
    assert_close(gx, gr, **tol(torch.float32, 5.0))
    # only weight requires grad
    w = inp.weight.clone().requires_grad_()
    y = dk.dabn(inp.x, w, inp.bias, inp.source_mean, inp.source_var, (0.6, 0.4, 0.0), backend=backend)
    (gw,) = torch.autograd.grad(y.sum(), w)
    assert gw.shape == (3,) and torch.isfinite(gw).all()


# ---------------------------------------------------------------- safety
@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
def test_inputs_not_modified(backend):
    inp = make_inputs((3, 4, 5, 5), torch.float32, _device_for(backend), "channels_last")
    before = [t.clone() for t in (inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var)]
    blend = torch.tensor([0.85, 0.0, 0.15])
    x = inp.x.requires_grad_()
    y = dk.dabn(x, inp.weight, inp.bias, inp.source_mean, inp.source_var, blend, shrink_k=4.0,
                backend=backend)
    y.sum().backward()
    dk.diversity_score(inp.x, inp.source_mean, backend=backend)
    for t, b in zip((inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var), before):
        assert torch.equal(t.detach(), b)
    assert torch.equal(blend, torch.tensor([0.85, 0.0, 0.15]))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_in_nan_out(backend, layout):
    inp = make_inputs((3, 4, 5, 5), torch.float32, _device_for(backend))
    x = inp.x.clone()
    x[1, 2, 3, 4] = float("nan")
    x = to_layout(x, layout)
    for blend in ((0.0, 0.0, 1.0), (0.6, 0.4, 0.0)):
        y = dk.dabn(x, inp.weight, inp.bias, inp.source_mean, inp.source_var, blend, backend=backend)
        assert torch.isnan(y[1, 2]).all()  # the poisoned plane's statistics are NaN
        if blend[1] > 0:  # batch statistics of channel 2 are NaN for every sample
            assert torch.isnan(y[:, 2]).all()
        assert torch.isfinite(y[:, :2]).all()  # other channels are untouched
    score, angles = dk.diversity_score(x, inp.source_mean, backend=backend)
    assert torch.isnan(score)


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
def test_deterministic(backend):
    inp = make_inputs((8, 16, 12, 12), torch.float32, _device_for(backend), "channels_last")
    a = _run(inp, (0.2, 0.3, 0.5), 1.0, backend)
    b = _run(inp, (0.2, 0.3, 0.5), 1.0, backend)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input
def _good():
    return make_inputs((2, 3, 4, 4), torch.float32)


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "4-D"),
    ("int_dtype", TypeError, "floating"),
    ("empty", ValueError, "empty"),
    ("weight_len", ValueError, r"weight must have shape \(3,\)"),
    ("var_len", ValueError, r"source_var must have shape \(3,\)"),
    ("device_mix", ValueError, "meta"),
    ("neg_blend", ValueError, ">= 0"),
    ("sum_blend", ValueError, "sum to 1"),
    ("len_blend", ValueError, "3 weights"),
    ("tensor_sum_blend", ValueError, "sum to 1"),
    ("shrink", ValueError, "shrink_k"),
    ("eps", ValueError, "eps"),
    ("backend", ValueError, "unknown backend"),
])
def test_bad_input_raises(case, exc, match):
    i = _good()
    kw = dict(x=i.x, weight=i.weight, bias=i.bias, source_mean=i.source_mean,
              source_var=i.source_var, blend=(0.2, 0.3, 0.5))
    extra = {}
    if case == "rank":
        kw["x"] = i.x[0]
    elif case == "int_dtype":
        kw["x"] = i.x.to(torch.int32)
    elif case == "empty":
        kw["x"] = i.x[:0]
    elif case == "weight_len":
        kw["weight"] = torch.ones(4)
    elif case == "var_len":
        kw["source_var"] = torch.ones(2)
    elif case == "device_mix":
        kw["bias"] = i.bias.to("meta")
    elif case == "neg_blend":
        kw["blend"] = (1.2, -0.2, 0.0)
    elif case == "sum_blend":
        kw["blend"] = (0.5, 0.4, 0.0)
    elif case == "len_blend":
        kw["blend"] = (0.5, 0.5)
    elif case == "tensor_sum_blend":
        kw["blend"] = torch.tensor([0.5, 0.4, 0.0])
    elif case == "shrink":
        extra["shrink_k"] = -1.0
    elif case == "eps":
        extra["eps"] = 0.0
    elif case == "backend":
        extra["backend"] = "nope"
    with pytest.raises(exc, match=match):
        dk.dabn(kw.pop("x"), *kw.values(), **extra)


def test_instance_stats_undefined_for_one_pixel():
    with pytest.raises(ValueError, match="H\\*W"):
        dk.instance_stats(torch.randn(2, 3, 1, 1))


def test_diversity_score_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        dk.diversity_score(x, torch.zeros(3), mode="pixels")
    with pytest.raises(ValueError, match="stat"):
        dk.diversity_score(x, torch.zeros(3), stat="mad")
    with pytest.raises(ValueError, match="source_mean"):
        dk.diversity_score(x, torch.zeros(4))


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="'cuda' cannot run on cpu"):
        dk.dabn(x, None, None, torch.zeros(3), torch.ones(3), (1, 0, 0), backend="cuda")
    monkeypatch.setenv("DATTA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="serves device types"):
        dk.dabn(x, None, None, torch.zeros(3), torch.ones(3), (1, 0, 0))
    monkeypatch.setenv("DATTA_BACKEND", "reference")
    assert backends.resolve("auto", "cpu", torch.float32) == "reference"
    monkeypatch.delenv("DATTA_BACKEND")
    assert backends.resolve("auto", "cpu", torch.float32) == ("cpu" if HAS_EXT else "reference")
    # Triton on CPU is accepted only explicitly, never by auto
    assert backends.resolve("auto", "cpu", torch.float32) != "triton"


def test_available_backends_and_explain():
    names = dk.available_backends()
    assert "reference" in names
    assert ("cpu" in names) == HAS_EXT
    why = backends.explain("cpu")
    assert why["reference"] == [] and why["cuda"]


# ---------------------------------------------------------------- torch.library + compile
@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_public_ops(backend, layout):
    inp = make_inputs((2, 3, 4, 5), torch.float32, _device_for(backend), layout)
    blend = torch.tensor([0.2, 0.3, 0.5], device=inp.x.device)
    x = inp.x.clone().requires_grad_()
    w = inp.weight.clone().requires_grad_()
    b = inp.bias.clone().requires_grad_()
    torch.library.opcheck(torch.ops.datta.dabn_forward.default,
                          (x, w, b, inp.source_mean, inp.source_var, blend, 1.0, 1e-5, backend))
    torch.library.opcheck(torch.ops.datta.dabn_forward.default,
                          (inp.x, None, None, inp.source_mean, inp.source_var, blend, None, 1e-5, backend))
    torch.library.opcheck(torch.ops.datta.instance_stats.default, (inp.x, backend))
    mean_i, var_i = torch.ops.datta.instance_stats(inp.x, backend)
    torch.library.opcheck(torch.ops.datta.diversity_angles.default,
                          (inp.x, inp.source_mean, mean_i.mean(0), backend))
    dy = torch.randn_like(inp.x)
    torch.library.opcheck(torch.ops.datta.dabn_backward.default,
                          (dy, inp.x, inp.weight, inp.source_mean, inp.source_var, blend, 1.0, 1e-5,
                           mean_i, var_i, backend))


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
def test_compile_fullgraph_does_not_recompile_when_blend_changes(backend):
    torch._dynamo.reset()
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    inp = make_inputs((2, 3, 4, 4), torch.float32, _device_for(backend))
    fn = torch.compile(lambda x, w, b, blend: dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend,
                                                      shrink_k=4.0, backend=backend),
                       fullgraph=True, backend=counting_backend)
    for blend in ([0.6, 0.4, 0.0], [0.85, 0.0, 0.15], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]):
        bt = torch.tensor(blend)
        y = fn(inp.x, inp.weight, inp.bias, bt)
        assert_close(y, _expect(inp, blend, 4.0), **tol(torch.float32))
    assert len(calls) == 1


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
def test_compile_inductor_forward_backward(backend):
    torch._dynamo.reset()
    inp = make_inputs((2, 3, 4, 4), torch.float32, _device_for(backend))

    def step(x, w, b, blend):
        y = dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend, backend=backend)
        return (y.relu() * 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    blend = torch.tensor([0.2, 0.3, 0.5])
    args = [t.clone().requires_grad_() for t in (inp.x, inp.weight, inp.bias)]
    g1 = torch.autograd.grad(compiled(*args, blend), args)
    g2 = torch.autograd.grad(step(*args, blend), args)
    for a, b in zip(g1, g2):
        assert_close(a, b)
