"""DATTA across processes: each batch of a dynamic stream is split over the ranks.

    torchrun --standalone --nproc-per-node 2 python/adapt_distributed.py --synthetic --compare
    torchrun --nproc-per-node 2 python/adapt_distributed.py           # real Fashion-MNIST
    torchrun --nproc-per-node 8 python/adapt_distributed.py --batch-size 256   # 8 GPUs (NCCL)

The story:
1. join the process group torchrun describes (gloo on CPU, NCCL when CUDA is available);
2. every rank loads the same data and source model (rank 0 trains or loads the cached model
   first, the others then read the cache) and builds the same seeded dynamic stream;
3. ``DistributedDATTA`` converts every BatchNorm2d into a ``SyncFusedDABN`` on the group: the
   test-batch statistics and the diversity score are those of the *global* batch, so every
   rank reaches the same decision, and the DAFT step sums the gamma/beta gradients of all ranks
   (the parameters stay identical everywhere);
4. each rank feeds its contiguous slice of every batch (``np.array_split``: uneven slices are
   fine); the correct counts are summed over ranks;
5. with ``--compare``, rank 0 also runs one-process ``DATTA`` on the whole batches and prints
   both accuracies and whether every decision agreed.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import datta_kernels as dk
from datta_kernels.distributed import DistributedDATTA
from datta_kernels.eval.corruptions import corrupt_all
from datta_kernels.eval.datasets import load_fashion_mnist, write_synthetic
from datta_kernels.eval.models import TrainConfig, load_or_train
from datta_kernels.eval.streams import build_pool, make_stream


def make_adapter(model, args, distributed: bool):
    selector = dk.ThresholdSelector(args.threshold) if args.threshold is not None else None
    kw = {"selector": selector, "lr": args.lr, "score_mode": args.score_mode}
    return DistributedDATTA(model, **kw) if distributed else dk.DATTA(model, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="use a generated stand-in dataset")
    p.add_argument("--per-domain", type=int, default=400, help="test images per corruption")
    p.add_argument("--batch-size", type=int, default=32, help="GLOBAL batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--score-mode", default="pixel", choices=dk.adapt.SCORE_MODES)
    p.add_argument("--threshold", type=float, default=None,
                   help="ThresholdSelector(t) instead of the KDE selector")
    p.add_argument("--compare", action="store_true",
                   help="rank 0 also runs one-process DATTA on the whole batches")
    args = p.parse_args()

    # 1. the process group (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    torch.manual_seed(0)

    # 2. data and source model, identical on every rank
    data_dir, train = args.data_dir, TrainConfig()
    if args.synthetic:
        data_dir = write_synthetic(tempfile.mkdtemp(), n_train=256, n_test=128)
        train = TrainConfig(width=4, epochs=1, train_subset=256, batch_size=32)
    data = load_fashion_mnist(data_dir)
    for turn in range(2):                 # rank 0 fills the cache, then the others read it
        if (rank == 0) == (turn == 0):
            model, _ = load_or_train(train, data.train_x, data.train_y, progress=False)
        dist.barrier()
    n = min(args.per_domain, len(data.test_y))
    pool = build_pool(corrupt_all(data.test_x[:n], seed=0), data.test_y[:n])
    stream = make_stream(pool, "dynamic", args.batch_size, seed=0)

    # 3. the adapter (SyncFusedDABN layers on the default group)
    adapter = make_adapter(copy.deepcopy(model).to(device), args, distributed=True)
    single = make_adapter(copy.deepcopy(model), args, False) if (args.compare and rank == 0) else None

    # 4. feed each rank's slice of every batch
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct_single, agree = 0, 0
    for idx in stream.batches:
        part = np.array_split(np.asarray(idx), world)[rank]
        x, y = pool.x[part].to(device), pool.y[part].to(device)
        logits = adapter(x)
        correct += (logits.argmax(1) == y).sum()
        if single is not None:
            ls = single(pool.x[idx])
            correct_single += int((ls.argmax(1) == pool.y[idx]).sum())
            agree += single.last_decision == adapter.last_decision
    dist.all_reduce(correct)

    # 5. report (with --compare, a disagreement is exit status 1)
    status = 0
    if rank == 0:
        acc = int(correct) / stream.num_samples
        print(f"{world} processes ({'nccl' if cuda else 'gloo'}), {len(stream)} batches of "
              f"{args.batch_size}: DATTA accuracy {acc:.2%} ({adapter.n_updates} entropy steps)")
        if single is not None:
            print(f"1 process on the whole batches: DATTA accuracy "
                  f"{correct_single / stream.num_samples:.2%} ({single.n_updates} entropy steps); "
                  f"decisions agree on {agree}/{len(stream)} batches")
            status = int(agree != len(stream) or correct_single != int(correct))
    dist.barrier()
    dist.destroy_process_group()
    if status:
        raise SystemExit("the distributed run disagrees with one process")


if __name__ == "__main__":
    main()
