"""Stress check of the large-plane numerics (SPEC §1) on planes too large for CI (run on demand).

Three checks, each against a float64 computation done here in chunks (its own code, not the
reference module's full-size tensors):

* ``backward``: one (1, 1, 16384, 16384) float32 plane (M = 2^28), x ~ N(0, 1),
  dy ~ 0.5 + N(0, 1), blends ``tbn`` and ``bn_adapt`` (source statistics that differ from
  the batch's): goal ``max|dx - dx64| / max|dx64| < 1e-5``, same for dbias.
* ``ones``: the issue's case, one (1, 1, 32768, 32768) float16 plane (M = 2^30), dy = 1,
  ``tbn``: the exact dx is 0 and Sigma dy = 2^30; goal ``max|dx| < 1e-5 * gamma r`` and
  dbias exact to 1e-5 relative.
* ``angles``: the issue's case (1, 1, 46341, 46341) float16 (2^31 pixels; 46340^2 for
  Triton, which refuses images of 2^31 elements) whose source mean is its batch mean (exact
  angle 0), and a (2, 1, 32768, 32768) float16 batch (2^30 pixels
  per sample) with two different angles; goal ``|theta - theta64| < 1e-5`` per sample and the
  score exact to 1e-5.

Memory: the inputs and outputs themselves (``backward``: x, dy, dx = 3 GiB; ``ones``: 6 GiB;
``angles``: 4.3 GiB) plus float64 chunks of ``--chunk`` pixels (default 2^24: under 1 GiB of
temporaries); peak about 7 GiB at ``--scale 0``.  ``--scale k`` divides every plane by 4^k
(memory and time by 4^k).  Time at scale 0 on a 2-core machine: a few minutes for ``cpu``.

The Triton backend runs only under ``TRITON_INTERPRET=1`` (or on a GPU); under the
interpreter it uses a launch config with 64K-pixel tiles and no row splits (``--triton-tile``)
so that 2^28 pixels are 4096 tiles summed in sequence, in minutes instead of hours.

Usage: ``python scripts/stress_numerics.py [--checks backward,ones,angles]
[--backends cpu,triton,reference] [--scale K]``; exit status 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

from datta_kernels import backends
from datta_kernels import reference as ref

GOAL = 1e-5
EPS = 1e-5


def _chunks(total: int, chunk: int):
    for s in range(0, total, chunk):
        yield s, min(total, s + chunk)


def _randn(shape, dtype, seed, chunk):
    """N(0, 1) straight into a ``dtype`` tensor, a chunk at a time (no float32 copy of the
    whole input: that alone would be 8 GiB for 2^31 pixels)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for lo, hi in _chunks(flat.numel(), chunk):
        flat[lo:hi] = torch.randn(hi - lo, generator=g)
    return out


# ---------------------------------------------------------------- float64 oracles
def _plane_sums(x, dy, chunk):
    """(N, C) float64 mean, unbiased var, sum dy, sum dy (x - mean) of a (N, C, M) view."""
    n, c, m = x.shape
    s = torch.zeros(n, c, dtype=torch.float64)
    for a, b in _chunks(m, chunk):
        s += x[:, :, a:b].double().sum(-1)
    mean = s / m
    ss = torch.zeros_like(s)
    sdy = torch.zeros_like(s)
    sdyxc = torch.zeros_like(s)
    for a, b in _chunks(m, chunk):
        xc = x[:, :, a:b].double() - mean[:, :, None]
        ss += xc.square().sum(-1)
        d = dy[:, :, a:b].double()
        sdy += d.sum(-1)
        sdyxc += (d * xc).sum(-1)
    return mean, ss / (m - 1), sdy, sdyxc


def _coefficients(mean_i, var_i, sdy, sdyxc, weight, smean, svar, blend, m):
    """The backward of SPEC §3 (no shrink) per (n, c) in float64: dx = A dy + B (x - mu_i) + C0."""
    n = mean_i.shape[0]
    nm = n * m
    w_s, w_b, w_i = (w.double() for w in ref.effective_blend(blend.double(), n, m))
    mu_b, var_b = ref.batch_stats(mean_i, var_i, m)
    mean, var = ref.blend_moments(mean_i, var_i, smean.double(), svar.double(), blend.double(), m,
                                  None, EPS)
    r = torch.rsqrt(var.clamp(min=0) + EPS)
    g = weight.double().expand_as(r)
    sdyxh = r * (sdyxc + (mean_i - mean) * sdy)
    dm, dv = -g * r * sdy, -0.5 * g * r * r * sdyxh
    dmu_i, dvar_i = w_i * dm, w_i * dv
    dmu_b, dvar_b = w_b * dm.sum(0), w_b * dv.sum(0)
    coef_b = 2 * dvar_i / (m - 1) + 2 * dvar_b / (nm - 1)
    coef_c = dmu_i / m + dmu_b / nm + 2 * dvar_b * (mean_i - mu_b) / (nm - 1)
    return g * r, coef_b, coef_c, sdy.sum(0), sdyxh.sum(0)


def _angles64(x, smean, bmean, chunk):
    """SPEC §2 angles of a (N, C, M) view: a, b as float32 differences, the rest float64."""
    n, c, m = x.shape
    total = torch.zeros(n, dtype=torch.float64)
    for lo, hi in _chunks(m, chunk):
        xf = x[:, :, lo:hi].float()
        a = (smean.float()[None, :, None] - xf).double()
        b = (bmean.float()[None, :, None] - xf).double()
        dot = (a * b).sum(1)
        den = a.square().sum(1).sqrt().clamp(min=1e-10) * b.square().sum(1).sqrt().clamp(min=1e-10)
        total += (dot / den).sum(-1)
    return (total / m).clamp(-1, 1).arccos()


# ---------------------------------------------------------------- checks
def _impl(name):
    why = backends.get(name).reasons("cpu", torch.float32)
    if why:
        raise SystemExit(f"backend {name!r} cannot run here: {'; '.join(why)}")
    return backends.get(name).load()


def _report(label, value, goal, results):
    ok = value < goal
    results.append(ok)
    print(f"  {label:<44s} {value:10.3e}   goal < {goal:.0e}   {'ok' if ok else 'MISSED'}", flush=True)


def check_backward(impl, side, chunk, results):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, side, side, generator=g)
    dy = torch.randn(1, 1, side, side, generator=g).add_(0.5)
    weight = torch.tensor([1.3])
    smean, svar = torch.tensor([0.2]), torch.tensor([1.5])
    m = side * side
    xv, dyv = x.view(1, 1, m), dy.view(1, 1, m)
    mean64, var64, sdy64, sdyxc64 = _plane_sums(xv, dyv, chunk)
    for name, w in (("tbn", (0.0, 1.0, 0.0)), ("bn_adapt", (0.6, 0.4, 0.0))):
        blend = torch.tensor(w)
        t = time.time()
        mean_i, var_i = impl.instance_stats(x)  # what the forward saves (without allocating y)
        dx, _, dbias = impl.dabn_backward(dy, x, weight, smean, svar, blend, None, EPS, mean_i, var_i)
        t = time.time() - t
        a, b, c0, db64, _ = _coefficients(mean64, var64, sdy64, sdyxc64, weight, smean, svar, blend, m)
        err = scale = 0.0
        dxv = dx.view(1, 1, m)
        for lo, hi in _chunks(m, chunk):
            exp = (a[:, :, None] * dyv[:, :, lo:hi].double()
                   + b[:, :, None] * (xv[:, :, lo:hi].double() - mean64[:, :, None]) + c0[:, :, None])
            err = max(err, (dxv[:, :, lo:hi].double() - exp).abs().max().item())
            scale = max(scale, exp.abs().max().item())
        print(f"  [{name}: statistics + backward {t:.1f} s]", flush=True)
        _report(f"{name} dx max|err| / max|dx|  (M=2^{round(math.log2(m))})", err / scale, GOAL, results)
        _report(f"{name} dbias |err| / |dbias|", abs(dbias.double().item() - db64.item()) / abs(db64.item()),
                GOAL, results)
        del dx, mean_i, var_i


def check_ones(impl, side, chunk, results):
    x = _randn((1, 1, side, side), torch.float16, 1, chunk)
    dy = torch.ones_like(x)
    blend = torch.tensor([0.0, 1.0, 0.0])
    one, zero = torch.ones(1), torch.zeros(1)
    m = side * side
    t = time.time()
    mean_i, var_i = impl.instance_stats(x)
    dx, _, dbias = impl.dabn_backward(dy, x, one, zero, one, blend, None, EPS, mean_i, var_i)
    t = time.time() - t
    gr = 1.0 / math.sqrt(var_i.item() + EPS)
    dxmax = max(dx.view(-1)[lo:hi].float().abs().max().item() for lo, hi in _chunks(m, chunk))
    print(f"  [statistics + backward {t:.1f} s; gamma r = {gr:.4f}]", flush=True)
    _report(f"dy=1 tbn: max|dx| / (gamma r)  (exact 0, M=2^{round(math.log2(m))})", dxmax / gr, GOAL, results)
    _report("dy=1 tbn: |dbias - M| / M  (dbias = Sigma dy)", abs(dbias.double().item() - m) / m,
            GOAL, results)


def check_angles(impl, side_one, side_two, chunk, results, one_limit=None):
    # the case: one sample, source mean = batch mean -> exact angle 0
    if one_limit is not None and side_one * side_one > one_limit:
        side_one = math.isqrt(one_limit)
        print(f"  [this backend takes at most {one_limit} pixels per image: plane {side_one}^2]")
    x = _randn((1, 1, side_one, side_one), torch.float16, 2, chunk)
    t = time.time()
    mean_i, _ = impl.instance_stats(x)
    bmean = mean_i.mean(0)
    theta = impl.diversity_angles(x, bmean, bmean)
    t = time.time() - t
    exp = _angles64(x.view(1, 1, -1), bmean, bmean, chunk)
    m = side_one * side_one
    print(f"  [stats + angles {t:.1f} s; theta = {theta.item():.3e}, float64 {exp.item():.3e}]", flush=True)
    _report(f"source mean = batch mean: |theta - theta64|  (M={m})", abs(theta.double().item() - exp.item()),
            GOAL, results)
    del x
    # two samples with different angles (C = 1: cos = +-1 per pixel, theta = arccos of a mean
    # of signs, so a drifting total shows directly)
    x = _randn((2, 1, side_two, side_two), torch.float16, 3, chunk)
    x[1].add_(0.5)
    smean = torch.tensor([-0.3])
    t = time.time()
    mean_i, _ = impl.instance_stats(x)
    bmean = mean_i.mean(0)
    theta = impl.diversity_angles(x, smean, bmean)
    t = time.time() - t
    exp = _angles64(x.view(2, 1, -1), smean, bmean, chunk)
    m = side_two * side_two
    print(f"  [stats + angles {t:.1f} s; theta = {theta.tolist()}, float64 {exp.tolist()}]", flush=True)
    _report(f"two samples: max|theta - theta64|  (M=2^{round(math.log2(m))})",
            (theta.double() - exp).abs().max().item(), GOAL, results)
    score = ref.score_from_angles(theta.double()).item()
    _report("two samples: |score - score64|", abs(score - ref.score_from_angles(exp).item()), GOAL, results)


def _coarse_triton(tile_pixels: int):
    """Interpreter-friendly Triton launch: tiles of tile_pixels, no row splits."""
    from datta_kernels.backends.triton import config as tcfg

    tcfg.LAUNCH = dataclasses.replace(tcfg.LAUNCH, tile_bytes=4 * tile_pixels, nchw_block_p=(tile_pixels,),
                                      programs_per_sm=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Memory: about 7 GiB at --scale 0 (see the module docstring).")
    ap.add_argument("--checks", default="backward,ones,angles", help="comma list of backward, ones, angles")
    ap.add_argument("--backends", default="cpu", help="comma list of cpu, triton, reference, cuda")
    ap.add_argument("--scale", type=int, default=0, help="divide every plane by 4^K (default 0: full size)")
    ap.add_argument("--chunk", type=int, default=1 << 24, help="pixels per float64 chunk of the oracle")
    ap.add_argument("--triton-tile", type=int, default=1 << 16,
                    help="pixels per Triton tile under TRITON_INTERPRET=1 (default 65536)")
    args = ap.parse_args(argv)
    checks = args.checks.split(",")
    k = 2 ** args.scale
    torch.set_num_threads(os.cpu_count() or 1)
    results: list[bool] = []
    for name in args.backends.split(","):
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            _coarse_triton(args.triton_tile)
        impl = _impl(name)
        print(f"backend {name}", flush=True)
        if "backward" in checks:
            check_backward(impl, 16384 // k, args.chunk, results)
        if "ones" in checks:
            check_ones(impl, 32768 // k, args.chunk, results)
        if "angles" in checks:
            # Triton indexes inside an image in int32 (it refuses 2^31 elements or more)
            limit = 2**31 - 1 if name == "triton" else None
            check_angles(impl, 46341 // k, 32768 // k, args.chunk, results, limit)
    print(f"{sum(results)}/{len(results)} goals met")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
