"""Forward time of a cluster-aware layer (DYN's CABN, SPEC §3b) divided by a plain ``FusedDABN``
forward with test-batch statistics (``tbn``) on the same input.

    pytest bench/bench_dyn.py --benchmark-enable      # pytest-benchmark
    python bench/bench_dyn.py --table                 # -> bench/results/cpu_dyn.*

Bytes both must move (B = x.nbytes): 2 reads + 1 write of x (statistics pass, normalisation
pass).  The cluster layer adds the ``(N, C)`` work on the device: FINCH's first partition of the
instance means (an ``N x N`` cosine matrix, ``ceil(log2 N)`` gathers) and the cluster moments.
``authors`` is a PyTorch transcription of the authors' layer (``torch.var_mean``, the one-hot
matmuls, scipy's components through a host copy), for context.  Goal: dyn <= 1.1 at
(64, 64, 56, 56).
"""
from __future__ import annotations

import os

import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

import datta_kernels as dk
from datta_kernels.benchmarking import contestant_results, gbps, shape_id, table_main, time_contestants
from datta_kernels.benchmarking import write_markdown as write_result
from datta_kernels.testing import make_inputs

SHAPES = [(64, 64, 56, 56), (16, 16, 28, 28), (64, 16, 28, 28), (256, 64, 14, 14)]
CONTESTANTS = ("tbn", "dyn", "authors")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _authors(x, layer):
    """The authors' ClusterAwareBatchNorm2d forward, op for op (host round trip for scipy)."""
    b, c = x.shape[:2]
    var, mu = torch.var_mean(x, dim=(2, 3), unbiased=True)
    z = torch.nn.functional.normalize(mu, dim=1)
    d = 1 - z @ z.T
    d.fill_diagonal_(float("inf"))
    nbr = d.argmin(1)
    idx = torch.arange(b)
    a = torch.zeros(b, b)
    a[idx, nbr] = 1
    a[idx, idx] += 1
    a = a @ a.T
    a[idx, idx] = 0
    labels = torch.from_numpy(connected_components(sp.csr_matrix(a.numpy()), directed=True,
                                                   connection="weak")[1]).long()
    onehot = torch.nn.functional.one_hot(labels).float()
    counts = onehot.sum(0)[:, None] + layer.eps
    cmu = onehot.T @ mu / counts
    dev = torch.einsum("blc,bl->lc", (mu[:, None] - cmu[None]) ** 2, onehot)
    cvar = (onehot.T @ var + dev) / counts
    r = 0.8
    m = (1 - r) * (onehot @ cmu) + r * layer.source_mean
    v = (1 - r) * (onehot @ cvar) + r * layer.source_var
    y = (x - m[:, :, None, None]) * torch.rsqrt(v[:, :, None, None] + layer.eps)
    return y * layer.weight[:, None, None] + layer.bias[:, None, None]


def make_case(shape, contestant: str, backend: str = "auto", device: str = "cpu"):
    """A zero-argument callable: one no-grad forward of the layer as ``contestant``."""
    inp = make_inputs(shape, device=device)
    preset = "tbn" if contestant == "tbn" else "dyn"
    layer = dk.FusedDABN(shape[1], preset=preset, backend=backend, device=device)
    layer.set_source_stats(inp.source_mean, inp.source_var)
    x = inp.x

    def run():
        with torch.no_grad():
            return _authors(x, layer) if contestant == "authors" else layer(x)
    return run


@pytest.mark.parametrize("shape", SHAPES[1:2], ids=shape_id)
@pytest.mark.parametrize("contestant", CONTESTANTS)
def test_dyn_forward(benchmark, shape, contestant):
    fn = make_case(shape, contestant)
    benchmark.extra_info["bytes_x"] = torch.empty(shape).nbytes
    benchmark(fn)


def table(reps: int, device: str = "cpu") -> dict:
    rows = []
    for shape in SHAPES:
        runs = {c: make_case(shape, c, device=device) for c in CONTESTANTS
                if device == "cpu" or c != "authors"}
        t = time_contestants(runs, device, reps)
        nbytes = 3 * torch.empty(shape).nbytes
        rows.append({"shape": list(shape), "ms": {c: 1e3 * v for c, v in t.items()},
                     "gbps": {c: gbps(nbytes, v) for c, v in t.items()},
                     "ratio": {c: t[c] / t["tbn"] for c in t}})
        print(rows[-1], flush=True)
    return contestant_results(rows, reps, device)


def write_markdown(res: dict, path: str) -> None:
    notes = [f"median of {res['reps']} interleaved reps (CPU) or `triton.testing.do_bench` (GPU), "
             "no grad, float32 NCHW, backend auto; ratio = forward time / `tbn` FusedDABN forward "
             "time; GB/s against the 2 reads + 1 write of x both must move. Goal: dyn <= 1.1 at "
             "64x64x56x56."]
    rows = []
    for r in res["rows"]:
        q, ms, bw = r["ratio"], r["ms"], r["gbps"]
        rows.append([shape_id(r["shape"]), f"{ms['tbn']:.2f}", f"{bw['tbn']:.1f}", f"{ms['dyn']:.2f}",
                     f"{bw['dyn']:.1f}", f"{q['dyn']:.2f}",
                     f"{q['authors']:.2f}" if "authors" in q else "-"])
    columns = ["shape", "tbn ms", "tbn GB/s", "dyn ms", "dyn GB/s", "dyn / tbn", "authors' layer / tbn"]
    title = f"DYN (cluster-aware) layer forward / plain FusedDABN forward ({res.get('device', 'cpu')})"
    write_result(path, title, res["machine"], notes, [(columns, rows)])


if __name__ == "__main__":
    table_main(__doc__.split("\n\n")[0], "dyn", table, write_markdown, reps=21, results_dir=RESULTS)
