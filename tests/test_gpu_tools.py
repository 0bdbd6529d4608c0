"""The GPU tooling, checked on CPU (scripts/gpu_check.sh, scripts/gpu_check.py,
scripts/gpu_sweep.py, bench/bench_gpu.py): the plan fits its 8 minutes, a step that fails or
runs out of time is reported as such in summary.md and the exit status, a crash is a
failure and never a skip, and the sweep goes on after a case that raises."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "gpu_check.sh"


def _load(path: Path, name: str):
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


def _plan() -> list[tuple[str, int]]:
    out = subprocess.run(["bash", str(CHECK), "--plan"], capture_output=True, text=True, check=True).stdout
    return [(m[1], int(m[2])) for m in re.finditer(r"^(\S+)\s+(\d+) s ", out, flags=re.M)]


def test_plan_fits_eight_minutes():
    plan = _plan()
    names = [n for n, _ in plan]
    assert sum(b for _, b in plan) <= 480, plan
    # in order of value: build first, then correctness on the device, sanitizers, benchmarks last
    assert names[:3] == ["env", "build", "rows"] and names[-1] == "bench"
    assert names.index("repro") < names.index("sweep-cuda") < names.index("memcheck-cuda")
    text = CHECK.read_text()
    for name in names:  # every planned step has its function
        assert f"step_{name.replace('-', '_')}()" in text, name


def _run_check(tmp_path: Path, *steps: str, fake_bin: dict[str, str] | None = None):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    if fake_bin:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        for name, body in fake_bin.items():
            (bindir / name).write_text("#!/bin/sh\n" + body + "\n")
            (bindir / name).chmod(0o755)
        env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(CHECK), *steps], capture_output=True, text=True, env=env, timeout=120)
    return proc, (tmp_path / "out" / "summary.md").read_text()


def test_failed_step_is_reported_and_exits_nonzero(tmp_path):
    proc, summary = _run_check(tmp_path, "env", fake_bin={"nvidia-smi": "exit 3"})
    assert proc.returncode == 1
    budget = dict(_plan())["env"]
    assert re.search(rf"^\| env \| failed \(exit \d+\) \| \d+ \| {budget} \|$", summary, flags=re.M), summary
    assert (tmp_path / "out" / "env.log").is_file()


def test_step_over_budget_is_timed_out(tmp_path):
    proc, summary = _run_check(tmp_path, "env", fake_bin={"nvidia-smi": "sleep 30"})
    assert proc.returncode == 1
    assert "| env | timed out |" in summary, summary


def test_steps_run_through_timeout_as_exported_functions(tmp_path):
    """Every step's function reaches its commands under `timeout` (PYTHON=/bin/echo stands in
    for the interpreter: the Python steps then pass without a GPU, the others fail for want
    of nvidia-smi / compute-sanitizer, each reported on its own line)."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON="/bin/echo")
    names = [n for n, _ in _plan()]
    proc = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, env=env, timeout=120)
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = dict(re.findall(r"^\| (\S+) \| ([^|]+?) \|", summary, flags=re.M)[1:])
    assert list(rows) == names
    python_steps = [n for n in names if n not in ("env", "edge-tests") and "check-" not in n]
    for name in python_steps:
        assert rows[name] == "passed", (name, rows[name], (tmp_path / "out" / f"{name}.log").read_text())
    assert "-m pip install --no-build-isolation" in (tmp_path / "out" / "build.log").read_text()
    assert proc.returncode == (0 if all(v == "passed" for v in rows.values()) else 1)


def test_gpu_check_cases_report_crashes_as_failures(capsys):
    gc = _load(ROOT / "scripts" / "gpu_check.py", "gpu_check_under_test")
    rep = gc.Report()
    gc.DEVICE = "cpu"

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access")

    def not_here():
        raise gc.Skip("needs two GPUs")
    rep.case("crashes", crash)
    rep.case("does not apply", not_here)
    rep.case("fine", lambda: None)
    out = capsys.readouterr().out
    assert "FAIL crashes" in out and "illegal memory access" in out
    assert "SKIP does not apply" in out and "PASS fine" in out
    assert rep.exit_code() == 1
    only_skips = gc.Report()
    only_skips.case("does not apply", not_here)
    assert only_skips.exit_code() == 1  # nothing checked is not a pass


def test_sweep_goes_on_after_a_crashing_case(monkeypatch):
    sweep = _load(ROOT / "scripts" / "gpu_sweep.py", "gpu_sweep_under_test")
    calls = []

    def one_case(backend, device, shape, dtype, layout, offset, failures, seed):
        calls.append(shape)
        if shape == sweep.SHAPES_SMALL[0]:
            raise RuntimeError("boom")
        return 1
    monkeypatch.setattr(sweep, "one_case", one_case)
    failures = sweep.sweep("cpu", "cpu", sweep.SHAPES_SMALL[:2])
    assert set(calls) == set(sweep.SHAPES_SMALL[:2])  # the second shape still ran
    assert failures and all(f.startswith("CRASH cpu (1, 1, 1, 2)") for f in failures)


def test_bench_gpu_crash_is_a_failure_not_a_skip(tmp_path, monkeypatch, capsys):
    bench = _load(ROOT / "bench" / "bench_gpu.py", "bench_gpu_under_test")
    real = bench.make_case

    def make_case(inp, impl, mode):
        if impl == "cpu" and mode == "fwd":
            def run():
                raise RuntimeError("kernel crashed")
            return run
        return real(inp, impl, mode)
    monkeypatch.setattr(bench, "make_case", make_case)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--out", str(tmp_path / "smoke")])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "skipped" not in out
    md = (tmp_path / "smoke.md").read_text()
    assert "FAILED" in md and "kernel crashed" in md
