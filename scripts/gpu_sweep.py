"""Every kernel of one backend against the reference, on odd shapes, dtypes and layouts: a
correctness sweep that is also the workload for ``compute-sanitizer``.

    python scripts/gpu_sweep.py --backend cuda                     # sweep, exits 1 on a mismatch
    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/gpu_sweep.py --small
    TRITON_INTERPRET=1 python scripts/gpu_sweep.py --backend triton --small     # no GPU

Each case runs instance statistics, the pixel-mode score and the DABN forward + backward
(every preset blend, with and without shrink) and compares them with ``reference`` computed
in float64 from the same input, within ``testing.TOL`` of the dtype.  Shapes are chosen to hit
the kernels' edges: tails of vector widths and tiles, HW = 1 and 2, one channel, many
channels, large batches of tiny planes, a large offset (``1e4 + noise``, fp32), strided views.
Every (shape, dtype, layout, offset) case runs under its own try: an exception is reported as
a failure of that case (with its type and message) and the sweep goes on to the next.
"""
from __future__ import annotations

import argparse
import sys

import torch

import datta_kernels as dk
from datta_kernels import reference as ref
from datta_kernels.testing import LAYOUTS, make_inputs, tol

SHAPES_SMALL = [(1, 1, 1, 2), (2, 3, 5, 7), (3, 5, 1, 1), (4, 17, 9, 13), (2, 64, 3, 3)]
SHAPES_LARGE = SHAPES_SMALL + [(1, 1000, 7, 7), (64, 3, 31, 33), (256, 16, 2, 2),
                               (8, 256, 56, 56), (2, 8, 224, 224), (3, 33, 129, 1)]
DTYPES = {"cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
          "triton": (torch.float32, torch.float16, torch.bfloat16),
          "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def blends():
    """Every distinct (weights, shrink_k) of the presets, each with and without shrink, in
    table order (the case number seeds dy)."""
    seen = set()
    for p in dk.PRESETS.values():
        for w in (p.single, p.multiple):
            for k in (None,) if p.shrink_k is None else (None, p.shrink_k):
                if (w, k) not in seen:
                    seen.add((w, k))
                    yield w, k


def check(name: str, got: torch.Tensor, want: torch.Tensor, failures: list, **tols) -> None:
    try:
        torch.testing.assert_close(got.double(), want.double(), equal_nan=True, **tols)
    except AssertionError as e:
        failures.append(f"{name}: {' '.join(str(e).split())[:200]}")


def dabn_case(backend, tag, x, inp, w, k, dtype, offset: bool, failures: list, seed: int) -> None:
    """Forward + backward of one blend vs the reference on the same input (fp32 internals for
    half inputs, as the tests do).  Large-offset inputs are ill-conditioned in fp32 (x - mu is
    exact only to ~ulp(1e4) = 1e-3, huge against a tiny instance std): there the backend is
    compared with float64, and its max error must stay within 4x the fp32 reference's plus
    1e-3 of the values' scale (both are rounding-level; a raw E[x^2] - E[x]^2 would be off by
    O(1) and fail)."""
    bl = torch.tensor(w, device=x.device)
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, inp.weight, inp.bias))
    y = dk.dabn(xg, wg, bg, inp.source_mean, inp.source_var, bl, shrink_k=k, backend=backend)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            and not y.is_contiguous(memory_format=torch.channels_last):
        failures.append(f"{tag}: channels_last input, output not channels_last")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    got = (y, *torch.autograd.grad(y, (xg, wg, bg), dy))

    def reference(cast):
        xr, wr, br = (cast(t.detach()).requires_grad_() for t in (x, inp.weight, inp.bias))
        yr = ref.dabn(xr, wr, br, cast(inp.source_mean), cast(inp.source_var), bl.double(), k)
        return (yr, *torch.autograd.grad(yr, (xr, wr, br), cast(dy)))

    names = ("y", "dx", "dweight", "dbias")
    if offset:
        exact, ref32 = reference(lambda t: t.double()), reference(lambda t: t)
        for name, g, e, r in zip(names, got, exact, ref32):
            err = (g.double() - e).abs().max().item()
            allowed = 4 * (r.double() - e).abs().max().item() + 1e-3 * max(1.0, e.abs().max().item())
            if not err <= allowed:
                failures.append(f"{tag} blend={w} k={k} {name}: max error {err:.3g} vs float64, "
                                f"above 4x the fp32 reference's + 1e-3 of the scale ({allowed:.3g})")
        return
    # parameter grads are sums over N*M terms: rounding grows as sqrt(N*M) (tests use N*M ~ 100)
    pdt = ref.acc_dtype(dtype)
    grow = max(1.0, (x.shape[0] * x.shape[2] * x.shape[3] / 100) ** 0.5)
    tols = [tol(dtype), tol(dtype, 2.0), tol(pdt, 10.0 * grow), tol(pdt, 10.0 * grow)]
    for name, g, r, t in zip(names, got, reference(lambda t: t), tols):
        check(f"{tag} blend={w} k={k} {name}", g, r, failures, **t)


def one_case(backend: str, device: str, shape, dtype, layout, offset: float, failures: list,
             seed: int) -> int:
    """Statistics, angles and every blend's forward + backward of one input; returns the
    number of DABN cases run."""
    inp = make_inputs(shape, dtype=dtype, device=device, layout=layout, offset=offset)
    x, tag = inp.x, f"{backend} {shape} {dtype} {layout} offset={offset}"
    if shape[2] * shape[3] >= 2:
        pdt = ref.acc_dtype(dtype)
        stats = dk.instance_stats(x, backend=backend)
        stats_r = ref.instance_stats(x.double() if offset else x)
        for name, g, r in zip(("mean", "var"), stats, stats_r):
            check(f"{tag} instance {name}", g, r, failures,
                  **(dict(atol=0, rtol=1e-3) if offset else tol(pdt)))
        if not offset:
            _, a = dk.diversity_score(x, inp.source_mean, backend=backend)
            _, ar = dk.diversity_score(x, inp.source_mean, backend="reference")
            check(f"{tag} angles", a, ar, failures, **tol(pdt, 10.0))
    n = 0
    for w, k in blends():
        n += 1
        dabn_case(backend, tag, x, inp, w, k, dtype, bool(offset), failures, seed=seed + n)
    if device == "cuda":
        torch.cuda.synchronize()  # an asynchronous fault belongs to this case
    return n


def sweep(backend: str, device: str, shapes, dtypes=None) -> list[str]:
    failures, n, crashed = [], 0, 0
    for shape in shapes:
        for dtype in dtypes or DTYPES[backend]:
            for layout in LAYOUTS:
                for offset in (0.0, 1e4) if dtype == torch.float32 else (0.0,):
                    try:
                        n += one_case(backend, device, shape, dtype, layout, offset, failures, seed=n)
                    except Exception as e:  # noqa: BLE001 - report the case, go on with the next
                        crashed += 1
                        failures.append(f"CRASH {backend} {shape} {dtype} {layout} offset={offset}: "
                                        f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                        print(failures[-1], flush=True)
        print(f"  {shape} done ({len(failures)} failures so far)", flush=True)
    print(f"{backend}: {n} dabn cases over {len(shapes)} shapes, {len(failures)} failures "
          f"({crashed} crashed cases)")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cuda", choices=sorted(DTYPES))
    p.add_argument("--small", action="store_true", help="small shapes only (sanitizers, interpreter)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated subset, e.g. float32,bfloat16 (default: all the backend serves)")
    args = p.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else None
    device = "cpu" if args.backend == "cpu" or not torch.cuda.is_available() else "cuda"
    failures = sweep(args.backend, device, SHAPES_SMALL if args.small else SHAPES_LARGE, dtypes)
    for f in failures[:50]:
        print("MISMATCH", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
