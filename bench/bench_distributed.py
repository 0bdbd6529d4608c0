"""Cost of DATTA across processes: one DistributedDATTA step with W gloo processes vs 1.

    python bench/bench_distributed.py                     # -> bench/results/cpu_distributed.md
    python bench/bench_distributed.py --shape 8,3,64,64 --worlds 1,2 --reps 3   # quicker

Each configuration spawns W processes (gloo, file:// rendezvous, 1 torch thread each, rank r
pinned to core r unless --no-pin) that run ``DistributedDATTA`` on the ResNet-50 of
``bench_adapt.py`` (53 BatchNorm layers) with the GLOBAL batch ``shape`` split evenly over the
ranks, the decision forced to "single" (a threshold selector: every step runs the DAFT
backward, the worst case for collectives).  Each step is timed between barriers (it needs
every rank); the collectives are wrapped with timers in the worker, which record each call's
entry and exit: the table splits the time in collectives into their own cost and the wait for
slower ranks (``summarize``).  With W = 1 the worker also runs plain ``DATTA`` on the same
batch, step by step in turn with the distributed one (the ratio of the two is the synced
layer's own cost, measured under the same conditions).  For W > 1 a second spawn runs plain
``DATTA`` on each rank's slice at the same time (local statistics, no collectives): what
sharing the machine costs, without any synchronisation.
"""
from __future__ import annotations

import argparse
import copy
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
from datta_kernels.benchmarking import describe_machine  # noqa: E402
from datta_kernels.benchmarking import write_markdown as write_result  # noqa: E402
from datta_kernels.distributed import DistributedDATTA  # noqa: E402
from datta_kernels.testing import close_process_group  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _CollectiveTimer:
    """Wraps the ``torch.distributed`` collectives in this process: per call (entry, exit)
    times, and bytes this rank put in."""

    NAMES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce")

    def __init__(self):
        self.reset()
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t = args[1] if fn.__name__.startswith("all_gather") else args[0]
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.spans.append((t0, time.perf_counter()))
            self.bytes += t.numel() * t.element_size()
            return out
        timed.__name__ = fn.__name__
        return timed

    def reset(self):
        self.spans, self.bytes = [], 0


def _worker(rank, world, init, shape, reps, out, mode, pin):
    if pin:                                        # rank r on core r (its gloo threads too)
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    timer = _CollectiveTimer()

    def make(cls):
        return cls(copy.deepcopy(base_model("cpu", torch.float32, shape)),
                   selector=dk.ThresholdSelector(1e9), score_mode="dispersion")

    adapter = make(DistributedDATTA if mode == "sync" else dk.DATTA)
    # one process: plain DATTA timed in the same process, step by step in turn with it
    single = make(dk.DATTA) if (mode == "sync" and world == 1) else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).tensor_split(world)[rank]
    adapter(x)                                     # untimed: score layer probe, header checks
    if single is not None:
        single(x)
    steps, single_s = [], []
    for _ in range(reps):
        dist.barrier()
        timer.reset()
        t0 = time.perf_counter()
        adapter(x)
        steps.append({"t": time.perf_counter() - t0, "bytes": timer.bytes,
                      "spans": [(a - t0, b - t0) for a, b in timer.spans]})
        if single is not None:
            t0 = time.perf_counter()
            single(x)
            single_s.append(time.perf_counter() - t0)
    lat = []
    probe = torch.zeros(1)
    for _ in range(21):                            # latency of one tiny collective
        t0 = time.perf_counter()
        dist.all_reduce(probe)
        lat.append(time.perf_counter() - t0)
    res = {"latency_s": statistics.median(lat), "steps": steps, "single_s": single_s,
           "per_call": _per_call(world),
           "channels": [lyr.num_features for lyr in adapter.layers]}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    close_process_group()                          # barrier, destroy, the group freed here


def _per_call(world: int, reps: int = 21) -> dict:
    """Median seconds of one gloo all_gather and one all_reduce of the synced layer's smallest
    and largest per-layer vectors (2C + 2 float64 for C = 64 and 2048), in a tight loop."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = {}
    for k in (130, 4098):
        t = torch.randn(k, dtype=torch.float64)
        flat = t.new_empty(world * k)
        for name in ("all_gather", "all_reduce"):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                if name == "all_gather":
                    gather(flat, t)
                else:
                    dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            out[name, 8 * k] = statistics.median(times)
    return out


def run_world(world, shape, reps, mode="sync", pin=True):
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_worker, args=(world, init, shape, reps, tmp, mode, pin), nprocs=world,
                 join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def summarize(res: list[dict]) -> dict:
    """Per step: the slowest rank's step time and time in collectives; the collectives' own
    cost (for each call the shortest time any rank spent in it: the last rank to arrive waits
    for nobody) and the wait for slower ranks (the rest).  Medians over the steps."""
    per = []
    for i in range(len(res[0]["steps"])):
        steps = [r["steps"][i] for r in res]
        durs = [[b - a for a, b in s["spans"]] for s in steps]
        own = sum(min(d[k] for d in durs) for k in range(len(durs[0])))
        total = max(sum(d) for d in durs)
        per.append((max(s["t"] for s in steps), total, own))
    med = [statistics.median(v[j] for v in per) for j in range(3)]
    s0 = res[0]["steps"][-1]
    single = statistics.median(res[0]["single_s"]) if res[0]["single_s"] else None
    per_call = {k: max(r["per_call"][k] for r in res) for k in res[0]["per_call"]}
    return {"step": med[0], "coll": med[1], "own": med[2], "calls": len(s0["spans"]), "single": single,
            "per_call": per_call,
            "bytes": s0["bytes"], "latency": res[0]["latency_s"], "channels": res[0]["channels"]}


def _table(rows):
    columns = ["configuration", "step ms", "in collectives ms (share)",
               "collectives' own cost ms (share)", "waiting for slower ranks ms",
               "collectives/step", "bytes sent by a rank/step", "one 4-byte all_reduce ms"]
    table = []
    for name, r in rows:
        if not r["calls"]:
            table.append([name, f"{r['step'] * 1e3:.1f}", "-", "-", "-", 0, 0, "-"])
            continue
        table.append([name, f"{r['step'] * 1e3:.1f}",
                      f"{r['coll'] * 1e3:.1f} ({r['coll'] / r['step']:.1%})",
                      f"{r['own'] * 1e3:.1f} ({r['own'] / r['step']:.1%})",
                      f"{(r['coll'] - r['own']) * 1e3:.1f}", r["calls"], r["bytes"],
                      f"{r['latency'] * 1e3:.3f}"])
    return columns, table


def _bytes_text(c: list[int]) -> str:
    fwd = [8 * (2 * ch + 2) for ch in c]
    bwd = [8 * 2 * ch for ch in c]
    return "\n".join([
        "Bytes one rank contributes per layer per step (from the code: forward "
        "`all_gather` of `[count, mean (C), M2 (C), n]` float64; backward `[dmu_B, dvar_B]` "
        "(2C) float64, an `all_gather` + rank-order sum on gloo, an `all_reduce` on NCCL; plus "
        "one `all_gather` of 3 or 1+2·2C values on the score layer and one `all_reduce` of all "
        "gamma/beta (4·ΣC bytes) for DAFT):", "",
        f"- per layer: forward {min(fwd)}–{max(fwd)} B (C = {min(c)}–{max(c)}), backward "
        f"{min(bwd)}–{max(bwd)} B; whole model: forward {sum(fwd)} B, backward {sum(bwd)} B, "
        f"gamma/beta {4 * 2 * sum(c)} B",
        f"- collectives per step: {len(c)} forward + 1 score + {len(c) - 1} backward (not the "
        "first layer: its input, the stem conv's output, needs no gradient) + 1 gamma/beta = "
        f"{2 * len(c) + 1} (a 'multiple' batch: the forward ones only)",
        "- 'in collectives': the slowest rank's time inside collective calls; 'own cost': for "
        "each call the shortest time any rank spent in it (the last rank to arrive waits for "
        "nobody), summed; 'waiting': the difference, time a rank waited for a slower one",
        "- 'local statistics' rows: the same W processes running plain DATTA on their slices "
        "concurrently, no collectives (not the method: it shows what sharing the cores costs); "
        "the 1-process distributed row against plain DATTA is the synced layer's own cost "
        "(its (N, C) statistics math in torch ops and the collective calls)"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="8,3,96,96", help="GLOBAL batch N,C,H,W")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--no-pin", action="store_true", help="do not pin rank r to core r")
    p.add_argument("--out", default=str(RESULTS / "cpu_distributed.md"))
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    pin = not args.no_pin
    load0 = os.getloadavg()[0]
    rows = []
    info = None
    for w in (int(v) for v in args.worlds.split(",")):
        if w > 1:
            rows.append((f"DATTA, {w} processes, local statistics",
                         summarize(run_world(w, shape, args.reps, "local", pin))))
        info = summarize(run_world(w, shape, args.reps, "sync", pin))
        if info["single"] is not None:
            rows.append(("DATTA (1 process, steps in turn with the next row)",
                         {"step": info["single"], "calls": 0}))
        rows.append((f"DistributedDATTA, {w} gloo process(es)", info))
    c = info["channels"]
    notes = [
        f"ResNet-50 of bench_adapt.py ({len(c)} BatchNorm layers, {sum(c)} channels in all), "
        f"global batch {'x'.join(map(str, shape))} split evenly, decision forced 'single' "
        "(DAFT backward every step), score mode dispersion",
        f"{os.cpu_count()} CPU cores, 1 torch thread per rank, "
        + ("rank r pinned to core r (sched_setaffinity)" if pin else "ranks not pinned")
        + f"; 1-min load average {load0:.2f} at the start",
        f"median of {args.reps} steps after an untimed one; step time of the slowest rank"]
    calls = ", ".join(f"{name} of {nbytes} B {sec * 1e3:.3f} ms"
                      for (name, nbytes), sec in sorted(info["per_call"].items(), key=lambda kv: kv[0][1]))
    notes.append(f"one gloo call between {w} process(es), tight loop, median (slowest rank): "
                 f"{calls}")
    text = write_result("", "DATTA across processes: one step, W gloo processes vs 1 (CPU)",
                        describe_machine(), notes, [_table(rows), _bytes_text(c)])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
