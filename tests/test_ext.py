"""The compiled kernel ops ``torch.ops.datta._*`` (csrc/) called directly, against the reference.

Focused on the kernels themselves: opcheck, build info (OpenMP, vector ISA), the C++ input
check, numerics (1e4 + noise, 16-bit types, NaN), layouts, every compiled ISA variant and
determinism.  The broad backend sweep over shapes x dtypes x presets is tests/test_functional.py.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from datta_kernels import _ext
from datta_kernels import reference as ref
from datta_kernels.testing import make_inputs, rounding_tol, tol

pytestmark = pytest.mark.ext

OPS = torch.ops.datta if not _ext.unavailable_reasons() else None
BLEND_BN = (0.6, 0.4, 0.0)     # batch-statistics path (the two-pass forward)
BLEND_MIX = (0.2, 0.3, 0.5)    # every weight non-zero, with shrink: every backward term
EPS = 1e-5


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:(.*)$", f.read(), re.MULTILINE)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def _variants() -> list[str]:
    return _ext.build_info().get("vec_variants", "default").split(",") if OPS else ["default"]


@pytest.fixture(params=["default", "avx2", "avx512"])
def isa(request, monkeypatch):
    """Run a test on one compiled instruction-set variant (capped via DATTA_CPU_CAPABILITY)."""
    if request.param not in _variants():
        pytest.skip(f"{request.param} variant not compiled on this platform")
    monkeypatch.setenv("DATTA_CPU_CAPABILITY", request.param)
    if _ext.build_info()["vec"] != request.param:
        pytest.skip(f"this CPU does not support {request.param}")
    return request.param


def _forward(inp, blend, k=None):
    return OPS._dabn_forward(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var,
                             torch.tensor(blend), k, EPS)


def _check_against_reference(inp, blend, k, scale=1.0):
    """16-bit x: y and dx against the float32 reference of the same 16-bit values, within their
    own rounding (``rounding_tol``); the statistics and dweight, dbias are float32."""
    x = inp.x
    half = x.dtype in (torch.float16, torch.bfloat16)
    xr = x.float() if half else x              # the same values, exact in float32
    b = torch.tensor(blend)
    y, mean, var = _forward(inp, blend, k)
    y_ref = ref.dabn(xr, inp.weight, inp.bias, inp.source_mean, inp.source_var, b, k, EPS)
    mean_ref, var_ref = ref.instance_stats(xr)
    if half:
        torch.testing.assert_close(y.float(), y_ref, **rounding_tol(y_ref, x.dtype))
    else:
        torch.testing.assert_close(y, y_ref, **tol(x.dtype, scale))
    torch.testing.assert_close(mean, mean_ref, **tol(mean_ref.dtype, scale))
    torch.testing.assert_close(var, var_ref, **tol(var_ref.dtype, 10 * scale))
    fmt = torch.channels_last if ref._is_channels_last(x) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and y.dtype == x.dtype

    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    dy = dy.contiguous(memory_format=fmt)
    dx, dw, db = OPS._dabn_backward(dy, x, inp.weight, inp.source_mean, inp.source_var, b, k, EPS,
                                    mean, var)
    dx_ref, dw_ref, db_ref = ref.dabn_backward(dy.to(xr.dtype), xr, inp.weight, inp.source_mean,
                                               inp.source_var, b, k, EPS, mean_ref, var_ref)
    assert dx.is_contiguous(memory_format=fmt) and dx.dtype == x.dtype
    if half:
        torch.testing.assert_close(dx.float(), dx_ref, **rounding_tol(dx_ref, x.dtype))
    else:
        torch.testing.assert_close(dx, dx_ref, **tol(x.dtype, 10 * scale))
    torch.testing.assert_close(dw, dw_ref, **tol(dw_ref.dtype, 10 * scale))
    torch.testing.assert_close(db, db_ref, **tol(db_ref.dtype, 10 * scale))

    theta = OPS._diversity_angles(x, inp.source_mean, mean_ref.mean(0))
    theta_ref = ref.diversity_angles(x, inp.source_mean, mean_ref.mean(0))
    torch.testing.assert_close(theta, theta_ref, **tol(theta_ref.dtype, 10 * scale))


# ------------------------------------------------------------------ registration and build
OPCHECK_SHAPES = [(2, 3, 5, 4), (3, 20, 3, 3)]  # tiny; C=20 is not a vector multiple


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", OPCHECK_SHAPES)
def test_opcheck(shape, layout):
    inp = make_inputs(shape, layout=layout)
    x, b = inp.x, torch.tensor(BLEND_MIX)
    y, mean, var = _forward(inp, BLEND_MIX, 2.0)
    dy = torch.randn_like(y)
    cases = [
        (OPS._instance_stats, (x,)),
        (OPS._diversity_angles, (x, inp.source_mean, mean.mean(0))),
        (OPS._dabn_forward, (x, inp.weight, inp.bias, inp.source_mean, inp.source_var, b, 2.0, EPS)),
        (OPS._dabn_forward, (x, None, None, inp.source_mean, inp.source_var, b, None, EPS)),
        (OPS._dabn_backward, (dy, x, inp.weight, inp.source_mean, inp.source_var, b, 2.0, EPS,
                              mean, var)),
        (OPS._dabn_backward_sums, (dy, x, mean)),
        (OPS._dabn_backward_apply, (dy, x, mean, torch.rand_like(mean), torch.randn_like(mean),
                                    torch.randn_like(mean))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 20, 3, 3), (2, 5, 1, 1), (1, 33, 17, 9)])
def test_backward_passes_match_reference(shape, layout, dtype):
    """SPEC D5's two passes alone (the synced layer's backward, datta_kernels.distributed) ==
    the reference's, at an offset of 1e3 (the passes centre on mu_i), with a B = 0 plane."""
    from datta_kernels.backends.base import KernelBackend
    inp = make_inputs(shape, dtype, layout=layout)
    x = (inp.x.double() + 1e3).to(dtype)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(x.shape, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    mean, _ = ref.instance_stats(x)
    a, b, c0 = (torch.randn(mean.shape, generator=g, dtype=mean.dtype) for _ in range(3))
    b[0, 0] = 0.0
    sdy, sdyxc = OPS._dabn_backward_sums(dy, x, mean)
    _, _, sdy_ref, sdyxc_ref = ref.dabn_backward_sums(dy, x, mean)
    scale = float(x.shape[2] * x.shape[3]) ** 0.5
    torch.testing.assert_close(sdy, sdy_ref, **tol(mean.dtype, 10 * scale))
    torch.testing.assert_close(sdyxc, sdyxc_ref, **tol(mean.dtype, 10 * scale))
    dx = OPS._dabn_backward_apply(dy, x, mean, a, b, c0)
    dx_ref = KernelBackend.dabn_backward_apply(None, dy, x, mean, a, b, c0)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last
                                                  if layout == "channels_last" else torch.contiguous_format)
    torch.testing.assert_close(dx, dx_ref, **tol(dtype, 10))
    # a non-finite pixel in a plane whose b is 0 never reaches dx (x is not read there)
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    m_bad, _ = ref.instance_stats(x_bad)
    dx_bad = OPS._dabn_backward_apply(dy, x_bad, m_bad, a, b, c0)
    assert torch.isfinite(dx_bad[0, 0]).all()
    torch.testing.assert_close(dx_bad[0, 0], (a[0, 0] * dy[0, 0].to(a.dtype) + c0[0, 0]).to(dtype),
                               **tol(dtype, 10))


def test_backward_passes_check_inputs():
    x = torch.randn(2, 3, 4, 4)
    mean = x.mean(dim=(2, 3))
    with pytest.raises(RuntimeError, match="dy must have x's dtype"):
        OPS._dabn_backward_sums(torch.randn_like(x).double(), x, mean)
    with pytest.raises(RuntimeError, match=r"mean must have shape \(2, 3\)"):
        OPS._dabn_backward_sums(torch.randn_like(x), x, mean[:1])
    with pytest.raises(RuntimeError, match=r"b must have shape"):
        OPS._dabn_backward_apply(torch.randn_like(x), x, mean, mean, mean[:, :2], mean)
    with pytest.raises(RuntimeError, match="x is empty"):
        OPS._dabn_backward_sums(x[:0], x[:0], mean[:0])


def test_build_info():
    info = _ext.build_info()
    assert info["built"] and info["openmp"] == "1", info
    assert int(info["omp_threads"]) >= 1 and info["cuda"] in ("0", "1")
    assert int(info["vec_width_f32"]) * 4 in (32, 64) or info["vec"] == "default", info
    if "avx2" not in _cpu_flags() or "fma" not in _cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA: the baseline kernels are expected")
    assert info["vec"] in ("avx2", "avx512"), f"AVX2 CPU but kernels are not vectorised: {info}"
    assert int(info["vec_width_f32"]) >= 8, info


def test_capability_env(monkeypatch):
    monkeypatch.setenv("DATTA_CPU_CAPABILITY", "default")
    assert _ext.build_info()["vec"] == "default"
    monkeypatch.setenv("DATTA_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="DATTA_CPU_CAPABILITY"):
        OPS._instance_stats(torch.ones(1, 1, 2, 2))


# ------------------------------------------------------------------ the C++ check_inputs
def _fwd_args(**over):
    c = 3
    args = dict(x=torch.randn(2, c, 4, 4), weight=torch.ones(c), bias=torch.zeros(c),
                source_mean=torch.zeros(c), source_var=torch.ones(c),
                blend=torch.tensor(BLEND_BN), shrink_k=None, eps=EPS)
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize("over, match", [
    (dict(x=torch.randn(2, 3, 4)), "4-D"),
    (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int32)), "float64, float32, float16 or bfloat16"),
    (dict(x=torch.randn(0, 3, 4, 4)), "empty"),
    (dict(x=torch.randn(2, 3, 4, 8)[..., ::2]), "dense in NCHW or channels_last"),
    (dict(weight=torch.ones(4)), r"weight must have shape \(3,\)"),
    (dict(source_var=torch.ones(3, dtype=torch.int64)), "source_var must be floating"),
    (dict(blend=torch.ones(2)), r"blend must have shape \(3,\)"),
])
def test_check_inputs_forward(over, match):
    with pytest.raises(RuntimeError, match=match):
        OPS._dabn_forward(*_fwd_args(**over))


def test_check_inputs_backward():
    x, w, _, sm, sv, b, k, eps = _fwd_args()
    mean, var = OPS._instance_stats(x)
    with pytest.raises(RuntimeError, match="dy must have x's shape"):
        OPS._dabn_backward(torch.randn(2, 3, 4, 5), x, w, sm, sv, b, k, eps, mean, var)
    with pytest.raises(RuntimeError, match="dy must have x's dtype"):
        OPS._dabn_backward(torch.randn_like(x).double(), x, w, sm, sv, b, k, eps, mean, var)
    with pytest.raises(RuntimeError, match="dense in x's memory layout"):
        dy = torch.randn_like(x).contiguous(memory_format=torch.channels_last)
        OPS._dabn_backward(dy, x, w, sm, sv, b, k, eps, mean, var)
    with pytest.raises(RuntimeError, match=r"mean must have shape \(2, 3\)"):
        OPS._dabn_backward(torch.randn_like(x), x, w, sm, sv, b, k, eps, mean[:1], var)
    with pytest.raises(RuntimeError, match="batch_mean must have shape"):
        OPS._diversity_angles(x, sm, torch.zeros(5))


# ------------------------------------------------------------------ numerics vs the reference
#: shapes that stress each kernel path: vector tails in planes and channel blocks, M=1, N=1,
#: more channels than one channels_last block, and a plane larger than one L1 chunk.
SHAPES = {
    "odd": (3, 7, 11, 13),
    "hw1": (4, 6, 1, 1),
    "n1hw1": (1, 5, 1, 1),
    "c70": (2, 70, 3, 5),
    "bigplane": (2, 3, 80, 75),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_against_reference_every_isa(isa, name, layout):
    inp = make_inputs(SHAPES[name], layout=layout, seed=3)
    _check_against_reference(inp, BLEND_MIX, 2.0)
    _check_against_reference(inp, BLEND_BN, None)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype, layout):
    inp = make_inputs((3, 19, 9, 7), dtype=dtype, layout=layout, seed=4)
    _check_against_reference(inp, BLEND_MIX, 4.0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_offset_is_stable(layout):
    """x = 1e4 + noise in float32: a raw sum-of-squares variance would be garbage (ulp(1e8) = 8).

    Compared with the float64 reference on the same float32 values.  What float32 itself
    cannot avoid is the rounding of the mean (half an ulp of 1e4 ~ 5e-4), so y gets 2e-3.
    """
    inp = make_inputs((4, 5, 61, 67), layout=layout, offset=1e4, seed=5)
    y, mean, var = _forward(inp, BLEND_BN)
    x64 = inp.x.double()
    mean64, var64 = ref.instance_stats(x64)
    torch.testing.assert_close(mean.double(), mean64, atol=1e-3, rtol=0)
    torch.testing.assert_close(var.double(), var64, atol=0, rtol=1e-4)
    y64 = ref.dabn(x64, inp.weight.double(), inp.bias.double(), inp.source_mean.double(),
                   inp.source_var.double(), torch.tensor(BLEND_BN, dtype=torch.float64), None, EPS)
    torch.testing.assert_close(y.double(), y64, atol=2e-3, rtol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates(layout):
    inp = make_inputs((2, 3, 5, 6), layout=layout, seed=6)
    inp.x[1, 2, 3, 4] = float("nan")
    x_before = inp.x.clone()
    blend = (0.85, 0.0, 0.15)
    y, mean, var = _forward(inp, blend, 4.0)
    torch.testing.assert_close(inp.x, x_before, rtol=0, atol=0, equal_nan=True)  # not modified
    assert mean[1, 2].isnan() and var[1, 2].isnan() and y[1, 2].isnan().all()
    assert not y[:, :2].isnan().any()  # other channels are untouched
    # w_b = 0: the NaN batch mean of channel 2 is not read, so sample 0 stays finite (SPEC §3)
    assert y[0].isfinite().all()
    y_ref = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var,
                     torch.tensor(blend), 4.0, EPS)
    torch.testing.assert_close(y, y_ref, equal_nan=True, **tol(torch.float32))
    theta = OPS._diversity_angles(inp.x, inp.source_mean, mean.mean(0))
    assert theta.isnan().all()  # the batch mean of channel 2 is NaN for every sample


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_deterministic(layout):
    """Same inputs -> the same bits (fixed reduction order, no atomics), threads or not."""
    inp = make_inputs((8, 40, 33, 31), layout=layout, seed=7)
    b = torch.tensor(BLEND_MIX)
    runs = []
    for _ in range(2):
        y, mean, var = _forward(inp, BLEND_MIX, 2.0)
        dx, dw, db = OPS._dabn_backward(torch.ones_like(y), inp.x, inp.weight, inp.source_mean,
                                        inp.source_var, b, 2.0, EPS, mean, var)
        theta = OPS._diversity_angles(inp.x, inp.source_mean, mean.mean(0))
        runs.append((y, mean, var, dx, dw, db, theta))
    for a, b2 in zip(*runs, strict=True):
        assert torch.equal(a, b2)


@pytest.mark.parametrize("layout,shape,blend", [
    ("channels_last", (2, 9, 70, 70), BLEND_BN),
    # NCHW without batch statistics: the in-cache forward, whose blocks of planes depend on
    # the thread count (planes of 196 B and 3 KB: one to many blocks, sizes that do not divide)
    ("nchw", (16, 64, 7, 7), (0.4, 0.0, 0.6)),
    ("nchw", (7, 37, 28, 28), (1.0, 0.0, 0.0)),
])
def test_threads_do_not_change_bits(layout, shape, blend):
    inp = make_inputs(shape, layout=layout, seed=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _forward(inp, blend)
        runs = []
        for n in (2, 3):
            torch.set_num_threads(n)
            runs.append(_forward(inp, blend))
    finally:
        torch.set_num_threads(before)
    _check_against_reference(inp, blend, None)
    for many in runs:
        for a, b in zip(one, many, strict=True):
            assert torch.equal(a, b)


def test_ambiguous_layout_is_nchw():
    """C == 1 and H*W == 1 tensors are both NCHW- and channels_last-contiguous."""
    for shape in [(3, 1, 4, 5), (4, 6, 1, 1)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        inp = make_inputs(shape, seed=9)
        inp.x = x
        _check_against_reference(inp, BLEND_MIX, 1.0)


def test_build_cmake_sources_match():
    """setup.py and CMakeLists.txt glob the same source folders (no second source list)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        cmake = f.read()
    with open(os.path.join(root, "setup.py")) as f:
        setup = f.read()
    for pattern in ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/cuda/*.cu", "csrc/cuda/*.cpp"):
        assert pattern in cmake and pattern in setup, pattern
