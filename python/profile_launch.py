"""Profile one DABN forward + backward launch with ``torch.profiler``.

    python python/profile_launch.py --shape 32 64 28 28 --backend cpu

Prints the profiler's table (self time per op, including the fused kernel ops
``datta::_dabn_forward`` / ``datta::_dabn_backward`` and the Python custom-op layer above
them), so you can see how much of a call is kernel and how much is dispatch.  On a CUDA
machine pass ``--device cuda`` to see kernel launches too.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import datta_kernels as dk
from datta_kernels.testing import make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=(32, 64, 28, 28))
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()

    inp = make_inputs(tuple(args.shape), torch.float32, args.device, args.layout)
    blend = torch.tensor(dk.PRESETS["datta"].multiple, device=args.device)
    x = inp.x.requires_grad_()
    w = inp.weight.requires_grad_()

    def step():
        y = dk.dabn(x, w, inp.bias, inp.source_mean, inp.source_var, blend, shrink_k=4.0,
                    backend=args.backend)
        y.sum().backward()

    step()  # warm-up: first-call costs (Triton autotune, allocator) stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
