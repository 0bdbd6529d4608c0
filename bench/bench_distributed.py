"""Cost of DATTA across processes: one DistributedDATTA step with W gloo processes vs 1.

    python bench/bench_distributed.py                     # -> bench/results/cpu_distributed.md
    python bench/bench_distributed.py --shape 8,3,64,64 --worlds 1,2 --reps 3   # quicker

Each configuration spawns W processes (gloo, file:// rendezvous, 1 torch thread each) that
run ``DistributedDATTA`` on the ResNet-50 of ``bench_adapt.py`` (53 BatchNorm layers) with the
GLOBAL batch ``shape`` split evenly over the ranks, the decision forced to "single" (a
threshold selector: every step runs the DAFT backward, the worst case for collectives).
Measured per rank: median step time, time inside ``torch.distributed`` collectives (the
functions are wrapped with timers in the worker), number of collectives and bytes this rank
put into them per step.  The row ``DATTA (1 process)`` is the plain single-process adapter on
the whole batch.  Where the ranks share fewer cores than there are ranks, the wall-time ratio
says little about scaling; the collective share and the bytes are what carry over (the
scaling model in docs/DISTRIBUTED.md uses them).  The ranks' steps are timed between barriers
in the worker (each step needs every rank), the single-process row with
``datta_kernels.benchmarking.cpu_time_interleaved``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapt import base_model  # noqa: E402

import datta_kernels as dk  # noqa: E402
from datta_kernels.benchmarking import cpu_time_interleaved, describe_machine  # noqa: E402
from datta_kernels.benchmarking import write_markdown as write_result  # noqa: E402
from datta_kernels.distributed import DistributedDATTA  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _CollectiveTimer:
    """Wraps ``dist.all_gather`` / ``dist.all_reduce`` in this process: seconds, calls, bytes."""

    def __init__(self):
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        for name in ("all_gather", "all_reduce"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t = args[1] if fn.__name__ == "all_gather" else args[0]
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
            return out
        timed.__name__ = fn.__name__
        return timed

    def reset(self):
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


def _step_runner(adapter, x):
    def run():
        adapter(x)
    return run


def _worker(rank, world, init, shape, reps, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    timer = _CollectiveTimer()
    model = base_model("cpu", torch.float32, shape)
    adapter = DistributedDATTA(model, selector=dk.ThresholdSelector(1e9), score_mode="dispersion")
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(shape, generator=g)
    x = x_all.tensor_split(world)[rank]
    adapter(x)                                     # untimed: score layer probe, header checks
    times, coll, calls, nbytes = [], [], [], []
    for _ in range(reps):
        dist.barrier()
        timer.reset()
        t0 = time.perf_counter()
        adapter(x)
        times.append(time.perf_counter() - t0)
        coll.append(timer.seconds)
        calls.append(timer.calls)
        nbytes.append(timer.bytes)
    lat = []
    probe = torch.zeros(1)
    for _ in range(21):                            # latency of one tiny collective
        t0 = time.perf_counter()
        dist.all_reduce(probe)
        lat.append(time.perf_counter() - t0)
    layers = adapter.layers
    res = {"latency_s": statistics.median(lat), "step_s": statistics.median(times),
           "coll_s": statistics.median(coll),
           "calls": calls[-1], "bytes": nbytes[-1], "layers": len(layers),
           "channels": [lyr.num_features for lyr in layers]}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()                                 # no rank leaves while a peer still sends
    dist.destroy_process_group()


def run_world(world, shape, reps):
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_worker, args=(world, init, shape, reps, tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def run_single(shape, reps):
    torch.set_num_threads(1)
    adapter = dk.DATTA(base_model("cpu", torch.float32, shape), selector=dk.ThresholdSelector(1e9),
                       score_mode="dispersion")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return cpu_time_interleaved({"step": lambda: adapter(x)}, reps, warmup=1,
                                warm_each=False)["step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="8,3,96,96", help="GLOBAL batch N,C,H,W")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "cpu_distributed.md"))
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    load0 = os.getloadavg()[0]
    rows = [("DATTA (1 process)", 1, run_single(shape, args.reps), 0.0, 0, 0, None)]
    for w in (int(v) for v in args.worlds.split(",")):
        res = run_world(w, shape, args.reps)
        r0 = res[0]
        step = max(r["step_s"] for r in res)
        coll = max(r["coll_s"] for r in res)
        rows.append((f"DistributedDATTA, {w} gloo process(es)", w, step, coll, r0["calls"],
                     r0["bytes"], r0))
    info = rows[-1][6]
    c = info["channels"]
    fwd = [8 * (2 * ch + 2) for ch in c]
    bwd = [8 * 2 * ch for ch in c]
    notes = [
        f"ResNet-50 of bench_adapt.py ({info['layers']} BatchNorm layers, {sum(c)} channels "
        f"in all), global batch {'x'.join(map(str, shape))} split evenly, decision forced "
        "'single' (DAFT backward every step), score mode dispersion",
        f"{os.cpu_count()} CPU cores shared by all ranks, 1 torch thread per rank; 1-min load "
        f"average {load0:.2f} at the start",
        f"median of {args.reps} steps after an untimed one; slowest rank"]
    table = []
    for name, _w, step, coll, calls, nbytes, r0 in rows:
        share = f"{coll / step:.1%}" if calls else "-"
        lat = f"{r0['latency_s'] * 1e3:.3f}" if r0 else "-"
        table.append([name, f"{step * 1e3:.1f}", f"{coll * 1e3:.1f}", share, calls, nbytes, lat])
    columns = ["configuration", "step ms", "in collectives ms", "share", "collectives/step",
               "bytes sent by a rank/step", "one 4-byte all_reduce ms"]
    after = "\n".join([
        "Bytes one rank contributes per layer per step (from the code: forward "
        "`all_gather` of `[count, mean (C), M2 (C), n]` float64; backward `all_reduce` of "
        "`[dmu_B, dvar_B]` (2C) float64; plus one `all_gather` of 3 or 1+2·2C values on the "
        "score layer and one `all_reduce` of all gamma/beta (4·ΣC bytes) for DAFT):", "",
        f"- per layer: forward {min(fwd)}–{max(fwd)} B (C = {min(c)}–{max(c)}), backward "
        f"{min(bwd)}–{max(bwd)} B; whole model: forward {sum(fwd)} B, backward {sum(bwd)} B, "
        f"gamma/beta {4 * 2 * sum(c)} B",
        f"- collectives per step: {info['layers']} forward + 1 score + "
        f"{info['layers'] - 1} backward (not the first layer: its input, the stem conv's "
        "output, needs no gradient) + 1 gamma/beta = "
        f"{2 * info['layers'] + 1} (a 'multiple' batch: the forward ones only)",
        "- the 1-process distributed row against plain DATTA is the cost of the "
        "pure-PyTorch synced normalisation (autograd through torch ops instead of the "
        "fused kernels) plus gloo's per-call overhead",
        "- 'in collectives' includes waiting for the slower rank at each collective "
        "(where ranks share cores, skew between them shows up as collective time); the "
        "4-byte all_reduce column is the bare per-call latency"])
    text = write_result("", "DATTA across processes: one step, W gloo processes vs 1 (CPU)",
                        describe_machine(), notes, [(columns, table), after])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
