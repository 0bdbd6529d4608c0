"""Every backend pinned to the reference where the per-(n, c) formulas hit an edge exactly.

The labels are docs/SPEC.md's: D1 edge rules on the blend weights (``M <= 1``, ``N*M <= 1``),
D2 the NOTE shrink, D3 the blended moments and the normalisation, D4 batch statistics from
instance statistics, D5 the backward coefficients.  Each case is built so that an edge is met
*exactly*, not approximately:

* constant planes (x[n, c] = one dyadic value): ``var_i = 0`` exactly (in every backend: sums
  of equal dyadic values are exact), ``var_B > 0``;
* constant channels (the same value for every n): ``var_i = var_B = 0``, ``mu_i = mu_B``, and
  channel 0 has ``var_s = 0`` too, so ``v = 0`` exactly and ``r = rsqrt(eps)`` (the clamp's edge);
* ``N = 1`` (``var_B`` from one sample), ``H = W = 1`` (D1 moves ``w_i``), ``N = H = W = 1``
  (D1 moves ``w_b`` too);
* blend weights exactly 0 and 1 (the SPEC presets' weights, from ``presets.PRESETS``), and
  three-way mixes;
* the shrink off (``None``), at its edge ``k = 0`` (the identity, dead zone only where
  ``z = 0``: ``mu_s`` equals sample 0's plane values and channel 0 has ``var_s = var_i = 0``),
  the preset's ``k = 4``, and ``k = 1e6`` (every statistic in the dead zone: shrunk to the
  source, pass-through masks 0); ``k`` with ``w_i = 0`` (unused).

Forward outputs, instance statistics and gradients (``torch.autograd.grad`` through
``datta_kernels.dabn``, against autograd through ``reference.dabn``), plus each backend's own
``dabn_backward`` (D5) against ``reference.dabn_backward``; float32 everywhere, float16 /
bfloat16 / float64 where the backend serves them.

Already covered elsewhere, not repeated here: the reference's D1 weights
(``test_reference.py::test_edge_rules_move_weights_to_source``), D2 on hand-made values
(``::test_shrink_is_softshrink_towards_source``) and D5 against autograd on random inputs
(``::test_explicit_backward_matches_autograd``); forward on the odd shapes ``n1``, ``hw1``,
``n1hw1`` with random (non-constant) data for reference/cpu/cuda
(``test_functional.py::test_forward_odd_shapes``) and for Triton
(``test_triton.py::test_forward_shapes``); Triton's backward on ``n1`` and ``hw1``
(``test_triton.py::test_backward_shapes``).  New here: zero variances, the ``k = 0`` and
``k = 1e6`` shrink edges, backward at ``N = 1`` / ``M = 1`` / ``N*M = 1`` for cpu and cuda and
at ``N*M = 1`` for Triton, and half / double inputs on those edges.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

import datta_kernels as dk
from datta_kernels import backends
from datta_kernels import reference as ref
from datta_kernels.presets import PRESETS
from datta_kernels.testing import make_inputs, tol

from .conftest import HAS_CUDA

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: eps of the reference comparisons.  Where v = 0 exactly, r = rsqrt(eps) multiplies the
#: rounding of m (ulp-level, and legitimately different between fp32 and double coefficient
#: math) into y and, as r^3, into dx; with 1e-2 instead of the layer default 1e-5 that gain
#: is 10 (not 316), so the dtype tolerances stay tight.  test_zero_variance_everywhere_is_beta
#: uses the default 1e-5 where the result is exact.
EPS = 1e-2
DEFAULT_EPS = 1e-5

BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.cuda)]

#: shapes and the edge each one hits
SHAPES = {
    "nm": (3, 4, 4, 4),    # none: N > 1, M > 1
    "n1": (1, 4, 4, 4),    # N = 1: var_B from one sample (D4)
    "hw1": (3, 4, 1, 1),   # M = 1: var_i undefined (0), w_i -> w_s (D1)
    "n1hw1": (1, 3, 1, 1),  # N*M = 1: w_b -> w_s as well (D1)
}

#: what x holds: random planes, constant planes (var_i = 0), constant channels (var_i = var_B = 0)
KINDS = ("random", "const_plane", "const_channel")

_P = PRESETS
#: (id, blend, shrink_k): weights exactly 0 / 1 from the SPEC presets, the mixes, the shrink edges
BLENDS = [
    ("source", _P["source"].single, None),
    ("tbn", _P["tbn"].single, None),
    ("instance", _P["instance"].single, None),
    ("instance-k0", _P["instance"].single, 0.0),
    ("instance-kbig", _P["instance"].single, 1e6),
    ("datta-single", _P["datta"].single, None),
    ("datta-multiple", _P["datta"].multiple, _P["datta"].shrink_k),
    ("datta-multiple-k0", _P["datta"].multiple, 0.0),
    ("icme-multiple", _P["datta_icme"].multiple, None),
    ("bn-unused-k", _P["bn_adapt"].single, 4.0),
    ("mix", (0.2, 0.3, 0.5), None),
    ("mix-k0", (0.2, 0.3, 0.5), 0.0),
    ("mix-kbig", (0.2, 0.3, 0.5), 1e6),
]
BLEND_IDS = [b[0] for b in BLENDS]

#: a smaller set for the 16-bit and 64-bit inputs
HALF_BLENDS = [b for b in BLENDS if b[0] in ("tbn", "instance-k0", "datta-multiple", "mix-kbig")]


def _device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and not INTERPRET):
        return "cuda"
    return "cpu"


def _skip_unless_runnable(backend: str, dtype: torch.dtype) -> str:
    device = _device(backend)
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    why = backends.get(backend).reasons(device, dtype)
    if why:
        pytest.skip("; ".join(why))
    return device


def _edge_inputs(shape, kind: str, dtype: torch.dtype, device: str, seed: int = 0):
    """DABN inputs whose statistics sit exactly on the edges named by ``kind`` (module doc).

    Values are multiples of 1/4 below 8 in magnitude: exact in every dtype, and so are their
    sums, so a constant plane has instance mean exactly its value and variance exactly 0."""
    n, c, h, w = shape
    inp = make_inputs(shape, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "random":
        x = inp.x
    else:
        if kind == "const_plane":
            vals = torch.randint(-16, 17, (n, c), generator=g)
        else:
            vals = torch.randint(-16, 17, (1, c), generator=g).expand(n, c)
        x = (vals.to(torch.float64) / 4)[:, :, None, None].expand(n, c, h, w)
        x = x.to(dtype=dtype, device=device).contiguous()
    pd = inp.source_mean.dtype
    # mu_s = sample 0's first pixel: z_mu = 0 exactly on constant planes (the k = 0 dead zone)
    source_mean = x[0, :, 0, 0].to(dtype=pd).clone()
    # var_s = 0 on channel 0 (with var_i = 0: z_var = 0 and, for constant channels, v = 0)
    source_var = inp.source_var.clone()
    source_var[0] = 0.0
    return x, inp.weight, inp.bias, source_mean, source_var


def _cases():
    for shape_id in SHAPES:
        for kind in KINDS:
            if shape_id.endswith("hw1") and kind == "const_plane":
                continue  # every plane of one pixel is constant: the same as "random"
            yield pytest.param(shape_id, kind, id=f"{shape_id}-{kind}")


def _dy(x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)


def _grads(fn, x, weight, bias, dy):
    args = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(*args)
    return (y.detach(), *torch.autograd.grad(y, args, dy))


def _check(backend, dtype, shape_id, kind, blend, shrink_k):
    device = _skip_unless_runnable(backend, dtype)
    x, weight, bias, smean, svar = _edge_inputs(SHAPES[shape_id], kind, dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bl = torch.tensor(blend, dtype=acc, device=device)
    impl = backends.get(backend).impl()

    # D4 (instance side) and D3: the backend's forward and statistics
    y, mean_i, var_i = impl.dabn_forward(x, weight, bias, smean, svar, bl, shrink_k, EPS)
    rm, rv = ref.instance_stats(x)
    assert_close(mean_i, rm, **tol(acc))
    assert_close(var_i, rv, **tol(acc))
    if kind != "random" or shape_id.endswith("hw1"):
        assert (var_i == 0).all(), "a constant plane must have variance exactly 0"
    exp_y = ref.dabn(x, weight, bias, smean, svar, bl, shrink_k, EPS)
    assert y.dtype == dtype
    assert_close(y, exp_y, **tol(dtype))

    # D5: the backend's coefficients against the reference's explicit backward
    dy = _dy(x)
    got = impl.dabn_backward(dy, x, weight, smean, svar, bl, shrink_k, EPS, mean_i, var_i)
    exp = ref.dabn_backward(dy, x, weight, smean, svar, bl, shrink_k, EPS, rm, rv)
    assert_close(got[0], exp[0], **tol(dtype, 2.0))
    assert_close(got[1], exp[1], **tol(acc if dtype != torch.float64 else dtype, 4.0))
    assert_close(got[2], exp[2], **tol(acc if dtype != torch.float64 else dtype, 4.0))

    # the whole op through autograd, against autograd through the reference formula
    got = _grads(lambda a, w, b: dk.dabn(a, w, b, smean, svar, blend, shrink_k=shrink_k, eps=EPS,
                                         backend=backend), x, weight, bias, dy)
    exp = _grads(lambda a, w, b: ref.dabn(a, w, b, smean, svar, bl, shrink_k, EPS), x, weight, bias, dy)
    assert_close(got[0], exp[0], **tol(dtype))
    assert_close(got[1], exp[1], **tol(dtype, 2.0))
    assert_close(got[2], exp[2], **tol(acc if dtype != torch.float64 else dtype, 4.0))
    assert_close(got[3], exp[3], **tol(acc if dtype != torch.float64 else dtype, 4.0))


@pytest.mark.parametrize("label,blend,shrink_k", BLENDS, ids=BLEND_IDS)
@pytest.mark.parametrize("shape_id,kind", list(_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_float32(backend, shape_id, kind, label, blend, shrink_k):
    if backend == "triton" and INTERPRET and kind == "random":
        # the interpreter is slow; random planes under every preset are tests/test_triton.py's
        pytest.skip("random planes: covered by test_triton (interpreter time)")
    _check(backend, torch.float32, shape_id, kind, blend, shrink_k)


@pytest.mark.parametrize("label,blend,shrink_k", HALF_BLENDS, ids=[b[0] for b in HALF_BLENDS])
@pytest.mark.parametrize("shape_id,kind", [("nm", "const_plane"), ("nm", "const_channel"),
                                           ("n1", "const_plane"), ("hw1", "random"),
                                           ("n1hw1", "random")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_other_dtypes(backend, dtype, shape_id, kind, label, blend, shrink_k):
    _check(backend, dtype, shape_id, kind, blend, shrink_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_everywhere_is_beta(backend):
    """D3 at ``v = 0`` exactly (constant channels, ``var_s = 0``, batch blend): ``x = m`` so
    ``y = beta`` exactly, and ``dx = gamma r (dy - mean dy)`` with ``r = rsqrt(eps)`` (a
    closed form, independent of the reference)."""
    device = _skip_unless_runnable(backend, torch.float32)
    x, weight, bias, smean, svar = _edge_inputs(SHAPES["nm"], "const_channel", torch.float32, device)
    svar = torch.zeros_like(svar)
    blend = _P["tbn"].single
    dy = _dy(x)
    y, dx, dw, db = _grads(lambda a, w, b: dk.dabn(a, w, b, smean, svar, blend, eps=DEFAULT_EPS,
                                                   backend=backend), x, weight, bias, dy)
    assert torch.equal(y, bias[None, :, None, None].expand_as(y).to(y.dtype))
    r = DEFAULT_EPS ** -0.5
    exp_dx = weight[None, :, None, None] * r * (dy - dy.mean(dim=(0, 2, 3), keepdim=True))
    assert_close(dx, exp_dx, **tol(torch.float32))
    assert_close(db, dy.sum(dim=(0, 2, 3)), **tol(torch.float32))
    assert_close(dw, torch.zeros_like(dw), **tol(torch.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (Triton interpreter) on NaN
@pytest.mark.parametrize("backend", [
    "reference", "cpu",
    pytest.param("triton", marks=pytest.mark.triton),
    pytest.param("cuda", marks=pytest.mark.cuda),
])
def test_nan_plane_with_shrink_stays_nan(backend):
    """D2 with a NaN instance statistic: SPEC §3 ("Non-finite input") says an inf/NaN pixel
    reaches its whole plane through mu_i, var_i when w_i != 0; softshrink(NaN) is NaN in the
    reference, so with the datta preset's shrink the whole poisoned plane is NaN."""
    device = _skip_unless_runnable(backend, torch.float32)
    inp = make_inputs((2, 3, 3, 3), torch.float32, device)
    x = inp.x.clone()
    x[1, 2, 0, 0] = float("nan")
    blend, k = _P["datta"].multiple, _P["datta"].shrink_k
    bl = torch.tensor(blend, device=device)
    y, _, _ = backends.get(backend).impl().dabn_forward(x, inp.weight, inp.bias, inp.source_mean,
                                                        inp.source_var, bl, k, DEFAULT_EPS)
    exp = ref.dabn(x, inp.weight, inp.bias, inp.source_mean, inp.source_var, bl, k, DEFAULT_EPS)
    assert exp[1, 2].isnan().all()
    assert_close(y, exp, equal_nan=True, **tol(torch.float32))
