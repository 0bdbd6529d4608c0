"""Portable CPU numerics: the same bits from the demo whatever the CPU's vector width and cores.

PyTorch picks its CPU kernels by the instruction set it finds (ATen's vectorised kernels,
oneDNN's convolutions, MKL's GEMMs) and splits reductions by its intra-op thread count, so a
float32 training run or a test-time-adaptation stream gives different low-order bits on an
AVX2 machine and on an AVX-512 one, or at 2 threads and at 16.  Over the demo's two training
epochs and thousands of entropy steps those bits grow into different models and numbers (the
same recipe trained a copy with 87.5 % clean accuracy on an AVX2 VM and one with 87.8 % on an
AVX-512 VM: ``bench/results/demo.md``).

``portable`` numerics cap all three libraries, and this package's own CPU kernels, at AVX2
through their own switches — ``ATEN_CPU_CAPABILITY=avx2`` (ATen's dispatch),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN), ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL) and
``DATTA_CPU_CAPABILITY=avx2`` (``csrc/cpu/dispatch.cpp``) — and run 2 intra-op threads,
whatever the machine has.
With the same torch build, an AVX2 and an AVX-512 machine then compute the same bits, and what
the thread count decides is the split of the work, not the number of cores, so a 1-core or a
64-core machine gives the 2-core result.  Checked on two AMD EPYC VMs (AVX2, AVX-512).  It does
**not** hold between CPU makers: an Intel Xeon (AVX-512) trains another copy of the demo's model
on the same switches (``bench/results/numerics_copies_intel.md``): within AVX2, MKL and oneDNN
still choose their kernels and blocking by the CPU (oneDNN's brgemm convolutions size their
blocks from its caches), which no ISA cap pins.  The switches are read once, when each library first
runs a kernel: :func:`pin` must come before the process's first tensor operation, and it says
when it came too late.  ``native`` leaves everything as torch found it (fastest; numbers
specific to the machine).  CUDA work is not affected either way.
"""
from __future__ import annotations

import os

import torch

__all__ = ["MODES", "PORTABLE_ENV", "PORTABLE_THREADS", "check_mode", "describe", "pin", "portable_env"]

MODES = ("portable", "native")

#: Each library's own switch, capped at AVX2 (the widest instruction set common to the x86-64
#: machines of the last decade).  The first three are read once, at each library's first
#: kernel; ``DATTA_CPU_CAPABILITY`` on every call of this package's CPU kernels.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DATTA_CPU_CAPABILITY": "avx2"}
PORTABLE_THREADS = 2


def check_mode(mode: str, what: str = "numerics") -> str:
    """``mode`` if it is one of :data:`MODES`, else ``ValueError`` naming ``what`` (the option or
    field the caller took it from)."""
    if mode not in MODES:
        raise ValueError(f"{what} must be one of {MODES}, got {mode!r}")
    return mode


def _has_avx2() -> bool:
    probe = getattr(torch.cpu, "_is_avx2_supported", None)  # torch >= 2.1; private but stable
    return bool(probe()) if probe is not None else torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def portable_env(base: dict | None = None) -> dict:
    """``base`` (default ``os.environ``) with :data:`PORTABLE_ENV` set: the environment of a
    child process that is to run on portable numerics from its first operation."""
    return {**(os.environ if base is None else base), **PORTABLE_ENV}


def describe(mode: str | None = None) -> dict:
    """What this process computes with: ``cpu_capability`` (ATen's, as chosen on its first
    kernel), ``threads``, the three switches as set, and ``portable``: whether the process now
    runs exactly the portable numerics (AVX2 dispatch, the switches set, 2 threads)."""
    env = {k: os.environ.get(k) for k in PORTABLE_ENV}
    capability = torch.backends.cpu.get_cpu_capability()
    portable = (capability == "AVX2" and env == PORTABLE_ENV
                and torch.get_num_threads() == PORTABLE_THREADS)
    out = {"cpu_capability": capability, "threads": torch.get_num_threads(), "env": env,
           "portable": portable}
    return out if mode is None else {"mode": mode, **out}


def pin(mode: str = "portable", log=None) -> dict:
    """Put this process on ``mode``'s numerics and return :func:`describe` with ``mode`` and,
    when ``portable`` could not be had, ``why``.

    ``portable`` sets :data:`PORTABLE_ENV` (overriding other values of those variables) and 2
    intra-op threads; it holds only if no CPU kernel has run in this process yet (ATen then
    reports AVX2).  It cannot be had after that, nor on a CPU without AVX2 (or not x86-64):
    the process then keeps its numerics, and ``why`` says which (also as one line to ``log``,
    when given: a run's log).  ``native`` changes nothing.
    """
    check_mode(mode)
    if mode == "native":
        return describe(mode)
    os.environ.update(PORTABLE_ENV)
    torch.set_num_threads(PORTABLE_THREADS)
    info = describe(mode)
    if not info["portable"]:
        if not _has_avx2():
            info["why"] = f"this CPU has no AVX2 (ATen capability {info['cpu_capability']})"
        else:
            info["why"] = (f"a CPU kernel ran in this process before the switches were set "
                           f"(ATen had chosen {info['cpu_capability']})")
        if log is not None:
            log(f"numerics: portable numerics unavailable ({info['why']}); this run's CPU numbers "
                "are this machine's")
    return info
