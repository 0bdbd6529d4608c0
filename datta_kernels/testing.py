"""Input builders, the tolerance table and a worker process's group teardown, shared by ``tests/``
and ``bench/``."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TOL", "tol", "rounding_tol", "make_inputs", "DabnInputs", "to_layout", "LAYOUTS",
           "SHAPES_ODD", "close_process_group", "perturb_batchnorms"]


#: One tolerance per dtype, with the reason.
#:  float64: gradcheck / exactness checks; only summation order differs.
#:  float32: fp32 accumulation in a different order; normalized outputs are O(1).
#:  float16: output rounding (10-bit mantissa, ulp(4) ~ 4e-3) dominates; stats are fp32.
#:  bfloat16: 7-bit mantissa, ulp(4) ~ 3e-2.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=8e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """Tolerance kwargs for ``torch.testing.assert_close``; ``scale`` widens both."""
    t = TOL[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def rounding_tol(ref: Tensor, dtype: torch.dtype, k: float = 1.0) -> dict[str, float]:
    """``assert_close`` kwargs for a result stored in ``dtype`` (float16 / bfloat16), compared
    (in float32) with ``ref``: the float32 reference computed from the same ``dtype`` inputs
    (exact in float32), not the reference's own 16-bit result.

    Bound: ``|got - ref| <= k * eps * (|ref| + s)``, ``eps = finfo(dtype).eps``, ``s`` the RMS of
    ``ref``.  Storing the result in ``dtype`` costs at most half an ulp (``<= eps/2 * |ref|``);
    float32 arithmetic in another order costs ~1e-6 of the terms' size, well inside
    ``k * eps * s``, which also covers values near 0.  With ``k = 1`` a result 1.2x the right
    one, or another blend's, fails (``tests/test_testing.py``).
    """
    eps = torch.finfo(dtype).eps
    s = float(ref.detach().double().square().mean().sqrt())
    return dict(rtol=k * eps, atol=k * eps * s)


LAYOUTS = ("nchw", "channels_last", "strided")

#: Odd shapes and why each is there.
SHAPES_ODD = {
    "n1": (1, 3, 5, 7),            # N=1: batch stats = instance stats
    "hw1": (4, 6, 1, 1),           # M=1: instance weight moves to source (edge rule)
    "n1hw1": (1, 5, 1, 1),         # N*M=1: batch weight moves to source too
    "c1": (3, 1, 4, 4),            # a single channel
    "prime": (3, 7, 11, 13),       # no size is a multiple of any vector width
    "c1000": (2, 1000, 3, 3),      # many channels, not a multiple of a block
    "tall": (2, 3, 67, 1),         # W=1
}


def to_layout(x: Tensor, layout: str) -> Tensor:
    """Re-lay ``x`` (values unchanged): NCHW-contiguous, channels_last, or a strided view."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # a view with a gap in the W stride: neither NCHW nor channels_last contiguous
        n, c, h, w = x.shape
        big = x.new_empty((n, c, h, 2 * w))
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


@dataclass
class DabnInputs:
    x: Tensor
    weight: Tensor
    bias: Tensor
    source_mean: Tensor
    source_var: Tensor


def make_inputs(shape, dtype=torch.float32, device="cpu", layout="nchw", offset: float = 0.0,
                seed: int = 0, param_dtype: torch.dtype | None = None) -> DabnInputs:
    """Random DABN inputs whose source statistics differ from the batch's (so every blend
    weight matters), with an optional large common ``offset`` (e.g. ``1e4 + noise``)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    pd = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    ch_shift = torch.randn(c, generator=g, dtype=torch.float64)
    ch_scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    inst = 0.3 * torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64)
    x = offset + ch_shift[None, :, None, None] + inst + ch_scale[None, :, None, None] * torch.randn(
        n, c, h, w, generator=g, dtype=torch.float64)
    x = to_layout(x.to(dtype=dtype, device=device), layout)
    source_mean = offset + ch_shift + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    source_var = ch_scale.square() * (0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    weight = 1.0 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype=pd, device=device)
    return DabnInputs(x, cast(weight), cast(bias), cast(source_mean), cast(source_var))


def perturb_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Every ``BatchNorm2d`` of ``model`` (in place, from the global RNG) gets source statistics
    and affine parameters away from the identity (mean U(-1, 1), var U(0.5, 2), gamma U(0.5,
    1.5), beta U(-1, 1)), so every blend weight and parameter matters; returns ``model.eval()``."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-1, 1)
    return model.eval()


def close_process_group() -> None:
    """End a worker process's default process group so that none of it is left for interpreter
    shutdown: a barrier (no rank leaves while a peer still sends), ``destroy_process_group``,
    then a check that the group object dies here, where its destructor joins gloo's threads.

    A group still referenced elsewhere (e.g. by a module that bound ``group.WORLD`` as a
    default argument when imported after ``init_process_group``: see
    ``datta_kernels/distributed.py``) outlives ``destroy_process_group`` and is torn down during
    interpreter shutdown, where it aborted a process now and then ("terminate called without an
    active exception", SIGABRT; issue 22).  Raises ``RuntimeError`` in that case, every time,
    instead of that rare abort.
    """
    import torch.distributed as dist

    group = dist.group.WORLD
    dist.barrier()
    dist.destroy_process_group()
    held = sys.getrefcount(group) - 2          # minus `group` and getrefcount's argument
    if held > 0:
        raise RuntimeError(f"the default process group is still referenced {held} time(s) "
                           "after destroy_process_group: it would be torn down during "
                           "interpreter shutdown (a module imported after init_process_group "
                           "that keeps group.WORLD?)")
