"""The reference against PyTorch identities and hand-checked cases (SPEC §1–§3)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from datta_kernels import reference as ref
from datta_kernels.presets import PRESETS
from datta_kernels.testing import make_inputs, tol

SHAPES = [(4, 6, 5, 7), (1, 3, 4, 4), (8, 2, 1, 9)]


def _blend(preset: str, decision: str = "single") -> torch.Tensor:
    return torch.tensor(getattr(PRESETS[preset], decision), dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_source_equals_eval_batchnorm(shape):
    inp = make_inputs(shape, torch.float64)
    bn = torch.nn.BatchNorm2d(shape[1], dtype=torch.float64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(inp.source_mean)
        bn.running_var.copy_(inp.source_var)
        bn.weight.copy_(inp.weight)
        bn.bias.copy_(inp.bias)
    y = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, _blend("source"))
    assert_close(y, bn(inp.x), **tol(torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_tbn_equals_train_batch_norm_up_to_variance_factor(shape):
    inp = make_inputs(shape, torch.float64)
    n, c, h, w = shape
    nm = n * h * w
    y = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, _blend("tbn"), eps=1e-5)
    # F.batch_norm normalises with the biased variance: rescale eps so the two agree exactly.
    # rsqrt(var_u + eps) = rsqrt(f var_b + eps) = rsqrt(f) rsqrt(var_b + eps / f), f = NM/(NM-1)
    f = nm / (nm - 1)
    expect = F.batch_norm(inp.x, None, None, inp.weight / math.sqrt(f), inp.bias, training=True,
                          eps=1e-5 / f)
    assert_close(y, expect, **tol(torch.float64))


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (1, 3, 4, 4), (2, 5, 2, 1)])
def test_instance_equals_instance_norm_unbiased(shape):
    inp = make_inputs(shape, torch.float64)
    n, c, h, w = shape
    m = h * w
    y = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, _blend("instance"))
    f = m / (m - 1)
    expect = F.instance_norm(inp.x, eps=1e-5 / f) / math.sqrt(f)
    expect = expect * inp.weight[None, :, None, None] + inp.bias[None, :, None, None]
    assert_close(y, expect, **tol(torch.float64))


def test_batch_stats_follow_from_instance_stats():
    x = make_inputs((5, 4, 3, 6), torch.float64).x
    mean_i, var_i = ref.instance_stats(x)
    mu_b, var_b = ref.batch_stats(mean_i, var_i, 18)
    assert_close(mu_b, x.mean(dim=(0, 2, 3)))
    assert_close(var_b, x.var(dim=(0, 2, 3), unbiased=True))


def test_instance_stats_stable_for_large_offset():
    """1e4 + noise in float32: the raw E[x^2]-E[x]^2 formula loses every digit here."""
    g = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    mean, var = ref.instance_stats(x64.float())
    assert_close(var, x64.var(dim=(2, 3)).float(), rtol=1e-2, atol=0)
    assert_close(mean, x64.mean(dim=(2, 3)).float(), rtol=1e-6, atol=0)


def test_edge_rules_move_weights_to_source():
    n, c = 3, 4
    x = make_inputs((n, c, 1, 1), torch.float64)
    blend = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    w_s, w_b, w_i = ref.effective_blend(blend, n, 1)
    assert (w_s.item(), w_b.item(), w_i.item()) == pytest.approx((0.7, 0.3, 0.0))
    w_s, w_b, w_i = ref.effective_blend(blend, 1, 1)
    assert (w_s.item(), w_b.item(), w_i.item()) == pytest.approx((1.0, 0.0, 0.0))
    # N*M = 1 with a pure batch blend is exactly eval BatchNorm
    one = make_inputs((1, c, 1, 1), torch.float64)
    y = ref.dabn(one.x, None, None, one.source_mean, one.source_var, _blend("tbn"))
    expect = (one.x - one.source_mean[None, :, None, None]) / torch.sqrt(
        one.source_var[None, :, None, None] + 1e-5)
    assert_close(y, expect)
    assert torch.isfinite(ref.dabn(x.x, None, None, x.source_mean, x.source_var, blend)).all()


def test_shrink_is_softshrink_towards_source():
    mean_i = torch.tensor([[0.0, 1.0, -5.0]], dtype=torch.float64)
    var_i = torch.tensor([[1.0, 4.0, 0.5]], dtype=torch.float64)
    smean = torch.zeros(3, dtype=torch.float64)
    svar = torch.ones(3, dtype=torch.float64)
    m, k, eps = 9, 1.0, 0.0
    mt, vt = ref.shrink_instance_stats(mean_i, var_i, smean, svar, m, k, eps)
    lam_mu, lam_var = math.sqrt(1 / 9), math.sqrt(2 / 8)
    assert_close(mt, torch.tensor([[0.0, 1 - lam_mu, -5 + lam_mu]], dtype=torch.float64))
    assert_close(vt, torch.tensor([[1.0, 4 - lam_var, 1.0]], dtype=torch.float64))
    # k = 0 is the identity
    mt0, vt0 = ref.shrink_instance_stats(mean_i, var_i, smean, svar, m, 0.0, eps)
    assert_close(mt0, mean_i)
    assert_close(vt0, var_i)


@pytest.mark.parametrize("blend", [(0.6, 0.4, 0.0), (0.85, 0.0, 0.15), (0.2, 0.3, 0.5), (0, 0, 1)])
@pytest.mark.parametrize("shrink_k", [None, 0.5, 4.0])
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (1, 2, 3, 3), (4, 3, 1, 1)])
def test_explicit_backward_matches_autograd(blend, shrink_k, shape):
    inp = make_inputs(shape, torch.float64, offset=1e3)
    x = inp.x.clone().requires_grad_()
    w = inp.weight.clone().requires_grad_()
    b = inp.bias.clone().requires_grad_()
    bl = torch.tensor(blend, dtype=torch.float64)
    y = ref.dabn(x, w, b, inp.source_mean, inp.source_var, bl, shrink_k)
    dy = torch.randn_like(y)
    expect = torch.autograd.grad(y, (x, w, b), dy)
    mean_i, var_i = ref.instance_stats(inp.x)
    got = ref.dabn_backward(dy, inp.x, inp.weight, inp.source_mean, inp.source_var, bl, shrink_k,
                            1e-5, mean_i, var_i)
    for g, e in zip(got, expect):
        assert_close(g, e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("blend", [(0.6, 0.4, 0.0), (0.2, 0.3, 0.5), (0, 1, 0)])
@pytest.mark.parametrize("shrink_k", [None, 0.5])
def test_split_batch_with_global_statistics_matches_whole_batch(blend, shrink_k):
    """The hooks the synced layer uses (datta_kernels.distributed), without processes: two
    slices, each with the whole batch's (mu_B, var_B, count) and the other slice's batch terms
    added by ``sum_batch``, give the whole batch's forward moments and backward slices."""
    inp = make_inputs((5, 4, 3, 3), torch.float64, offset=10.0)
    x, m = inp.x, 9
    bl = torch.tensor(blend, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean_i, var_i = ref.instance_stats(x)
    mu_b, var_b = ref.batch_stats(mean_i, var_i, m)
    batch = (mu_b, var_b, torch.tensor(5.0 * m, dtype=torch.float64))
    whole = ref.blend_moments(mean_i, var_i, inp.source_mean, inp.source_var, bl, m, shrink_k,
                              1e-5)
    dx, dw, db = ref.dabn_backward(dy, x, inp.weight, inp.source_mean, inp.source_var, bl,
                                   shrink_k, 1e-5, mean_i, var_i)
    parts = [slice(0, 2), slice(2, 5)]
    local = []        # each slice's packed [dmu_B, dvar_B] (what a rank contributes)
    for sl in parts:
        ref.dabn_backward_coefficients(*ref.dabn_backward_sums(dy[sl], x[sl], mean_i[sl])[2:],
                                       inp.weight, inp.source_mean, inp.source_var, bl, shrink_k,
                                       1e-5, mean_i[sl], var_i[sl], m, batch=batch,
                                       sum_batch=lambda t: local.append(t) or t)
    total = local[0] + local[1]
    dws, dbs = [], []
    for sl in parts:
        got = ref.blend_moments(mean_i[sl], var_i[sl], inp.source_mean, inp.source_var, bl, m,
                                shrink_k, 1e-5, batch=batch)
        assert_close(got[0], whole[0][sl])
        assert_close(got[1], whole[1][sl])
        dyf, xc, sdy, sdyxc = ref.dabn_backward_sums(dy[sl], x[sl], mean_i[sl])
        a, cb, cc, dw_s, db_s = ref.dabn_backward_coefficients(
            sdy, sdyxc, inp.weight, inp.source_mean, inp.source_var, bl, shrink_k, 1e-5,
            mean_i[sl], var_i[sl], m, batch=batch, sum_batch=lambda t: total)
        assert_close(ref.dabn_backward_dx(dyf, xc, a, cb, cc, x[sl]), dx[sl])
        dws.append(dw_s)
        dbs.append(db_s)
    assert_close(dws[0] + dws[1], dw)
    assert_close(dbs[0] + dbs[1], db)


def test_external_batch_count_applies_the_batch_edge_rule():
    bl = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    w = ref.effective_blend(bl, 0, 4, batch_count=one)          # a global batch of 1 element
    assert [float(t) for t in w] == pytest.approx([0.5, 0.0, 0.5])
    w = ref.effective_blend(bl, 0, 4, batch_count=one * 8)
    assert [float(t) for t in w] == pytest.approx([0.2, 0.3, 0.5])


def test_reference_gradcheck():
    inp = make_inputs((2, 3, 3, 2), torch.float64)
    bl = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (inp.x, inp.weight, inp.bias)]
    fn = lambda x, w, b: ref.dabn(x, w, b, inp.source_mean, inp.source_var, bl, 0.5)
    assert torch.autograd.gradcheck(fn, args)


def test_diversity_angles_orthogonal_and_parallel():
    # a = mu_s - x, b = mu_B - x.  With mu_s = mu_B every cos is 1 -> angle 0.
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    mu = torch.randn(4, dtype=torch.float64) + 10
    assert_close(ref.diversity_angles(x, mu, mu), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    # x = 0 everywhere, mu_s = e0, mu_B = e1: a ⟂ b -> angle pi/2
    z = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    e0 = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    e1 = torch.tensor([0, 1.0, 0], dtype=torch.float64)
    assert_close(ref.diversity_angles(z, e0, e1), torch.full((2,), math.pi / 2, dtype=torch.float64))


def test_diversity_score_is_population_std_of_angles():
    x = make_inputs((6, 5, 4, 4), torch.float32).x
    smean = torch.randn(5)
    score, angles = ref.diversity_score(x, smean)
    assert score.dim() == 0 and angles.shape == (6,)
    assert_close(score, angles.std(unbiased=False))
    var, _ = ref.diversity_score(x, smean, stat="var")
    assert_close(var, angles.var(unbiased=False))
    inst, inst_angles = ref.diversity_score(x, smean, mode="instance")
    assert inst_angles.shape == (6,) and torch.isfinite(inst)


def test_presets_table_is_the_spec():
    assert PRESETS["datta"] == ((0.6, 0.4, 0.0), (0.85, 0.0, 0.15), 4.0, False, None)
    assert PRESETS["dyn"] == ((0.8, 0.0, 0.2), (0.8, 0.0, 0.2), None, True, None)
    assert PRESETS["datta_icme"].multiple == (0.85, 0.15, 0.0)
    for p in PRESETS.values():
        assert sum(p.single) == pytest.approx(1) and sum(p.multiple) == pytest.approx(1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_fp32_statistics(dtype):
    inp = make_inputs((2, 3, 5, 5), dtype)
    mean, var = ref.instance_stats(inp.x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    bl = torch.tensor([0.5, 0.25, 0.25])
    y = ref.dabn(inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, bl)
    y32 = ref.dabn(inp.x.float(), inp.weight, inp.bias, inp.source_mean, inp.source_var, bl)
    assert y.dtype == dtype
    assert_close(y.float(), y32, **tol(dtype))
