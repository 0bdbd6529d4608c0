"""``datta_kernels.benchmarking``: the timers, the GB/s helper and the result-file writer."""
from __future__ import annotations

import subprocess

import pytest
import torch

from datta_kernels import benchmarking as bm


def test_cpu_timer_interleaves_and_returns_positive_medians():
    order = []
    runs = {"a": lambda: order.append("a"), "b": lambda: order.append("b") or sum(range(1000))}
    t = bm.cpu_time_interleaved(runs, reps={"a": 3, "b": 2}, warmup=1)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    # warm-up a, b; then per pass an untimed + a timed call of each contestant in turn
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2 + ["a", "a"]


def test_cpu_timer_min_seconds_and_no_warm_call():
    calls = []
    t = bm.cpu_time_interleaved({"x": lambda: calls.append(1)}, reps=1, warmup=0,
                                min_seconds=1e-4, warm_each=False)
    assert t["x"] > 0 and len(calls) >= 1


def test_time_contestants_cpu():
    t = bm.time_contestants({"mm": lambda: torch.ones(8, 8) @ torch.ones(8, 8)}, "cpu", reps=3)
    assert t["mm"] > 0


def test_gbps():
    assert bm.gbps(3e9, 1.5) == 2.0
    assert bm.gbps(1e6, 1e-3) == 1.0


def test_markdown_table():
    assert bm.markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == [
        "| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]


def test_write_markdown(tmp_path):
    machine = bm.describe_machine()
    path = tmp_path / "r.md"
    text = bm.write_markdown(str(path), "Title", machine, ["a note"],
                             ["## sub", (["k", "v"], [["n", 1]])])
    assert path.read_text() == text
    lines = text.splitlines()
    assert lines[0] == "# Title"
    assert any(line.startswith("- CPU: ") and "torch threads" in line for line in lines)
    # provenance (scripts/check_figures.py requires command, commit and machine in every result)
    assert lines[2].startswith("- command: `python ") and "; commit: " in lines[2] and "machine" in lines[2]
    assert any(f"torch {torch.__version__}" in line and "THP_MEM_ALLOC_ENABLE=" in line
               for line in lines)
    assert "- a note" in lines and "## sub" in lines
    assert lines[-3:] == ["| k | v |", "|---|---|", "| n | 1 |"]
    assert bm.write_markdown("", "T", None) == "# T\n\n"


def test_header_names_the_gpu():
    lines = bm.header_lines({"gpu": "H200", "cuda": "12.8", "driver": "570", "triton": "3.4"})
    assert lines[0] == "- GPU: H200, CUDA 12.8, driver 570, triton 3.4"


def test_table_main_saves_or_prints(tmp_path, capfd):
    """bench/'s command-line tail: ``--table`` writes ``<results>/<device>_<name>.json/.md`` (or
    the ``--out`` stem) and prints the markdown; without it only the markdown is printed (to
    /dev/stdout, hence capfd)."""
    import json

    seen = []

    def table(reps, device):
        seen.append((reps, device))
        return bm.contestant_results([{"shape": [2, 3, 4, 4], "ms": {"a": 1.0}}], reps, device)

    def write(res, path):
        bm.write_markdown(path, "T", None, [], [(["shape", "ms"], [[bm.shape_id(r["shape"]), r["ms"]["a"]]
                                                                   for r in res["rows"]])])

    res = bm.table_main("d", "thing", table, write, reps=7, results_dir=str(tmp_path), argv=["--table"])
    assert seen == [(7, "cpu")] and res["reps"] == 7 and res["device"] == "cpu" and "cpu" in res["machine"]
    assert json.loads((tmp_path / "cpu_thing.json").read_text()) == res
    md = (tmp_path / "cpu_thing.md").read_text()
    assert "| 2x3x4x4 | 1.0 |" in md and md in capfd.readouterr().out
    bm.table_main("d", "thing", table, write, reps=7, results_dir=str(tmp_path),
                  argv=["--reps", "2", "--out", str(tmp_path / "o" / "x")])
    assert seen[-1] == (2, "cpu") and not (tmp_path / "o").exists()
    assert "| 2x3x4x4 | 1.0 |" in capfd.readouterr().out
    bm.table_main("d", "thing", table, write, reps=7, results_dir=str(tmp_path),
                  argv=["--table", "--out", str(tmp_path / "o" / "x")])
    assert (tmp_path / "o" / "x.json").is_file() and (tmp_path / "o" / "x.md").is_file()


def test_run_worker_sets_and_removes_variables_in_a_fresh_interpreter(tmp_path, monkeypatch):
    script = tmp_path / "w.py"
    script.write_text("import json, os, sys\n"
                      "assert sys.argv[1] == '--worker'\n"
                      "json.dump({'a': os.environ.get('DK_A'), 'b': os.environ.get('DK_B'),"
                      " 'args': sys.argv[3:]}, open(sys.argv[2], 'w'))\n")
    monkeypatch.setenv("DK_B", "inherited")
    got = bm.run_worker(str(script), ["x", "1"], {"DK_A": "set"})
    assert got == {"a": "set", "b": "inherited", "args": ["x", "1"]}
    assert bm.run_worker(str(script), env={"DK_B": None}) == {"a": None, "b": None, "args": []}
    script.write_text("import sys; sys.exit(3)\n")
    with pytest.raises(subprocess.CalledProcessError):
        bm.run_worker(str(script))
