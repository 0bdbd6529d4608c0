"""The eager fast path of ``ops.run_dabn`` / ``ops.run_instance_stats`` (docs/DESIGN.md).

``ops._eager_mode`` decides with two private torch functions,
``torch._C._len_torch_dispatch_stack`` and ``torch._C._are_functorch_transforms_active``.
If a torch release removes them or changes what they return, the fast path could bypass a
dispatch mode or a functorch transform silently; these tests fail loudly instead.
"""
from __future__ import annotations

import pytest
import torch

from datta_kernels import ops
from datta_kernels.testing import make_inputs

from .conftest import Recorder, backend_params

BACKENDS = backend_params("reference", "cpu")   # a row that cannot run skips with the reason
SHAPE = (3, 4, 5, 6)
BLEND = (0.6, 0.4, 0.0)  # batch statistics: the gradient has every path


# ---------------------------------------------------------------- the private functions
def test_private_functions_exist():
    for name in ("_len_torch_dispatch_stack", "_are_functorch_transforms_active"):
        assert callable(getattr(torch._C, name, None)), (
            f"torch._C.{name} is gone in torch {torch.__version__}: ops._eager_mode "
            "needs a replacement")


def test_private_functions_plain_context():
    assert torch._C._len_torch_dispatch_stack() == 0
    assert torch._C._are_functorch_transforms_active() is False


def test_dispatch_stack_under_mode():
    with Recorder():
        assert torch._C._len_torch_dispatch_stack() == 1
        assert torch._C._are_functorch_transforms_active() is False
    assert torch._C._len_torch_dispatch_stack() == 0


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_functorch_active_under_transform(transform):
    seen = []

    def f(t):
        seen.append((torch._C._are_functorch_transforms_active(),
                     torch._C._len_torch_dispatch_stack()))
        return t.sin().sum()

    x = torch.randn(3, 4)
    if transform == "grad":
        torch.func.grad(f)(x)
    else:
        torch.func.vmap(f)(x)
    assert seen == [(True, 0)]
    assert torch._C._are_functorch_transforms_active() is False


def test_is_plain_eager_call():
    x = torch.randn(2, 3)
    assert ops._is_plain_eager_call(x, None)
    assert not ops._is_plain_eager_call(x.clone().requires_grad_())
    with torch.no_grad():
        assert ops._is_plain_eager_call(x.clone().requires_grad_())
    with Recorder():
        assert not ops._is_plain_eager_call(x)
        assert ops._eager_mode(x.clone().requires_grad_()) == "op"     # a mode sees the op
    assert ops._eager_mode(x.clone().requires_grad_()) == "grad" and ops._eager_mode(x) == "plain"
    assert torch.func.vmap(lambda t: torch.tensor(ops._is_plain_eager_call(t)))(x).eq(0).all()


# ---------------------------------------------------------------- fast path vs dispatcher
def _args(backend):
    inp = make_inputs(SHAPE)
    return inp, (inp.weight, inp.bias, inp.source_mean, inp.source_var, torch.tensor(BLEND),
                 None, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_skips_the_custom_op(backend, monkeypatch):
    inp, rest = _args(backend)

    def boom(*a, **k):
        raise AssertionError("the plain eager call went through the custom op")

    monkeypatch.setattr(ops, "dabn_forward_op", boom)
    monkeypatch.setattr(ops, "dabn_normalize_op", boom)
    monkeypatch.setattr(ops, "instance_stats_op", boom)
    with torch.no_grad():
        ops.run_dabn(inp.x, *rest, backend=backend)
        stats = ops.run_instance_stats(inp.x, backend)
        ops.run_dabn(inp.x, *rest, backend=backend, stats=stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_dispatcher(backend):
    inp, rest = _args(backend)
    with torch.no_grad():
        fast = ops.run_dabn(inp.x, *rest, backend=backend)
        fast_stats = ops.run_instance_stats(inp.x, backend)
        fast_norm = ops.run_dabn(inp.x, *rest, backend=backend, stats=fast_stats)
    slow, mean_i, var_i = ops.dabn_forward_op(inp.x, *rest, backend)
    slow_stats = ops.instance_stats_op(inp.x, backend)
    slow_norm = ops.dabn_normalize_op(inp.x, *rest, *slow_stats, backend)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    torch.testing.assert_close(fast_norm, slow_norm, rtol=0, atol=0)
    torch.testing.assert_close(fast_stats, slow_stats, rtol=0, atol=0)
    torch.testing.assert_close((mean_i, var_i), slow_stats, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_dispatcher_vs_backend(backend):
    """A plain eager call recording a graph (the ops' autograd formula as an eager
    ``autograd.Function``): its forward equals the fast path's, its gradients equal the
    backend's backward called directly with the fast path's statistics."""
    inp, (w, b, sm, sv, blend, k, eps) = _args(backend)
    dy = torch.randn(SHAPE)
    x, w_, b_ = (t.clone().requires_grad_() for t in (inp.x, w, b))
    y = ops.run_dabn(x, w_, b_, sm, sv, blend, k, eps, backend=backend)
    assert y.grad_fn is not None
    y.backward(dy)
    with torch.no_grad():
        y_fast, mean_i, var_i = ops._dabn_forward_body(inp.x, w, b, sm, sv, blend, k, eps, backend)
        dx, dw, db = ops.kernel_backend(backend).dabn_backward(dy, inp.x, w, sm, sv, blend, k, eps,
                                                      mean_i, var_i)
    torch.testing.assert_close(y.detach(), y_fast, rtol=0, atol=0)
    torch.testing.assert_close((x.grad, w_.grad, b_.grad), (dx, dw.to(w.dtype), db.to(b.dtype)),
                               rtol=0, atol=0)


@pytest.fixture
def op_calls(monkeypatch) -> list:
    """Spies on ``ops.dabn_forward_op``: one entry per call (the call itself goes through)."""
    calls = []
    real = ops.dabn_forward_op

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(ops, "dabn_forward_op", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_goes_through_the_op(backend, op_calls):
    """Under torch.func.grad the fast path must not run: the custom op is reached (its
    autograd.Function then has no functorch support, which it says)."""
    inp, (w, b, sm, sv, blend, k, eps) = _args(backend)
    try:
        torch.func.grad(lambda t: ops.run_dabn(t, w, b, sm, sv, blend, k, eps,
                                               backend=backend).sum())(inp.x)
    except RuntimeError as e:
        assert "functorch" in str(e) or "setup_context" in str(e)
    assert op_calls, "torch.func.grad took the eager fast path"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_mode_sees_the_op(backend):
    inp, rest = _args(backend)
    with torch.no_grad(), Recorder() as rec:
        ops.run_dabn(inp.x, *rest, backend=backend)
        ops.run_instance_stats(inp.x, backend)
    assert "datta.dabn_forward.default" in rec.seen
    assert "datta.instance_stats.default" in rec.seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_goes_through_the_op(backend, op_calls):
    """Under vmap the fast path must not run (the backend would see a batched tensor): the
    custom op is called, and its missing vmap rule says so."""
    inp, rest = _args(backend)
    xs = torch.stack([inp.x, inp.x])
    try:
        out = torch.func.vmap(lambda t: ops.run_dabn(t, *rest, backend=backend))(xs)
    except RuntimeError:
        out = None  # no vmap rule registered for the custom op: fine, it was reached
    assert op_calls, "vmap took the eager fast path"
    if out is not None:
        expect = ops.run_dabn(inp.x, *rest, backend=backend)
        torch.testing.assert_close(out[0], expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_stats", [False, True])
def test_eager_grad_path_equals_the_custom_op(backend, with_stats, monkeypatch):
    """An eager call that records a graph skips the custom op (its autograd wrapper costs more
    per call) and gives the custom op's outputs and gradients bitwise."""
    inp, (w, b, sm, sv, blend, k, eps) = _args(backend)
    dy = torch.randn(SHAPE)
    stats = ops.run_instance_stats(inp.x, backend) if with_stats else None

    def grads(run):
        x, w_, b_ = (t.clone().requires_grad_() for t in (inp.x, w, b))
        y = run(x, w_, b_)
        y.backward(dy)
        return y.detach(), x.grad, w_.grad, b_.grad, type(y.grad_fn).__name__

    if with_stats:
        via_op = grads(lambda x, w_, b_: ops.dabn_normalize_op(x, w_, b_, sm, sv, blend, k, eps,
                                                               *stats, backend))
    else:
        via_op = grads(lambda x, w_, b_: ops.dabn_forward_op(x, w_, b_, sm, sv, blend, k, eps,
                                                             backend)[0])

    def boom(*a, **kw):
        raise AssertionError("the eager call recording a graph went through the custom op")

    monkeypatch.setattr(ops, "dabn_forward_op", boom)
    monkeypatch.setattr(ops, "dabn_normalize_op", boom)
    eager = grads(lambda x, w_, b_: ops.run_dabn(x, w_, b_, sm, sv, blend, k, eps, backend=backend,
                                                 stats=stats))
    assert eager[-1] == ("_EagerDabnNormalizeBackward" if with_stats else "_EagerDabnForwardBackward")
    torch.testing.assert_close(eager[:-1], via_op[:-1], rtol=0, atol=0)
