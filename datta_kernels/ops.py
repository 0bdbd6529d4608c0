"""``torch.ops.datta.*``: the autograd-aware custom ops.

Two layers of ops live in the ``datta`` namespace:

* kernel ops declared in C++ (``csrc/ops.cpp``) with a leading underscore
  (``_instance_stats``, ``_diversity_angles``, ``_dabn_forward``, ``_dabn_normalize``,
  ``_dabn_backward``, ``_dispersion_score``), dispatched by device to the fused CPU or CUDA
  kernels (the ``cpu`` / ``cuda`` backends);
* the public ops defined here (``datta::instance_stats``, ``diversity_angles``,
  ``dabn_forward``, ``dabn_normalize``, ``dabn_backward``; in Python ``*_op``), which take the
  backend name as a string argument (a constant to ``torch.compile``), normalise the memory
  layout and call that backend (``backends/``).  ``dabn_forward`` and ``dabn_normalize``
  carry the autograd formula; every op has a fake implementation.

``dabn_forward`` returns ``(y, mean_i, var_i)``; the instance statistics are saved for the
backward pass (two passes over x and dy, no recomputation of the statistics).
``dabn_normalize`` is the same forward given those statistics (the score layer computes them
once, scores from them, then normalises: one pass over x fewer); its backward is the same.
``run_dabn`` / ``run_instance_stats`` are the entries of ``functional``: they skip the
custom-op dispatch when no graph is recorded.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext, backends
from .presets import acc_dtype

__all__ = ["instance_stats_op", "diversity_angles_op", "dabn_forward_op", "dabn_normalize_op",
           "dabn_backward_op", "run_instance_stats", "run_dabn", "as_kernel_layout", "is_channels_last",
           "kernel_backend"]


def is_channels_last(x: Tensor) -> bool:
    """True for a 4-D tensor dense in channels_last order (and not also NCHW-contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def as_kernel_layout(x: Tensor) -> Tensor:
    """Kernels take NCHW-contiguous or channels_last-contiguous tensors; other strides
    (slices, transposes, expanded views) are copied once into NCHW-contiguous memory."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def kernel_backend(backend: str):
    """The :class:`~datta_kernels.backends.base.KernelBackend` instance named ``backend``."""
    return backends.get(backend).impl()


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


# ---------------------------------------------------------------- instance statistics
@torch.library.custom_op("datta::instance_stats", mutates_args=())
def instance_stats_op(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and unbiased variance, ``(N, C)`` fp32 (fp64 for fp64 input)."""
    return kernel_backend(backend).instance_stats(as_kernel_layout(x))


@instance_stats_op.register_fake
def _(x, backend):
    return _stats_like(x), _stats_like(x)


def run_instance_stats(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """:func:`instance_stats_op`, calling the backend directly on a plain eager call (no graph
    recorded: the statistics carry no gradient), like :func:`run_dabn`."""
    if _is_plain_eager_call(x):
        return kernel_backend(backend).instance_stats(as_kernel_layout(x))
    return instance_stats_op(x, backend)


# ---------------------------------------------------------------- diversity angles
@torch.library.custom_op("datta::diversity_angles", mutates_args=())
def diversity_angles_op(x: Tensor, source_mean: Tensor, batch_mean: Tensor, backend: str) -> Tensor:
    """Pixel-mode angles ``(N,)`` (SPEC §2); one read of x."""
    return kernel_backend(backend).diversity_angles(as_kernel_layout(x), source_mean, batch_mean)


@diversity_angles_op.register_fake
def _(x, source_mean, batch_mean, backend):
    return x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


# ---------------------------------------------------------------- DABN forward/backward
def _dabn_forward_body(x, weight, bias, source_mean, source_var, blend, shrink_k, eps, backend):
    return kernel_backend(backend).dabn_forward(as_kernel_layout(x), weight, bias, source_mean,
                                       source_var, blend, shrink_k, eps)


@torch.library.custom_op("datta::dabn_forward", mutates_args=())
def dabn_forward_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                 source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean_i, var_i)``: the blended normalization of SPEC §3 and the instance stats."""
    return _dabn_forward_body(x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                              backend)


def _dabn_normalize_body(x, weight, bias, source_mean, source_var, blend, shrink_k, eps, mean_i,
                         var_i, backend):
    return kernel_backend(backend).dabn_normalize(as_kernel_layout(x), weight, bias, source_mean, source_var,
                                         blend, shrink_k, eps, mean_i, var_i)


@torch.library.custom_op("datta::dabn_normalize", mutates_args=())
def dabn_normalize_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
                   source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                   mean_i: Tensor, var_i: Tensor, backend: str) -> Tensor:
    """``y`` of :func:`dabn_forward_op` given ``mean_i, var_i = instance_stats(x)`` ``(N, C)``.

    The gradient with respect to x includes the paths through the instance statistics (they
    are functions of x, as in :func:`dabn_forward_op`); ``mean_i, var_i`` themselves get none.
    """
    return _dabn_normalize_body(x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                                mean_i, var_i, backend)


def run_dabn(x: Tensor, weight: Tensor | None, bias: Tensor | None, source_mean: Tensor,
         source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
         backend: str, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``y`` of :func:`dabn_forward_op` (of :func:`dabn_normalize_op` when ``stats`` are given).

    A plain eager call that records no autograd graph runs the backend directly: the custom
    op's Python dispatch (autograd wrapper, dynamo guard; ~10 us) would change nothing then.
    Anything else that is not plain eager (compiling, tensor subclasses such as fake tensors,
    torch_function / dispatch modes, functorch transforms) goes through the custom op.
    A plain eager call that records a graph runs :class:`_EagerDabnForward` /
    :class:`_EagerDabnNormalize`: the ops' own autograd formula as a plain
    ``torch.autograd.Function`` (the custom op's autograd wrapper costs more per call).
    """
    mode = _eager_mode(x, weight, bias, source_mean, source_var, blend)
    if stats is not None:
        args = (x, weight, bias, source_mean, source_var, blend, shrink_k, eps, *stats, backend)
        if mode == "plain":
            return _dabn_normalize_body(*args)
        return (_EagerDabnNormalize.apply if mode == "grad" else dabn_normalize_op)(*args)
    args = (x, weight, bias, source_mean, source_var, blend, shrink_k, eps, backend)
    if mode == "plain":
        return _dabn_forward_body(*args)[0]
    return (_EagerDabnForward.apply if mode == "grad" else dabn_forward_op)(*args)[0]


def _eager_mode(*tensors: Tensor | None) -> str:
    """``"plain"``: an eager call that records no graph; ``"grad"``: an eager call that records
    one; ``"op"``: anything else (the custom op)."""
    present = tuple(t for t in tensors if t is not None)
    if (torch.compiler.is_compiling() or torch.overrides.has_torch_function(present)
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._are_functorch_transforms_active()):
        return "op"
    return "grad" if torch.is_grad_enabled() and any(t.requires_grad for t in present) else "plain"


def _is_plain_eager_call(*tensors: Tensor | None) -> bool:
    return _eager_mode(*tensors) == "plain"


def _y_like(x: Tensor) -> Tensor:
    """An output like ``x`` in the layout the kernels write (channels_last or NCHW)."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _fake_dabn_forward(x, weight, bias, source_mean, source_var, blend, shrink_k, eps,
                       backend=""):
    return _y_like(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("datta::dabn_backward", mutates_args=())
def dabn_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, source_mean: Tensor,
                  source_var: Tensor, blend: Tensor, shrink_k: float | None, eps: float,
                  mean_i: Tensor, var_i: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; the formula is :func:`datta_kernels.reference.dabn_backward`."""
    x = as_kernel_layout(x)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)
    return kernel_backend(backend).dabn_backward(dy, x, weight, source_mean, source_var, blend,
                                        shrink_k, eps, mean_i, var_i)


def _fake_dabn_backward(dy, x, weight, source_mean, source_var, blend, shrink_k, eps,
                        mean_i, var_i, backend=""):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return _y_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_dabn_normalize(x, weight, bias, source_mean, source_var, blend, shrink_k, eps, mean_i,
                         var_i, backend=""):
    return _y_like(x)


dabn_forward_op.register_fake(_fake_dabn_forward)
dabn_normalize_op.register_fake(_fake_dabn_normalize)
dabn_backward_op.register_fake(_fake_dabn_backward)


def _save(ctx, x, weight, bias, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i,
          backend):
    ctx.save_for_backward(x, weight, source_mean, source_var, blend, mean_i, var_i)
    ctx.shrink_k, ctx.eps, ctx.backend = shrink_k, eps, backend
    ctx.has_bias = bias is not None


def _setup_context(ctx, inputs, output):
    x, weight, bias, source_mean, source_var, blend, shrink_k, eps, backend = inputs
    _, mean_i, var_i = output
    _save(ctx, x, weight, bias, source_mean, source_var, blend, shrink_k, eps, mean_i, var_i, backend)
    ctx.mark_non_differentiable(mean_i, var_i)


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, source_mean, source_var, blend, mean_i, var_i = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (need_x or need_w or need_b):
        return (None,) * 9
    dx, dweight, dbias = dabn_backward_op(dy, x, weight, source_mean, source_var, blend,
                                       ctx.shrink_k, ctx.eps, mean_i, var_i, ctx.backend)
    dweight = dweight.to(weight.dtype) if (need_w and weight is not None) else None
    dbias = dbias.to(x.dtype if weight is None else weight.dtype) if (need_b and ctx.has_bias) else None
    return (dx if need_x else None, dweight, dbias, None, None, None, None, None, None)


dabn_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_normalize(ctx, inputs, output):
    _save(ctx, *inputs)


def _backward_normalize(ctx, dy):
    return (*_backward(ctx, dy, None, None)[:8], None, None, None)


dabn_normalize_op.register_autograd(_backward_normalize, setup_context=_setup_context_normalize)


class _EagerDabnForward(torch.autograd.Function):
    """:func:`dabn_forward_op` for a plain eager call that records a graph: the same body, the
    same ``setup_context`` and backward (which calls :func:`dabn_backward_op`), without the
    custom op's autograd wrapper: 88 us against 64 us a call at 16x16x28x28 on the CPU, where a
    DATTA step with DAFT runs the layers before its decision with autograd on every batch."""

    @staticmethod
    def forward(*args):
        return _dabn_forward_body(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class _EagerDabnNormalize(torch.autograd.Function):
    """:func:`dabn_normalize_op` likewise (see :class:`_EagerDabnForward`)."""

    @staticmethod
    def forward(*args):
        return _dabn_normalize_body(*args)

    setup_context = staticmethod(_setup_context_normalize)
    backward = staticmethod(_backward_normalize)


# ---------------------------------------------------------------- fakes for the C++ kernel ops
def _register_kernel_fakes() -> None:
    """Fake (meta) kernels for the C++-declared ops, so they too pass ``opcheck``."""
    torch.library.register_fake("datta::_instance_stats")(lambda x: (_stats_like(x), _stats_like(x)))
    torch.library.register_fake("datta::_diversity_angles")(
        lambda x, sm, bm: x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype)))
    torch.library.register_fake("datta::_dabn_forward")(_fake_dabn_forward)
    torch.library.register_fake("datta::_dabn_normalize")(_fake_dabn_normalize)
    torch.library.register_fake("datta::_dispersion_score")(
        lambda mean, var, sm, sv, m, eps, parts, stat: (mean.new_empty((), dtype=torch.float32),
                                                        mean.new_empty((mean.shape[0],),
                                                                       dtype=torch.float32)))
    torch.library.register_fake("datta::_probe_spread")(
        lambda mean, *_: mean.new_empty((), dtype=torch.float32))
    torch.library.register_fake("datta::_source_shift")(
        lambda mean, *_: mean.new_empty((), dtype=torch.float32))
    def decide_forward(x, *_):
        return (_y_like(x), _stats_like(x), _stats_like(x),
                x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32),
                x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32),
                x.new_empty((2,), dtype=torch.bool))
    torch.library.register_fake("datta::_dabn_decide_forward")(decide_forward)
    torch.library.register_fake("datta::_dabn_stream_forward")(lambda x, *_: _y_like(x))
    torch.library.register_fake("datta::_stream_anchor")(
        lambda mean, var, m, stream_mean, stream_var, source_mean, source_var, *_: (
            torch.empty_like(source_mean), torch.empty_like(source_var)))
    torch.library.register_fake("datta::_threshold_decide")(
        lambda score, mean, *_: (mean.new_empty((), dtype=torch.float32),
                                 mean.new_empty((), dtype=torch.float32),
                                 mean.new_empty((2,), dtype=torch.bool)))
    torch.library.register_fake("datta::_dabn_backward")(_fake_dabn_backward)
    torch.library.register_fake("datta::_dabn_backward_sums")(
        lambda dy, x, mean: (_stats_like(x), _stats_like(x)))
    torch.library.register_fake("datta::_batch_moments_local")(
        lambda mean_i, var_i, m: mean_i.new_empty((2 * mean_i.shape[1] + 2,), dtype=torch.float64))

    def merge(rows, dtype):
        c = (rows.shape[1] - 2) // 2
        return (rows.new_empty((c,), dtype=dtype), rows.new_empty((c,), dtype=dtype),
                rows.new_empty(()), rows.new_empty(()))
    torch.library.register_fake("datta::_batch_moments_merge")(merge)

    def stats2(mean_i, *_):
        return torch.empty_like(mean_i), torch.empty_like(mean_i)
    torch.library.register_fake("datta::_blend_moments")(stats2)

    def batch_terms(sdy, sdyxc, weight, sm, sv, blend, bm, bv, bc, mean_i, *_):
        c = mean_i.shape[1]
        return (mean_i.new_empty((2 * c,), dtype=torch.float64), mean_i.new_empty((c,)),
                mean_i.new_empty((c,)))
    torch.library.register_fake("datta::_dabn_backward_batch_terms")(batch_terms)

    def coefficients(sdy, sdyxc, weight, sm, sv, blend, bm, bv, bc, mean_i, *_):
        return tuple(torch.empty_like(mean_i) for _ in range(3))
    torch.library.register_fake("datta::_dabn_backward_coefficients")(coefficients)
    torch.library.register_fake("datta::_dabn_backward_apply")(
        lambda dy, x, mean, a, b, c0: _fake_dabn_backward(dy, x, None, None, None, None, None,
                                                          0.0, mean, mean)[0])


#: the compiled extension's kernel ops (``datta::_*``) are there
HAS_KERNEL_OPS = not _ext.unavailable_reasons()
if HAS_KERNEL_OPS:
    _register_kernel_fakes()
