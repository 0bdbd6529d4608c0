"""Forward time of the score layer divided by a plain ``FusedDABN`` forward on the same input.

    pytest bench/bench_score_layer.py --benchmark-enable      # pytest-benchmark
    python bench/bench_score_layer.py --table                 # -> bench/results/cpu_score_layer.*

The score layer computes its instance statistics once and both scores and normalises from them
(``FusedDABN(compute_score=True)``).  Bytes it must move (B = x.nbytes): ``dispersion`` and
``instance`` 2 reads + 1 write of x, like a plain layer with batch statistics; ``pixel`` one
more read (the angles need the batch mean first).  ``unfused`` is the path before this
change, for context: ``diversity_score`` (statistics + angles) and then ``dabn`` (statistics
again + normalize), 4 reads + 1 write.  Two blends: ``single`` (0.6, 0.4, 0) needs batch
statistics, so the plain layer reads x twice too; ``multiple`` (0.85, 0, 0.15) has none, and
the plain ``cpu`` layer then normalises each plane while it is in cache (x read once from
memory) — the score layer cannot, since its decision needs every plane's statistics first.
Goal: ratio <= 1.05 with dispersion, <= 1.4 with pixel.
"""
from __future__ import annotations

import os

import pytest
import torch

import datta_kernels as dk
from datta_kernels.benchmarking import contestant_results, shape_id, table_main, time_contestants
from datta_kernels.benchmarking import write_markdown as write_result
from datta_kernels.testing import make_inputs

#: SmallResNet's score layer at bs 64; ResNet-50's layer1 / layer2 inputs at bs 32
SHAPES = [(64, 16, 28, 28), (32, 64, 56, 56), (32, 128, 28, 28)]
BLENDS = {"single": "single", "multiple": "multiple"}
CONTESTANTS = ("plain", "dispersion", "instance", "pixel", "unfused_pixel")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_case(shape, contestant: str, decision: str, backend: str = "auto", device: str = "cpu"):
    """A zero-argument callable: one no-grad forward of the layer configured as ``contestant``."""
    inp = make_inputs(shape, device=device)
    layer = dk.FusedDABN(shape[1], backend=backend, device=device)
    layer.set_source_stats(inp.source_mean, inp.source_var)
    layer.set_decision(decision)
    x = inp.x
    if contestant in ("dispersion", "instance", "pixel"):
        layer.compute_score, layer.score_mode = True, contestant
    if contestant == "unfused_pixel":
        def run():
            with torch.no_grad():
                dk.diversity_score(x, layer.source_mean, mode="pixel", backend=backend)
                return layer(x)
        return run

    def run():
        with torch.no_grad():
            return layer(x)
    return run


@pytest.mark.parametrize("shape", SHAPES[:1], ids=shape_id)
@pytest.mark.parametrize("contestant", CONTESTANTS)
def test_score_layer_forward(benchmark, shape, contestant):
    fn = make_case(shape, contestant, "single")
    benchmark.extra_info["bytes_x"] = torch.empty(shape).nbytes
    benchmark(fn)


def table(reps: int, device: str = "cpu") -> dict:
    rows = []
    for shape in SHAPES:
        for decision in BLENDS:
            runs = {c: make_case(shape, c, decision, device=device) for c in CONTESTANTS}
            t = time_contestants(runs, device, reps)
            rows.append({"shape": list(shape), "decision": decision,
                         "ms": {c: 1e3 * v for c, v in t.items()},
                         "ratio": {c: t[c] / t["plain"] for c in CONTESTANTS}})
            print(rows[-1], flush=True)
    return contestant_results(rows, reps, device)


def write_markdown(res: dict, path: str) -> None:
    notes = [f"median of {res['reps']} interleaved reps (CPU) or `triton.testing.do_bench` (GPU), "
             "no grad, float32 NCHW, backend auto; cells: forward time / plain FusedDABN "
             "forward time. Goal: dispersion <= 1.05, pixel <= 1.4."]
    rows = []
    for r in res["rows"]:
        q = r["ratio"]
        rows.append([shape_id(r["shape"]), r["decision"], f"{r['ms']['plain']:.2f}"]
                    + [f"{q[c]:.2f}" for c in ("dispersion", "instance", "pixel", "unfused_pixel")])
    columns = ["shape", "decision", "plain ms", "dispersion", "instance", "pixel", "unfused pixel"]
    write_result(path, f"Score layer forward / plain FusedDABN forward ({res.get('device', 'cpu')})",
                 res["machine"], notes, [(columns, rows)])


if __name__ == "__main__":
    table_main(__doc__.split("\n\n")[0], "score_layer", table, write_markdown, reps=31, results_dir=RESULTS)
