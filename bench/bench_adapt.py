"""A whole DATTA step vs the plain BatchNorm model's forward, on a ResNet-50 (goal:
one DATTA step costs less than twice the BatchNorm model's forward).

    pytest bench/bench_adapt.py --benchmark-enable      # pytest-benchmark
    python bench/bench_adapt.py --table                 # one process -> bench/results/cpu_adapt.*
    python bench/bench_adapt.py --table --device cuda   # -> bench/results/cuda_adapt.*

Contestants, all on the same input x and the same weights (BatchNorm running statistics
calibrated on a few random batches first, so the source statistics are sane):

  bn_forward           plain model, train mode (batch statistics), no grad: the baseline
  bn_eval_forward      plain model, eval mode (running statistics), no grad
  datta_step_single    DATTA(convert_model(model)) called on x, selector forced to "single":
                       score at the first layer, one host sync for the decision, DABN forward
                       with grad, entropy backward to every layer's gamma/beta, SGD step
  datta_step_multiple  same, forced "multiple": score, decision, DABN forward, no graph
  datta_noft           DATTA(daft=False) with a threshold selector answering "single": forward
                       only, decision on the device (no host sync)

The decision is forced (instead of KDE) so the measured path is known; the KDE selector's own
cost, host-side and < 1 ms, is bench/bench_selector.py.  This is a whole-model timing, dominated
by the convolutions; the DABN kernels' bandwidth is bench/bench_dabn.py.  Read the ratios:
datta_step_single / bn_forward is the goal (< 2); the backward alone needs about one more
forward's worth of convolution work (input gradients through every conv but the first).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import backends
from datta_kernels.benchmarking import describe_gpu, describe_machine, time_contestants
from datta_kernels.benchmarking import write_markdown as write_result
from datta_kernels.diversity import MULTIPLE, SINGLE, Selector, ThresholdSelector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import save_results  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
#: input shape per device: pytest (smoke/benchmark) and --table (CPU only differs)
SHAPE = {"cpu": (8, 3, 64, 64), "cuda": (64, 3, 224, 224)}
TABLE_SHAPE = {"cpu": (16, 3, 112, 112), "cuda": (64, 3, 224, 224)}
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "bfloat16"]}
BN_IMPLS = ("bn_forward", "bn_eval_forward")
DATTA_IMPLS = ("datta_step_single", "datta_step_multiple", "datta_noft")


# ------------------------------------------------------------------ ResNet-50
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


def resnet50(num_classes: int = 1000) -> nn.Sequential:
    """torchvision's ResNet-50 v1.5 layout (stride in the 3x3 conv), 25.6M parameters, 53 BN."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for j in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


_MODELS: dict = {}


def base_model(device: str, dtype: torch.dtype, shape) -> nn.Module:
    """One calibrated ResNet-50 per (device, dtype, shape), eval mode; callers copy it."""
    key = (device, dtype, tuple(shape))
    if key not in _MODELS:
        torch.manual_seed(0)
        m = resnet50().to(device=device, dtype=dtype)
        for bn in m.modules():          # cumulative average of a few batches' statistics
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
        m.train()
        with torch.no_grad():
            for _ in range(2):
                m(torch.randn(shape, device=device, dtype=dtype))
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = 0.1
        _MODELS[key] = m.eval()
    return _MODELS[key]


# ------------------------------------------------------------------ contestants
class ForcedSelector(Selector):
    """Always answers ``decision``; reads the score as a float first, as ``KDESelector`` does
    (the step's one host sync), so the timed path is DATTA's real one minus the KDE."""

    def __init__(self, decision: str):
        self.decision = decision

    def update(self, score) -> str:
        float(score)
        return self.decision

    def state_dict(self) -> dict:
        return {"kind": "forced", "decision": self.decision}

    def load_state_dict(self, state: dict) -> None:
        self.decision = state["decision"]


def make_case(device: str, dtype_name: str, shape, impl: str, backend: str | None):
    """A zero-argument callable running one call of ``impl`` (synchronised on CUDA)."""
    dtype = getattr(torch, dtype_name)
    base = base_model(device, dtype, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    model = copy.deepcopy(base)
    if impl in BN_IMPLS:
        model.train(impl == "bn_forward")

        def call(t):
            with torch.no_grad():
                return model(t)
    else:
        dk.convert_model(model, backend=backend)
        if impl == "datta_noft":
            call = dk.DATTA(model, selector=ThresholdSelector(1e9), daft=False, backend=backend)
        else:
            forced = SINGLE if impl == "datta_step_single" else MULTIPLE
            call = dk.DATTA(model, selector=ForcedSelector(forced), backend=backend)

    def run():
        out = call(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    run.adapter = call if impl in DATTA_IMPLS else None
    return run


def contestants(device: str) -> list[tuple[str, str | None]]:
    """(impl, backend) pairs: the BatchNorm baselines once, DATTA per backend (``auto``, and
    ``reference`` on CPU; on CUDA also the GPU backend ``auto`` does not pick, when usable)."""
    names = ["auto"]
    if device == "cpu":
        names.append("reference")
    else:
        picked = backends.resolve("auto", "cuda", torch.float32)
        names += [b for b in ("cuda", "triton") if b != picked and b in backends.available_backends("cuda")]
    return [(i, None) for i in BN_IMPLS] + [(i, b) for b in names for i in DATTA_IMPLS]


# ------------------------------------------------------------------ pytest-benchmark
CASES = [(d, t, i, b) for d in DEVICES for t in DTYPES[d] for i, b in contestants(d)]


@pytest.mark.parametrize("device,dtype,impl,backend", CASES,
                         ids=["-".join(filter(None, c)) for c in CASES])
def test_adapt(benchmark, device, dtype, impl, backend):
    shape = SHAPE[device]
    run = make_case(device, dtype, shape, impl, backend)
    out = run()  # warm-up (and a check that the step runs)
    assert out.shape == (shape[0], 1000) and torch.isfinite(out.float()).all()
    if impl.startswith("datta_step"):  # the forced path is the one taken
        single = impl == "datta_step_single"
        assert run.adapter.last_decision == (SINGLE if single else MULTIPLE)
        assert run.adapter.n_updates == int(single)
    benchmark.group = f"adapt-{device}-{dtype}-{'x'.join(map(str, shape))}"
    benchmark.extra_info["resolved_backend"] = (
        backends.resolve(backend, device, getattr(torch, dtype)) if backend else None)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ one-process table
def table(device: str, reps: int, threads: list[int], shape) -> dict:
    rows = []
    load_start = os.getloadavg()[0]
    for nt in threads if device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(nt)
        for dtype in DTYPES[device]:
            pairs = contestants(device)
            key = {(i, b): i if b is None else f"{i}[{b}]" for i, b in pairs}
            runs = {key[i, b]: make_case(device, dtype, shape, i, b) for i, b in pairs}
            t = time_contestants(runs, device, reps)
            ms = {k: v * 1e3 for k, v in t.items()}
            for k, v in ms.items():
                print(f"{device} {nt} {dtype} {k:32s} {v:9.2f} ms", flush=True)
            resolved = {b: backends.resolve(b, device, getattr(torch, dtype))
                        for _, b in pairs if b is not None}
            ratios = {b: {i: ms[f"{i}[{b}]"] / ms["bn_forward"] for i in DATTA_IMPLS}
                      for b in resolved}
            rows.append({"threads": nt, "dtype": dtype, "shape": list(shape), "ms": ms,
                         "resolved_backend": resolved, "ratio_vs_bn_forward": ratios,
                         "images_per_s": {k: shape[0] / (v / 1e3) for k, v in ms.items()}})
    machine = {**describe_machine(), **(describe_gpu() if device == "cuda" else {}),
               "loadavg_1min_start": load_start}
    return {"device": device, "machine": machine, "goal": "datta_step_single / bn_forward < 2",
            "rows": rows}


def write_markdown(res: dict, path: str) -> None:
    m, dev = res["machine"], res["device"]
    notes = [
        f"device {dev}; torch threads {', '.join(str(r['threads']) for r in res['rows'])} (per "
        f"row), 1-min load average {m['loadavg_1min_start']:.2f} at the start",
        "model: ResNet-50 (bottlenecks [3, 4, 6, 3], 25.6M parameters, 53 BatchNorm2d), "
        "running statistics calibrated on random batches; input "
        f"{'x'.join(map(str, res['rows'][0]['shape']))}, NCHW",
        "`bn_forward`: plain model, train mode (batch statistics), no grad. "
        "`datta_step_single`: one full `DATTA` call forced to \"single\" (score, host-synced "
        "decision, DABN forward, entropy backward to gamma/beta, SGD step); "
        "`datta_step_multiple`: forced \"multiple\" (no graph, no backward); `datta_noft`: "
        "`daft=False`, threshold selector answering \"single\" on the device (no host sync)",
        "median wall time of one call (after an untimed one), contestants taking turns in one "
        "process; goal: **datta_step_single / bn_forward < 2**",
    ]
    tables: list = []
    for r in res["rows"]:
        tables += [f"## {r['threads']} thread(s), {r['dtype']}",
                   (["contestant", "ms", "images/s"],
                    [[k, f"{v:.1f}", f"{r['images_per_s'][k]:.1f}"] for k, v in r["ms"].items()])]
        rows = []
        for b, rat in r["ratio_vs_bn_forward"].items():
            ok = "met" if rat["datta_step_single"] < 2 else "**not met**"
            rows.append([f"{b} ({r['resolved_backend'][b]})", f"{rat['datta_step_single']:.2f}",
                         f"{rat['datta_step_multiple']:.2f}", f"{rat['datta_noft']:.2f}", ok])
        tables.append((["backend (resolves to)", "step single / bn_forward",
                        "step multiple / bn_forward", "noft / bn_forward", "goal < 2"], rows))
    write_result(path, f"A DATTA step vs the BatchNorm forward, ResNet-50 on {dev}", m, notes, tables)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table", action="store_true", help="run everything, write bench/results/")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts (CPU)")
    p.add_argument("--shape", default=None, help="N,C,H,W (default: 16,3,112,112 CPU, "
                   "64,3,224,224 CUDA)")
    p.add_argument("--out", default=None, help="output stem (default bench/results/<device>_adapt)")
    args = p.parse_args(argv)
    if not args.table:
        p.print_help()
        return
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else TABLE_SHAPE[args.device]
    out = args.out or os.path.join(RESULTS, f"{args.device}_adapt")
    res = table(args.device, args.reps, [int(t) for t in args.threads.split(",")], shape)
    save_results(res, out, write_markdown)


if __name__ == "__main__":
    main()
