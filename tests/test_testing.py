"""datta_kernels.testing: the 16-bit tolerance fails the wrong answers it must fail.

Mutation check for ``rounding_tol``: on bfloat16 and float16 inputs, dx of the float32
reference rounded to the dtype passes, while dx 1.2x the right one and dx of another blend
(both rounded the same way) fail.  The previous tolerance of these checks
(``tol(dtype, 10)``: atol 0.6, rtol 0.2 for bfloat16) accepted both."""
from __future__ import annotations

import pytest
import torch

from datta_kernels import reference as ref
from datta_kernels.testing import make_inputs, rounding_tol

EPS = 1e-5
BLEND = (0.2, 0.3, 0.5)       # the blend test_ext / test_triton check in 16 bits
OTHER = (0.3, 0.3, 0.4)       # a nearby blend: its dx differs by a few percent


def _dx(dtype, blend):
    inp = make_inputs((3, 19, 9, 7), dtype=dtype, seed=4)
    x = inp.x.float()                              # the 16-bit values, exact in float32
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype).float()
    mean, var = ref.instance_stats(x)
    dx, _, _ = ref.dabn_backward(dy, x, inp.weight, inp.source_mean, inp.source_var,
                                 torch.tensor(blend), 4.0, EPS, mean, var)
    return dx


def _passes(got, exp, dtype) -> bool:
    try:
        torch.testing.assert_close(got.to(dtype).float(), exp, **rounding_tol(exp, dtype))
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_tol_accepts_rounding_and_rejects_mutants(dtype):
    exp = _dx(dtype, BLEND)
    assert _passes(exp, exp, dtype)                      # the right dx, rounded to dtype
    assert not _passes(1.2 * exp, exp, dtype)            # 1.2x dx
    assert not _passes(_dx(dtype, OTHER), exp, dtype)    # dx of another blend
    assert not _passes(exp.roll(1, dims=-1), exp, dtype)  # right values, wrong places
