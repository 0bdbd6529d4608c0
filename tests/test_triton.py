"""The Triton backend against the reference (``datta_kernels.reference``), on tiny shapes.

Runs on CUDA when available, else on CPU under ``TRITON_INTERPRET=1`` (which must be set
before the process starts: ``TRITON_INTERPRET=1 pytest tests/test_triton.py``).  Shapes are
the odd ones of ``testing.SHAPES_ODD`` (each says why it is there); ``small_launch`` shrinks
the launch config so that tiny shapes still take every path a large one does (many pixel
tiles per program, rows split across programs, several channel and batch blocks).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import datta_kernels
from datta_kernels import reference as ref
from datta_kernels.testing import SHAPES_ODD, make_inputs, rounding_tol, tol

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (INTERPRET or HAS_CUDA),
                       reason="needs a CUDA device or TRITON_INTERPRET=1 set before the process starts"),
]
triton = pytest.importorskip("triton")

from datta_kernels.backends.triton import TritonBackend  # noqa: E402
from datta_kernels.backends.triton import config as tcfg  # noqa: E402

tk = TritonBackend()

DEVICE = "cpu" if INTERPRET else "cuda"
LAYOUTS = ("nchw", "channels_last")
EPS = 1e-5

#: blends and why: every weight alone (source / tbn / instance identities), the presets'
#: mixtures, and an arbitrary three-way mix (every path of the formula at once).
BLENDS = {
    "source": (1.0, 0.0, 0.0),
    "tbn": (0.0, 1.0, 0.0),
    "instance": (0.0, 0.0, 1.0),
    "datta_multiple": (0.85, 0.0, 0.15),
    "bn_adapt": (0.6, 0.4, 0.0),
    "mix": (0.2, 0.3, 0.5),
}

#: shapes for the layout x shape sweeps (all of SHAPES_ODD) and a cheaper core set.
SWEEP = {k: SHAPES_ODD[k] for k in ("n1", "hw1", "n1hw1", "c1", "prime", "c1000", "tall")}
CORE = {k: SHAPES_ODD[k] for k in ("n1", "hw1", "prime", "c1000")}


@pytest.fixture
def small_launch(monkeypatch):
    """A launch config small enough that tiny shapes split rows, loop over tiles and over
    channel/batch blocks (the paths the real config only takes on large inputs)."""
    small = dataclasses.replace(tcfg.LAUNCH, tile_bytes=64, cl_block_c=4, nchw_block_p=(8,),
                                finalize_elems=8, finalize_block_n=2, angles_reduce_block=2)
    monkeypatch.setattr(tcfg, "LAUNCH", small)
    return small


def _inputs(shape, dtype=torch.float32, layout="nchw", offset=0.0, seed=0):
    return make_inputs(shape, dtype=dtype, device=DEVICE, layout=layout, offset=offset, seed=seed)


def _blend(w):
    return torch.tensor(w, dtype=torch.float32, device=DEVICE)


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _check_forward(inp, blend, shrink_k, dtype, scale=1.0):
    y, mean_i, var_i = tk.dabn_forward(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var,
                                       blend, shrink_k, EPS)
    exp = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, blend, shrink_k, EPS)
    rm, rv = ref.instance_stats(inp.x)
    assert y.dtype == inp.x.dtype and y.shape == inp.x.shape and y.stride() == exp.stride()
    torch.testing.assert_close(y, exp, **tol(dtype, scale))
    torch.testing.assert_close(mean_i, rm, **tol(torch.float32))
    torch.testing.assert_close(var_i, rv, **tol(torch.float32))
    return y, mean_i, var_i


def _check_backward(inp, blend, shrink_k, mean_i, var_i, seed=1, weight=True):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(inp.x.shape, generator=g).to(device=DEVICE, dtype=inp.x.dtype)
    dy = dy.contiguous(memory_format=torch.channels_last if not inp.x.is_contiguous() else
                       torch.contiguous_format)
    w = inp.weight if weight else None
    got = tk.dabn_backward(dy, inp.x, w, inp.source_mean, inp.source_var, blend, shrink_k, EPS,
                           mean_i, var_i)
    half = inp.x.dtype in (torch.float16, torch.bfloat16)
    xr = inp.x.float() if half else inp.x           # 16-bit x: the same values in float32
    rm, rv = ref.instance_stats(xr)
    exp = ref.dabn_backward(dy.to(xr.dtype), xr, w, inp.source_mean, inp.source_var, blend,
                            shrink_k, EPS, rm, rv)
    assert got[0].dtype == inp.x.dtype and got[0].stride() == exp[0].stride()
    if half:    # within dx's own rounding to 16 bits of the float32 reference
        torch.testing.assert_close(got[0].float(), exp[0], **rounding_tol(exp[0], inp.x.dtype))
    else:       # sums of N*M products in a different order, scaled by r^2 / M: fp32 tol x10
        torch.testing.assert_close(got[0], exp[0], **tol(inp.x.dtype, 10.0))
    torch.testing.assert_close(got[1], exp[1], **tol(torch.float32, 10.0))
    torch.testing.assert_close(got[2], exp[2], **tol(torch.float32, 10.0))
    return got


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SWEEP.values(), ids=SWEEP.keys())
def test_instance_stats(shape, layout):
    x = _inputs(shape, layout=layout).x
    mean, var = tk.instance_stats(x)
    rm, rv = ref.instance_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[0], shape[1])
    torch.testing.assert_close(mean, rm, **tol(torch.float32))
    torch.testing.assert_close(var, rv, **tol(torch.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_offset_1e4(layout, small_launch):
    """``1e4 + noise`` in fp32, with rows split across programs: the shifted Chan merge keeps
    the variance to ~1e-6 relative (a raw sum of squares would lose every digit).  The mean
    is judged against the float64 reference at ulp(1e4) ~ 1e-3."""
    x = _inputs((3, 5, 6, 7), layout=layout, offset=1e4).x
    mean, var = tk.instance_stats(x)
    rm, rv = ref.instance_stats(x.double())
    torch.testing.assert_close(mean.double(), rm, atol=1e-3, rtol=0)
    torch.testing.assert_close(var.double(), rv, atol=0, rtol=1e-5)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SWEEP.values(), ids=SWEEP.keys())
def test_forward_shapes(shape, layout):
    inp = _inputs(shape, layout=layout)
    _check_forward(inp, _blend(BLENDS["mix"]), 0.5, torch.float32)


@pytest.mark.parametrize("shrink_k", [None, 0.5, 4.0], ids=["raw", "k0.5", "k4"])
@pytest.mark.parametrize("blend", BLENDS.values(), ids=BLENDS.keys())
def test_forward_blends(blend, shrink_k):
    inp = _inputs(SHAPES_ODD["prime"])
    _check_forward(inp, _blend(blend), shrink_k, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_half(dtype, layout):
    inp = _inputs(SHAPES_ODD["prime"], dtype=dtype, layout=layout)
    _check_forward(inp, _blend(BLENDS["mix"]), 0.5, dtype)


def test_forward_no_affine():
    inp = _inputs(SHAPES_ODD["prime"])
    blend = _blend(BLENDS["mix"])
    y, _, _ = tk.dabn_forward(inp.x, None, None, inp.source_mean, inp.source_var, blend, None, EPS)
    exp = ref.dabn(inp.x, None, None, inp.source_mean, inp.source_var, blend, None, EPS)
    torch.testing.assert_close(y, exp, **tol(torch.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_split_rows(layout, small_launch):
    """Forward with rows split across programs and several channel/batch blocks."""
    inp = _inputs((5, 3, 6, 7), layout=layout)
    _check_forward(inp, _blend(BLENDS["mix"]), 0.5, torch.float32)


def test_forward_offset_1e4():
    """``1e4 + noise``: y is ~O(1) but m carries fp32 rounding at 1e4 (ulp ~1e-3, scaled by
    gamma * rsqrt(v)), so y is judged against the float64 reference at 1e-2."""
    inp = _inputs(SHAPES_ODD["prime"], offset=1e4)
    blend = _blend(BLENDS["mix"])
    y, _, _ = tk.dabn_forward(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, blend, 0.5, EPS)
    exp = ref.dabn(inp.x.double(), inp.weight.double(), inp.bias.double(), inp.source_mean.double(),
                   inp.source_var.double(), blend.double(), 0.5, EPS)
    torch.testing.assert_close(y.double(), exp, atol=1e-2, rtol=1e-3)


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CORE.values(), ids=CORE.keys())
def test_backward_shapes(shape, layout):
    inp = _inputs(shape, layout=layout)
    blend = _blend(BLENDS["mix"])
    _, mean_i, var_i = _check_forward(inp, blend, 0.5, torch.float32)
    _check_backward(inp, blend, 0.5, mean_i, var_i)


@pytest.mark.parametrize("shrink_k", [None, 0.5], ids=["raw", "k0.5"])
@pytest.mark.parametrize("blend", BLENDS.values(), ids=BLENDS.keys())
def test_backward_blends(blend, shrink_k):
    inp = _inputs(SHAPES_ODD["prime"])
    blend = _blend(blend)
    mean_i, var_i = tk.instance_stats(inp.x)
    _check_backward(inp, blend, shrink_k, mean_i, var_i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backward_half(dtype):
    inp = _inputs(SHAPES_ODD["prime"], dtype=dtype, layout="channels_last")
    blend = _blend(BLENDS["mix"])
    mean_i, var_i = tk.instance_stats(inp.x)
    _check_backward(inp, blend, 0.5, mean_i, var_i)


def test_backward_no_weight():
    inp = _inputs(SHAPES_ODD["prime"])
    blend = _blend(BLENDS["mix"])
    mean_i, var_i = tk.instance_stats(inp.x)
    _check_backward(inp, blend, None, mean_i, var_i, weight=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_split_rows(layout, small_launch):
    inp = _inputs((5, 3, 6, 7), layout=layout)
    blend = _blend(BLENDS["mix"])
    mean_i, var_i = tk.instance_stats(inp.x)
    _check_backward(inp, blend, 0.5, mean_i, var_i)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_passes_alone(layout, small_launch):
    """dabn_backward_sums / dabn_backward_apply (the synced layer's backward) == the
    reference's passes, and around the reference's coefficients == tk.dabn_backward."""
    from datta_kernels.backends.base import KernelBackend
    inp = _inputs((5, 3, 6, 7), layout=layout, offset=100.0)
    blend = _blend(BLENDS["mix"])
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(inp.x.shape, generator=g).to(DEVICE).contiguous(memory_format=_fmt(layout))
    mean_i, var_i = ref.instance_stats(inp.x)
    sdy, sdyxc = tk.dabn_backward_sums(dy, inp.x, mean_i)
    _, _, sdy_ref, sdyxc_ref = ref.dabn_backward_sums(dy, inp.x, mean_i)
    torch.testing.assert_close(sdy, sdy_ref, **tol(torch.float32, 10.0))
    torch.testing.assert_close(sdyxc, sdyxc_ref, **tol(torch.float32, 10.0))
    a, b, c0, _, _ = ref.dabn_backward_coefficients(sdy_ref, sdyxc_ref, inp.weight, inp.source_mean,
                                                    inp.source_var, blend, 0.5, EPS, mean_i, var_i,
                                                    6 * 7)
    b[0, 1] = 0.0
    dx = tk.dabn_backward_apply(dy, inp.x, mean_i, a, b, c0)
    exp = KernelBackend.dabn_backward_apply(None, dy, inp.x, mean_i, a, b, c0)
    assert dx.stride() == exp.stride()
    torch.testing.assert_close(dx, exp, **tol(torch.float32, 10.0))


# ---------------------------------------------------------------- through the public API
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("blend,shrink_k", [(BLENDS["mix"], 0.5), (BLENDS["bn_adapt"], None),
                                            (BLENDS["datta_multiple"], 4.0)], ids=["mix", "bn", "datta"])
def test_dabn_autograd(blend, shrink_k, layout):
    """``datta_kernels.dabn(..., backend="triton")`` and its autograd against the reference."""
    inp = _inputs(SHAPES_ODD["prime"], layout=layout)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(inp.x.shape, generator=g).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        x = inp.x.detach().clone().requires_grad_(True)
        w = inp.weight.detach().clone().requires_grad_(True)
        b = inp.bias.detach().clone().requires_grad_(True)
        y = datta_kernels.dabn(x, w, b, inp.source_mean, inp.source_var, _blend(blend),
                               shrink_k=shrink_k, eps=EPS, backend=backend)
        assert y.is_contiguous(memory_format=_fmt(layout))
        y.backward(dy)
        grads[backend] = (y.detach(), x.grad, w.grad, b.grad)
    for got, exp in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, exp, **tol(torch.float32, 10.0))


def test_diversity_score_api():
    x = _inputs(SHAPES_ODD["prime"]).x
    smean = _inputs(SHAPES_ODD["prime"], seed=5).source_mean
    score, angles = datta_kernels.diversity_score(x, smean, backend="triton")
    rscore, rangles = ref.diversity_score(x, smean)
    torch.testing.assert_close(angles, rangles, **tol(torch.float32))
    torch.testing.assert_close(score, rscore, **tol(torch.float32, 10.0))


# ---------------------------------------------------------------- diversity angles
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CORE.values(), ids=CORE.keys())
def test_angles(shape, layout):
    inp = _inputs(shape, layout=layout)
    bmean = ref.instance_stats(inp.x)[0].mean(dim=0)
    got = tk.diversity_angles(inp.x, inp.source_mean, bmean)
    exp = ref.diversity_angles(inp.x, inp.source_mean, bmean)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got, exp, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_angles_half(dtype):
    inp = _inputs(SHAPES_ODD["prime"], dtype=dtype, layout="channels_last")
    bmean = ref.instance_stats(inp.x)[0].mean(dim=0)
    got = tk.diversity_angles(inp.x, inp.source_mean, bmean)
    exp = ref.diversity_angles(inp.x, inp.source_mean, bmean)
    torch.testing.assert_close(got, exp, **tol(torch.float32, 10.0))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_angles_split(layout, small_launch):
    """Several channel blocks per pixel and several pixel tiles per image (second stage loops)."""
    inp = _inputs((2, 5, 6, 7), layout=layout, offset=1e4)
    bmean = ref.instance_stats(inp.x)[0].mean(dim=0)
    got = tk.diversity_angles(inp.x, inp.source_mean, bmean)
    exp = ref.diversity_angles(inp.x.double(), inp.source_mean.double(), bmean.double())
    torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic(layout, small_launch):
    """Same inputs, same bits: no atomics, fixed reduction order (rows split here)."""
    inp = _inputs((5, 3, 6, 7), layout=layout, seed=7)
    blend = _blend(BLENDS["mix"])
    dy = torch.randn(inp.x.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    dy = dy.contiguous(memory_format=_fmt(layout))
    runs = []
    for _ in range(2):
        y, mean_i, var_i = tk.dabn_forward(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var,
                                           blend, 0.5, EPS)
        grads = tk.dabn_backward(dy, inp.x, inp.weight, inp.source_mean, inp.source_var, blend, 0.5, EPS,
                                 mean_i, var_i)
        angles = tk.diversity_angles(inp.x, inp.source_mean, mean_i.mean(0))
        runs.append((y, mean_i, var_i, *grads, angles))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_blend_change_needs_no_recompile():
    """The blend lives in a device tensor read by the kernel: new weights, same compiled code."""
    inp = _inputs(SHAPES_ODD["prime"])
    for w in (BLENDS["mix"], BLENDS["bn_adapt"]):
        _check_forward(inp, _blend(w), None, torch.float32)
