"""Is the data path or the model the limit of ``datta-kernels run`` on CIFAR-10-C?

    python bench/bench_loader.py                  # full-size synthetic files in a temp dir under /tmp
    python bench/bench_loader.py --n 2000 --quick # smaller

Writes synthetic CIFAR-10-C files of the published size (``(50000, 32, 32, 3)`` uint8 per
corruption, 154 MB each; two corruptions) into a temporary folder (removed afterwards), then
measures images/s of

- the loader alone, exactly as ``run`` drives it: the stream's index batches through a
  ``DataLoader(BenchmarkDataset, sampler=batches, batch_size=None)``, memory-mapped reads, uint8
  -> float32 in [0, 1] (the files sit in the page cache right after being written: warm reads);
- the model forward: WideResNet-28-10 and ResNet-26 in eval mode, no grad, same batch size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from datta_kernels.benchmarking import cpu_time_interleaved, describe_machine, write_markdown
from datta_kernels.eval.bench_runner import _loader
from datta_kernels.eval.benchmarks import load_cifar_c, write_synthetic_cifar_c
from datta_kernels.eval.protocols import build_stream
from datta_kernels.eval.zoo import resnet26, wrn28_10

CORR = ("gaussian_noise", "fog")


def loader_rate(bench, stream_name: str, bs: int, workers: int, max_batches: int | None) -> float:
    stream = build_stream(bench.pool, stream_name, bs, seed=0, severity=5, corruptions=list(CORR))
    if max_batches:
        stream.batches = stream.batches[:max_batches]
    n = 0
    t0 = time.perf_counter()
    for xb, _ in _loader(bench.dataset, stream, "cpu", workers):
        x = xb.float().div_(255)
        n += len(x)
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def model_rate(model, bs: int, reps: int) -> float:
    model.eval()
    x = torch.rand(bs, 3, 32, 32)
    return bs / cpu_time_interleaved({"model": lambda: model(x)}, reps, warmup=1,
                                     warm_each=False)["model"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="images per severity (published: 10000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="fewer loader batches and model repeats")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a busy machine, 1 avoids OpenMP waits on a busy core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_batches = 40 if args.quick else None
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        t0 = time.perf_counter()
        root = write_synthetic_cifar_c(tmp, CORR, n=args.n)
        print(f"wrote 2 x ({5 * args.n}, 32, 32, 3) uint8 in {time.perf_counter() - t0:.1f} s")
        bench = load_cifar_c(root, CORR, (5,), 5)
        for w in (int(v) for v in args.workers.split(",")):
            for s in ("continual", "mixed_domains"):
                rate = loader_rate(bench, s, args.batch_size, w, max_batches)
                rows.append(["loader (mmap read + to float)", s, w, f"{rate:,.0f}"])
                print(rows[-1], flush=True)
    reps = 3 if args.quick else 10
    torch.manual_seed(0)
    for name, model in (("WRN-28-10 forward", wrn28_10()), ("ResNet-26 forward", resnet26())):
        rate = model_rate(model, args.batch_size, reps)
        rows.append([f"{name} (eval, no grad)", "-", "-", f"{rate:,.0f}"])
        print(rows[-1], flush=True)
    print(write_markdown("", f"CIFAR-10-C loader vs model, images/s (bs {args.batch_size})",
                         describe_machine(), (),
                         [(["what", "stream", "workers", "images/s"], rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
