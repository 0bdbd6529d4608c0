"""Which switches make the demo's model the same on every CPU: the recipe trained once per setting.

Each setting trains the demo's recipe (``TrainConfig(numerics="native")``: in the worker's own
process, on whatever numerics its environment gives) in a fresh interpreter, since the switches
only hold before a process's first kernel, and reports the clean test accuracy and a SHA-256 of
the weights. ``portable`` is what ``datta-kernels demo`` pins (``datta_kernels.eval.numerics``).
On an AVX-512 machine, the capped rows show which switch moves which library; on an AVX2-only
one every capped row should equal ``native``.

    python bench/numerics_copies.py > bench/results/numerics_copies.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from datta_kernels.benchmarking import describe_machine, provenance
from datta_kernels.eval.numerics import PORTABLE_ENV

ATEN = {"ATEN_CPU_CAPABILITY": "avx2"}
ONEDNN = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
#: name -> (environment switches, intra-op threads, CPUs the worker may run on: None = all)
SETTINGS = {
    "native, 2 threads": ({}, 2, None),
    "ATen capped only": (ATEN, 2, None),
    "oneDNN capped only": (ONEDNN, 2, None),
    "ATen + oneDNN capped": ({**ATEN, **ONEDNN}, 2, None),
    "portable (all four switches), 2 threads": (PORTABLE_ENV, 2, None),
    "portable, 2 threads on 1 CPU": (PORTABLE_ENV, 2, {0}),
    "portable, 1 thread": (PORTABLE_ENV, 1, None),
}


def worker(threads: int) -> None:
    torch.set_num_threads(threads)   # before any kernel, like numerics.pin
    from datta_kernels.eval.datasets import load_fashion_mnist
    from datta_kernels.eval.models import TrainConfig, evaluate, train, weights_digest

    data = load_fashion_mnist()
    t0 = time.perf_counter()
    model = train(TrainConfig(numerics="native"), data.train_x, data.train_y, progress=False)
    print(json.dumps({"accuracy": evaluate(model, data.test_x, data.test_y),
                      "sha": weights_digest(model)[:16],
                      "capability": torch.backends.cpu.get_cpu_capability(),
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    prov, m = provenance(), describe_machine()
    print("# Which switches make the demo's model the same on every CPU\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')}, "
          f"{m['cores']} cores, native ATen capability {m['torch_cpu_capability']}, "
          f"torch {torch.__version__}\n")
    print(__doc__.split("\n\n")[1] + "\n")
    print("| setting | switches | threads | ATen capability | clean accuracy % | weights SHA-256 (16) "
          "| train s |")
    print("|---|---|---|---|---|---|---|")
    clean = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    for name, (env, threads, cpus) in SETTINGS.items():
        cmd = [sys.executable, __file__, "--worker", str(threads)]
        if cpus is not None:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + cmd
        done = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        switches = ", ".join(f"`{k}={v}`" for k, v in env.items()) or "none"
        print(f"| {name} | {switches} | {threads} | {r['capability']} | {100 * r['accuracy']:.2f} | "
              f"`{r['sha']}` | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
    else:
        main()
