"""The synced layer's per-(n, c) ops (``blend_moments``, ``dabn_backward_batch_terms``,
``dabn_backward_coefficients``) of every backend against the reference (the base class's
defaults, which are ``reference.blend_moments`` / ``dabn_backward_coefficients``), and the
synced layer's aten call count against FusedDABN's (issue 21: at most 2x, measured with
torch.profiler in a 1-process gloo group)."""
from __future__ import annotations

import os
import socket
from collections import Counter

import pytest
import torch

from datta_kernels import _ext
from datta_kernels.backends.base import KernelBackend
from datta_kernels.testing import tol

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Oracle(KernelBackend):
    """Only the base class's defaults: the reference's torch ops."""
    name = "oracle"
    instance_stats = diversity_angles = dabn_forward = dabn_normalize = dabn_backward = None


ORACLE = _Oracle()


def _backends():
    out = []
    if not _ext.unavailable_reasons():
        from datta_kernels.backends.cpu import CpuBackend
        out.append(pytest.param(CpuBackend(), id="cpu"))
    if INTERPRET:
        from datta_kernels.backends.triton import TritonBackend
        out.append(pytest.param(TritonBackend(), id="triton"))
    return out


def _stats(n, c, m, dtype=torch.float32, count=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, lo=None):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t.abs() + lo if lo is not None else t).to(dtype)
    mean_i, var_i = r(n, c), r(n, c, lo=0.1)
    smean, svar = r(c), r(c, lo=0.5)
    count = float(count if count is not None else 3 * n * m)  # a global batch of 3 such slices
    batch = (r(c), r(c, lo=0.2), torch.tensor(count, dtype=torch.float64))
    sdy, sdyxc = r(n, c), r(n, c)
    weight = r(c)
    return mean_i, var_i, smean, svar, batch, sdy, sdyxc, weight


CASES = {  # (n, c, m, count, blend, shrink_k): why
    "mix-shrink": (3, 5, 7, None, (0.2, 0.3, 0.5), 2.0),      # every term, D2's masks
    "bn-adapt": (4, 3, 9, None, (0.6, 0.4, 0.0), None),        # batch only (DAFT single)
    "m1": (3, 4, 1, None, (0.2, 0.3, 0.5), 2.0),               # D1: M = 1, instance -> source
    "count1": (1, 4, 1, 1, (0.2, 0.5, 0.3), None),             # D1: global count 1, batch -> source
    "count0": (2, 4, 5, 0, (0.1, 0.6, 0.3), 1.0),              # an empty global batch (no terms)
    "tbn": (2, 6, 4, None, (0.0, 1.0, 0.0), None),             # batch weight alone
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("has_weight", [True, False], ids=["w", "now"])
def test_sync_ops_match_reference(backend, case, has_weight):
    n, c, m, count, blend, k = case
    mean_i, var_i, smean, svar, batch, sdy, sdyxc, weight = _stats(n, c, m, count=count)
    w = weight if has_weight else None
    bl = torch.tensor(blend)
    t = tol(torch.float32, 4.0)
    got = backend.blend_moments(mean_i, var_i, smean, svar, bl, batch, m, k, 1e-5)
    want = ORACLE.blend_moments(mean_i, var_i, smean, svar, bl, batch, m, k, 1e-5)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, **t)
    args = (sdy, sdyxc, w, smean, svar, bl, batch, mean_i, var_i, m, k, 1e-5)
    got = backend.dabn_backward_batch_terms(*args)
    want = ORACLE.dabn_backward_batch_terms(*args)
    assert got[0].dtype == torch.float64 and got[0].shape == (2 * c,)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_.double(), w_.double(), **t)
    summed = 2.0 * want[0]  # as if a second rank had the same terms
    got = backend.dabn_backward_coefficients(*args, summed)
    want = ORACLE.dabn_backward_coefficients(*args, summed)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, **t)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_moments_match_reference(backend, dtype):
    """This slice's pack and the rank-ordered merge of three ranks' packs (one empty)."""
    m = 6
    packs = {"ours": [], "oracle": []}
    for n, seed in ((3, 0), (0, 1), (5, 2)):
        mean_i, var_i, *_ = _stats(n, 4, m, dtype=dtype, seed=seed)
        packs["ours"].append(backend.batch_moments_local(mean_i, var_i, m))
        packs["oracle"].append(ORACLE.batch_moments_local(mean_i, var_i, m))
    for a, b in zip(packs["ours"], packs["oracle"], strict=True):
        assert a.dtype == torch.float64 and a.shape == (10,)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    rows = torch.stack(packs["oracle"])
    got = backend.batch_moments_merge(rows, dtype)
    want = ORACLE.batch_moments_merge(rows, dtype)
    assert got[0].dtype == dtype and got[2].dtype == torch.float64 and got[2].shape == ()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype))
    assert got[2].item() == 8 * m and got[3].item() == 8
    # the merge equals the moments of the concatenated statistics (SPEC D4)
    from datta_kernels import reference as ref
    stats = [_stats(n, 4, m, dtype=torch.float64, seed=s)[:2] for n, s in ((3, 0), (0, 1), (5, 2))]
    mu_b, var_b = ref.batch_stats(torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]), m)
    torch.testing.assert_close(got[0].double(), mu_b, **tol(dtype))
    torch.testing.assert_close(got[1].double(), var_b, **tol(dtype))


@pytest.mark.parametrize("backend", _backends())
def test_zero_weight_statistics_are_not_read(backend):
    """An inf batch mean with w_b = 0 stays out of every output (SPEC "Non-finite input")."""
    mean_i, var_i, smean, svar, batch, sdy, sdyxc, weight = _stats(3, 4, 5)
    bmean = batch[0].clone()
    bmean[1] = float("inf")
    poisoned = (bmean, batch[1], batch[2])
    bl = torch.tensor([0.7, 0.0, 0.3])
    mean, var = backend.blend_moments(mean_i, var_i, smean, svar, bl, poisoned, 5, None, 1e-5)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    args = (sdy, sdyxc, weight, smean, svar, bl, poisoned, mean_i, var_i, 5, None, 1e-5)
    terms, _, _ = backend.dabn_backward_batch_terms(*args)
    assert (terms == 0).all()
    a, b, c0 = backend.dabn_backward_coefficients(*args, terms)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(c0).all()


@pytest.mark.skipif(bool(_ext.unavailable_reasons()), reason="needs datta_kernels._C")
def test_opcheck_sync_kernel_ops():
    """The five kernel ops and their fakes (torch.library.opcheck, CPU)."""
    ops = torch.ops.datta
    mean_i, var_i, smean, svar, batch, sdy, sdyxc, weight = _stats(3, 4, 5)
    bl = torch.tensor([0.2, 0.3, 0.5])
    packed = ops._batch_moments_local(mean_i, var_i, 5)
    torch.library.opcheck(ops._batch_moments_local.default, (mean_i, var_i, 5))
    torch.library.opcheck(ops._batch_moments_merge.default, (torch.stack([packed, packed]), torch.float32))
    torch.library.opcheck(ops._blend_moments.default,
                          (mean_i, var_i, smean, svar, bl, *batch, 5, 2.0, 1e-5))
    args = (sdy, sdyxc, weight, smean, svar, bl, *batch, mean_i, var_i, 5, None, 1e-5)
    torch.library.opcheck(ops._dabn_backward_batch_terms.default, args)
    terms = ops._dabn_backward_batch_terms(*args)[0]
    torch.library.opcheck(ops._dabn_backward_coefficients.default, (*args, terms))


# ---------------------------------------------------------------- aten calls per layer
@pytest.fixture(scope="module")
def gloo_group():
    import torch.distributed as dist
    if dist.is_initialized():
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


def _aten_calls(layer, x) -> tuple[int, Counter]:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):  # warm-up: first-call checks, caches
        xg = x.clone().requires_grad_()
        layer(xg).sum().backward()
    xg = x.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(xg).sum().backward()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return len(names), Counter(names)


@pytest.mark.skipif(bool(_ext.unavailable_reasons()), reason="needs the cpu backend (datta_kernels._C)")
@pytest.mark.parametrize("decision", ["single", "multiple"])
def test_synced_layer_aten_calls_at_most_twice_fused(gloo_group, decision):
    """Forward + backward of one layer on CPU: the synced layer (1-process gloo group) makes at
    most 2x the aten calls of FusedDABN on the same input (it was ~9x with the reference's
    per-(n, c) torch ops).  Outputs and gradients are the same."""
    import datta_kernels as dk
    from datta_kernels.distributed import SyncFusedDABN
    torch.manual_seed(0)
    plain = dk.FusedDABN(16, backend="cpu")
    with torch.no_grad():
        plain.running_var.uniform_(0.5, 2.0)
        plain.running_mean.normal_()
    sync = SyncFusedDABN(16, process_group=None, backend="cpu")
    sync.load_state_dict(plain.state_dict())
    for layer in (plain, sync):
        layer.set_decision(decision)
    x = torch.randn(8, 16, 14, 14)
    n_plain, _ = _aten_calls(plain, x)
    n_sync, calls = _aten_calls(sync, x)
    print(f"aten calls per layer ({decision}): FusedDABN {n_plain}, SyncFusedDABN {n_sync}")
    assert n_sync <= 2 * n_plain, (n_plain, n_sync, calls.most_common(12))
    outs = []
    for layer in (plain, sync):
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.square().sum().backward()
        outs.append((y, xg.grad, layer.weight.grad.clone()))
        layer.weight.grad = None
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, **tol(torch.float32, 4.0))
