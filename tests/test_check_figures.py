"""scripts/check_figures.py: every measured figure of the README and docs is traced to the
results file its block names (the rule is the script's docstring).  Each test writes a tiny
README and results folder under tmp_path and runs the checker's functions on it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cf():
    spec = importlib.util.spec_from_file_location("check_figures", ROOT / "scripts" / "check_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_figures"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules["check_figures"]


PROVENANCE = "- command: `python bench/x.py`\n- commit: abc1234\n- machine: a 2-core VM\n"


def tree(tmp_path: Path, readme: str, results: dict[str, str] | None = None) -> Path:
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(readme)
    for name, text in (results or {"x.md": "# X\n\n" + PROVENANCE + "\n| a | 1.13x | 34.14 |\n"}).items():
        (tmp_path / "bench" / "results" / name).write_text(text)
    return tmp_path


def check(cf, root):
    return cf.check(root, allowed=(), pending=())


def test_good_block_passes(cf, tmp_path):
    root = tree(tmp_path, "# T\n\nThe kernel is 1.13× faster: 34.14 ms (`bench/results/x.md`).\n")
    report = check(cf, root)
    assert report.errors == []
    assert [t.split(": ", 1)[1] for t in report.traced] == [
        "1.13× <- bench/results/x.md", "34.14 ms <- bench/results/x.md"]


def test_figure_missing_from_its_file_fails(cf, tmp_path):
    # 34 is a rounding of the file's 34.14: not the same number
    root = tree(tmp_path, "# T\n\nIt takes 34 ms and 2.5 ms (`bench/results/x.md`).\n")
    report = check(cf, root)
    assert len(report.errors) == 2
    assert all("is in none of bench/results/x.md" in e for e in report.errors)
    assert "'34 ms'" in report.errors[0] and "'2.5 ms'" in report.errors[1]
    assert cf.main(["--root", str(root)]) == 1


def test_figure_without_a_named_file_fails(cf, tmp_path):
    root = tree(tmp_path, "# T\n\nThe step costs 1.97× the forward, 87.1% accurate.\n")
    report = check(cf, root)
    assert len(report.errors) == 2
    assert all("names no results file" in e for e in report.errors)


def test_table_takes_its_file_from_its_caption(cf, tmp_path):
    readme = ("# T\n\nMeasured (`bench/results/x.md`):\n\n| k | v |\n|---|---|\n| a | 34.14 ms |\n\n"
              "Another paragraph, no file:\n\n| k | v |\n|---|---|\n| b | 34.14 ms |\n")
    report = check(cf, tree(tmp_path, readme))
    assert len(report.errors) == 1 and "README.md:11" in report.errors[0]  # the second table


def test_a_named_file_that_does_not_exist_fails(cf, tmp_path):
    root = tree(tmp_path, "# T\n\n1.13× (`bench/results/gone.md`).\n")
    assert any("gone.md, which does not exist" in e for e in check(cf, root).errors)


@pytest.mark.parametrize("text,expect", [
    ("on 64×64×56×56 and 8x16x14x14, 2 × 1 000 images", []),          # shapes, products
    ("torch 2.13.0, Python 3.11, torch >= 2.4", []),                   # versions
    ("blend (0.6, 0.4, 0) and (0, 0.8, 0.2)", []),                     # blend weights
    ("lr 1e-4, SPEC §2.1, sm_90, ResNet-50, commit 34c89bd", []),       # glued, scientific
    ("goal ≤ 1.05 and < 1 % growth", []),                               # bounds and goals
    ("13 corruptions, bs 16, 4 KiB pages", []),                        # counts, facts
    ("`1.5 ms` in code", []),                                           # inline code
    ("1.13x and ×0.58 and **2.10×**", ["1.13x", "0.58", "2.10×"]),     # ratios
    ("0.95–1.55× and 1.7-1.9 s", ["0.95", "1.55×", "1.7", "1.9 s"]),   # ranges
    ("188 067 images/s, 524.1 MiB, 3 passed", ["188 067 images/s", "524.1 MiB", "3 passed"]),
    ("52.7 vs 50.0, load 1.2", ["52.7", "50.0", "1.2"]),               # other decimals
])
def test_what_counts_as_a_figure(cf, text, expect):
    assert [f.text for f in cf.find_figures(text)] == expect


def test_thousands_separators_and_units_are_formatting(cf, tmp_path):
    results = {"l.md": "# L\n\n" + PROVENANCE + "| loader | 188,067 | 13,304 |\n"}
    root = tree(tmp_path, "# T\n\n**188 067 images/s** (`bench/results/l.md`).\n", results)
    assert check(cf, root).errors == []


def test_code_and_not_measured_blocks_are_skipped(cf, tmp_path):
    readme = ("# T\n\n```bash\nrun --lr 0.5 --ms 3.5\n```\n\n"
              "<!-- not-measured: published numbers -->\nFrom the literature (not ours):\n\n"
              "| a | 43.5 % |\n|---|---|\n")
    assert check(cf, tree(tmp_path, readme)).errors == []


def test_untagged_fence_holds_results_and_is_checked(cf, tmp_path):
    readme = "# T\n\nOutput (`bench/results/x.md`):\n\n```\nacc 34.14 12.5\n```\n"
    errors = check(cf, tree(tmp_path, readme)).errors
    assert len(errors) == 1 and "'12.5'" in errors[0]


def test_a_folder_of_raw_logs_needs_a_results_file_naming_it(cf, tmp_path):
    root = tree(tmp_path, "# T\n", {"y.md": "# Y\ncommand, commit, machine\n"})
    (root / "bench" / "results" / "logs_run").mkdir()
    assert check(cf, root).errors == [
        "bench/results/logs_run: not named by any bench/results/*.md (its provenance)"]
    (root / "bench" / "results" / "y.md").write_text("# Y\ncommand, commit, machine; logs in "
                                                     "bench/results/logs_run/\n")
    assert check(cf, root).errors == []


def test_results_files_state_their_provenance(cf, tmp_path):
    results = {"x.md": "# X\n\n| 1.13 |\n", "x.json": "{}", "y.md": "# Y\ncommand, commit, machine\n"}
    errors = check(cf, tree(tmp_path, "# T\n", results)).errors
    assert sorted(errors) == sorted([
        "bench/results/x.md: no provenance line naming the command",
        "bench/results/x.md: no provenance line naming the commit",
        "bench/results/x.md: no provenance line naming the machine",
        "bench/results/x.json: not named by any bench/results/*.md (its provenance)"])


def test_pending_entries_are_reported_and_must_stay_needed(cf, tmp_path):
    root = tree(tmp_path, "# T\n\nAUROC 92 % (`bench/results/x.md`).\n")
    why = "being re-run"
    report = cf.check(root, allowed=(), pending=(("README.md", "92 %", why),))
    assert report.errors == [] and len(report.pending) == 1 and why in report.pending[0]
    stale = cf.check(root, allowed=(), pending=(("README.md", "92 %", why), ("README.md", "7 %", why)))
    assert stale.errors == ["PENDING entry no longer needed, remove it: ('README.md', '7 %')"]


def test_allowed_entries_exempt_a_setting_and_must_match(cf, tmp_path):
    root = tree(tmp_path, "# T\n\nA budget of at most 8 minutes.\n")
    assert len(check(cf, root).errors) == 1
    ok = cf.check(root, allowed=(("README.md", r"at most 8 minutes", "a budget"),), pending=())
    assert ok.errors == []
    stale = cf.check(root, allowed=(("README.md", r"at most 8 minutes", "a budget"),
                                    ("README.md", r"fits 9 minutes", "gone")), pending=())
    assert len(stale.errors) == 1 and "ALLOWED entry matches nothing" in stale.errors[0]
