"""Compare every usable backend with the reference on one input, and time them.

    python python/compare_backends.py --shape 8 64 28 28 --dtype float32 --layout channels_last

Prints, per backend: max |difference| to the reference for y and for the gradients of
x, weight and bias, and the median forward time.  Backends that cannot run say why.
"""
from __future__ import annotations

import argparse

import torch

import datta_kernels as dk
from datta_kernels import backends
from datta_kernels import reference as ref
from datta_kernels.benchmarking import cpu_time_interleaved
from datta_kernels.testing import make_inputs


def grads(fn, inp, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (inp.x, inp.weight, inp.bias))
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), dy))


def median_ms(fn, reps: int = 10) -> float:
    return 1e3 * cpu_time_interleaved({"fn": fn}, reps, warmup=1, warm_each=False)["fn"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=(8, 64, 28, 28))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--preset", default="datta", choices=sorted(dk.PRESETS))
    p.add_argument("--decision", default="multiple", choices=["single", "multiple"])
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    preset = dk.PRESETS[args.preset]
    blend = getattr(preset, args.decision)
    inp = make_inputs(tuple(args.shape), dtype, layout=args.layout)
    dy = torch.randn(inp.x.shape).to(dtype)
    print(f"x {tuple(inp.x.shape)} {dtype} {args.layout}; preset {args.preset}/{args.decision} "
          f"blend={blend} shrink_k={preset.shrink_k}")

    bl = torch.tensor(blend, dtype=torch.float64)
    expect = grads(lambda x, w, b: ref.dabn(x, w, b, inp.source_mean, inp.source_var, bl,
                                            preset.shrink_k), inp, dy)
    for name, why in backends.explain("cpu", dtype).items():
        if why:
            print(f"  {name:<10} unavailable: {'; '.join(why)}")
            continue
        fwd = lambda x, w, b, name=name: dk.dabn(x, w, b, inp.source_mean, inp.source_var, blend,
                                                 shrink_k=preset.shrink_k, backend=name)
        got = grads(fwd, inp, dy)
        diffs = [(g.float() - e.float()).abs().max().item() for g, e in zip(got, expect)]
        with torch.no_grad():
            ms = median_ms(lambda fwd=fwd: fwd(inp.x, inp.weight, inp.bias))
        print(f"  {name:<10} max|diff| y={diffs[0]:.2e} dx={diffs[1]:.2e} dw={diffs[2]:.2e} "
              f"db={diffs[3]:.2e}   forward {ms:.2f} ms")


if __name__ == "__main__":
    main()
