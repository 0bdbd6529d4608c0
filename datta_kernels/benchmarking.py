"""The one timing harness of bench/ and ``datta-kernels bench``.

* :func:`gpu_time` — seconds per call on a GPU: ``triton.testing.do_bench`` (median, L2 flushed
  between calls); CUDA events only where triton is missing.
* :func:`cpu_time_interleaved` — seconds per call on the CPU, the contestants taking turns
  (round-robin over passes) so load changes on a shared machine hit all of them alike; median.
* :func:`gbps` — bandwidth from bytes and seconds.
* :func:`describe_machine` / :func:`describe_gpu` and :func:`markdown_table` /
  :func:`write_markdown` — the header (command, commit, versions, device, threads) and tables of
  every result file (``scripts/check_figures.py`` requires the command, commit and machine).
* :func:`run_worker` — run a bench/ script's ``--worker`` half in a fresh interpreter under
  other environment variables (settings read once at start-up, such as PyTorch's
  ``THP_MEM_ALLOC_ENABLE`` or glibc's ``GLIBC_TUNABLES``) and read back its JSON.
* :func:`save_results`, :func:`contestant_results`, :func:`table_main` — the tail of a bench/
  script that times contestants per shape: its result document, its command line
  (``--table --reps --device --out``) and its ``.json`` + ``.md`` result files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable, Sequence

import torch

__all__ = ["gpu_time", "cpu_time_interleaved", "time_contestants", "gbps", "describe_machine",
           "describe_gpu", "provenance", "header_lines", "markdown_table", "write_markdown", "shape_id",
           "contestant_results", "run_worker", "save_results", "table_main"]


def gpu_time(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median seconds of one ``fn()`` on the current CUDA device."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device="cuda")  # 256 MiB > any L2
    fn()
    torch.cuda.synchronize()
    times, spent = [], 0.0
    while len(times) < 5 or spent < rep_ms:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    return statistics.median(times) * 1e-3


def cpu_time_interleaved(runs: dict[str, Callable[[], object]], reps: int | dict[str, int] = 9,
                         warmup: int = 2, min_seconds: float = 0.0,
                         warm_each: bool = True) -> dict[str, float]:
    """Median wall seconds of one call per contestant (``runs``: name -> callable).

    The contestants take turns, one timed call each per pass, so load changes hit all of them
    alike.  With ``warm_each`` each timed call follows an untimed call of the same contestant:
    every one is measured with its own data warm in cache, as when it runs alone.  ``reps`` is the number
    of passes (one count, or one per contestant); passes continue until ``min_seconds`` of
    timed calls have been spent as well.
    """
    reps = reps if isinstance(reps, dict) else dict.fromkeys(runs, reps)
    for run in runs.values():
        for _ in range(warmup):
            run()
    timers = {k: timeit.Timer(run) for k, run in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    spent, i = 0.0, 0
    while i < max(reps.values()) or spent < min_seconds:
        for k, run in runs.items():
            if i < reps[k] or spent < min_seconds:
                if warm_each:
                    run()
                times[k].append(timers[k].timeit(number=1))
                spent += times[k][-1]
        i += 1
    return {k: statistics.median(v) for k, v in times.items()}


def time_contestants(runs: dict[str, Callable[[], object]], device: str, reps: int = 9,
                     min_seconds: float = 0.0, warm_each: bool = True) -> dict[str, float]:
    """Seconds per call of each contestant: :func:`gpu_time` on CUDA, else
    :func:`cpu_time_interleaved`."""
    if device == "cuda":
        rep_ms = max(100.0, 1e3 * min_seconds)
        return {k: gpu_time(fn, rep_ms=rep_ms) for k, fn in runs.items()}
    return cpu_time_interleaved(runs, reps, min_seconds=min_seconds, warm_each=warm_each)


def gbps(nbytes: float, seconds: float) -> float:
    """Gigabytes (1e9) per second."""
    return nbytes / seconds / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance() -> dict[str, str]:
    """The command line of this process and the git commit of the source tree it runs from
    (``+ uncommitted changes`` when tracked files differ from it; ``unknown`` outside a git
    checkout, e.g. an installed wheel)."""
    command = shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "unknown"
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", src]
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        commit = sha + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    return {"command": command, "commit": commit or "unknown"}


def describe_machine() -> dict[str, object]:
    """The command and commit (:func:`provenance`), CPU, cores, threads, load, versions, the
    CPU allocator's huge-page switch and how datta_kernels._C was built."""
    from . import _ext
    return {
        **provenance(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "datta_build": _ext.build_info(),
        "python": platform.python_version(),
    }


def describe_gpu() -> dict[str, object]:
    """GPU name, CUDA runtime, triton and driver versions (call only with a CUDA device)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        driver = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
            "triton": triton_version, "driver": driver}


def header_lines(machine: dict) -> list[str]:
    """Markdown bullets naming the device, threads and versions of ``machine``
    (:func:`describe_machine`, optionally merged with :func:`describe_gpu`)."""
    m = machine
    lines = []
    if m.get("command") or m.get("commit"):
        lines.append(f"- command: `{m.get('command', 'unknown')}`; commit: {m.get('commit', 'unknown')}; "
                     "machine: the lines below")
    if m.get("gpu"):
        lines.append(f"- GPU: {m['gpu']}, CUDA {m.get('cuda')}, driver {m.get('driver')}, "
                     f"triton {m.get('triton')}")
    lines.append(f"- CPU: {m.get('cpu')}, {m.get('cores')} cores, torch threads "
                 f"{m.get('torch_threads')}, 1-min load average {m.get('loadavg_1min', 0):.2f}")
    lines.append(f"- torch {m.get('torch')} (ATen CPU capability "
                 f"{m.get('torch_cpu_capability')}), python {m.get('python')}, "
                 f"THP_MEM_ALLOC_ENABLE={m.get('thp_mem_alloc_enable', '0')}")
    lines.append(f"- datta_kernels._C: {m.get('datta_build')}")
    return lines


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_markdown(path: str, title: str, machine: dict | None, notes: Sequence[str] = (),
                   tables: Sequence[tuple[Sequence[str], Sequence[Sequence[object]]] | str] = ()
                   ) -> str:
    """Write a result file: ``# title``, the machine header, ``notes`` as bullets, then each
    table (a ``(columns, rows)`` pair, or a string for a paragraph or sub-heading between
    tables).  Returns the text."""
    lines = [f"# {title}", ""]
    if machine is not None:
        lines += header_lines(machine)
    lines += [f"- {n}" for n in notes]
    for t in tables:
        lines.append("")
        lines += [t] if isinstance(t, str) else markdown_table(*t)
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(text)
    return text


def shape_id(shape: Sequence[int]) -> str:
    """``64x16x28x28``: a shape as pytest ids and table rows name it."""
    return "x".join(map(str, shape))


def contestant_results(rows: list, reps: int, device: str) -> dict:
    """A bench/ table's result document: the machine (and the GPU on CUDA), reps, device, rows."""
    machine = {**describe_machine(), **(describe_gpu() if device == "cuda" else {})}
    return {"machine": machine, "reps": reps, "device": device, "rows": rows}


def save_results(res: dict, stem: str, write_markdown: Callable[[dict, str], object]) -> None:
    """Write ``stem.json`` (the raw result) and ``stem.md`` (``write_markdown(res, path)``),
    then print the markdown."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, stem + ".md")
    with open(stem + ".md") as f:
        print(f.read())


def table_main(description: str, name: str, table: Callable[[int, str], dict],
               write_markdown: Callable[[dict, str], object], reps: int, results_dir: str,
               argv: Sequence[str] | None = None) -> dict:
    """The command line of a bench/ script: ``table(reps, device)`` timed, then with
    ``--table`` saved to ``<results_dir>/<device>_<name>.json`` / ``.md`` (``--out`` another
    stem), else its markdown printed.  Returns the result document."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--table", action="store_true", help=f"write bench/results/cpu_{name}.*")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help=f"result stem (default bench/results/<device>_{name})")
    args = ap.parse_args(argv)
    res = table(args.reps, args.device)
    if args.table:
        save_results(res, args.out or os.path.join(results_dir, f"{args.device}_{name}"), write_markdown)
    else:
        write_markdown(res, "/dev/stdout")
    return res


def run_worker(script: str, args: Sequence[str] = (), env: dict[str, str | None] | None = None):
    """``python script --worker OUT *args`` in a fresh interpreter, with this process's
    environment updated by ``env`` (a value of None removes the variable); returns the JSON the
    worker wrote to ``OUT``.  For settings read once when the interpreter, torch or libc starts,
    each in its own process."""
    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "worker.json")
        subprocess.run([sys.executable, os.path.abspath(script), "--worker", out, *args], check=True,
                       env=full)
        with open(out) as f:
            return json.load(f)
