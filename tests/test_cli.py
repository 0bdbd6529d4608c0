"""``datta-kernels info / bench / demo`` end to end, on tiny settings and synthetic idx data."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from datta_kernels import available_backends
from datta_kernels.cli import build_parser, main
from datta_kernels.eval.datasets import write_synthetic

TINY = ["--per-domain", "16", "--corruptions", "gaussian_noise,contrast", "--batch-sizes", "8",
        "--train-subset", "64", "--epochs", "1", "--width", "4", "--check-batches", "2", "--no-progress"]


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "datta_kernels" in out and "reference" in out and "<- auto" in out
    for name in available_backends():
        assert name in out.split("available:")[-1]


def test_bench_one_shape(capsys):
    assert main(["bench", "--device", "cpu", "--shapes", "1", "--min-seconds", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "eager reference" in out and "dabn[reference]" in out


def test_demo_tiny(tmp_path, capsys):
    data = write_synthetic(tmp_path / "data", n_train=96, n_test=32)
    out = tmp_path / "out"
    args = ["demo", "--data-dir", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--streams", "single,dynamic", "--methods", "source,tbn,datta"] + TINY
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Top-1 accuracy" in text and "wrote" in text
    doc = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["stream"]) for r in doc["results"]} == {
        (m, s) for m in ("source", "tbn", "datta") for s in ("single", "dynamic")}
    assert doc["meta"]["command"].startswith("datta-kernels demo")
    assert (out / "results.csv").is_file() and (out / "datta_demo.png").is_file()
    # Portable numerics by default, recorded and named; this process ran kernels long before,
    # so the run says they were not in effect (the model itself came from a portable child).
    numerics = doc["meta"]["numerics"]
    assert numerics["mode"] == doc["meta"]["config"]["numerics"] == doc["model"]["config"]["numerics"] \
        == "portable"
    assert numerics["portable"] is False and "ran in this process" in numerics["why"] or \
        numerics["portable"] and numerics["cpu_capability"] == "AVX2"
    assert "; numerics " in text
    # Second run reuses the cached model.
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["model"]["source"] == "cache"
    # --numerics native: its own model copy (another cache key), in this process.
    assert main(args + ["--numerics", "native"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["source"] == "trained" and doc["model"]["config"]["numerics"] == "native"
    assert doc["meta"]["numerics"]["mode"] == "native" and "numerics native (" in capsys.readouterr().out


def test_demo_without_data(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")] + TINY) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_demo_without_its_extras(tmp_path, capsys, monkeypatch):
    """Installed without the [demo] extra: a clear message, not a traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "o")] + TINY) == 2
    assert "pip install 'datta_kernels[demo]'" in capsys.readouterr().err


def test_demo_rejects_unknown_names(tmp_path, capsys):
    data = write_synthetic(tmp_path / "data", n_train=8, n_test=8)
    code, err = _fails(capsys, ["demo", "--data-dir", str(data), "--methods", "magic"] + TINY)
    assert "unknown method(s) magic" in err and "datta_icme" in err


# --- every mistake: one line, non-zero exit, before any data is loaded or model trained ------

@pytest.fixture
def no_run(monkeypatch):
    """Make any attempt to load data / train / adapt fail the test."""
    import datta_kernels.eval.runner as runner

    def boom(*a, **k):
        raise AssertionError("run_demo was reached: the mistake was not caught up front")
    monkeypatch.setattr(runner, "run_demo", boom)


def _fails(capsys, argv):
    """Run the CLI in-process on a mistake: (exit status, stderr), asserting status != 0, one
    line on stderr and nothing on stdout (argparse mistakes exit via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code not in (0, None), (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and not out.strip(), (out, err)
    return code, lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--batch-sizes", "0"], "--batch-sizes: must be >= 1, got 0"),
    (["demo", "--batch-sizes", "16,-4"], "got -4"),
    (["demo", "--batch-sizes", ","], "--batch-sizes: needs at least one value"),
    (["demo", "--backend", "nosuch"], "'nosuch'"),
    (["demo", "--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
    (["demo", "--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["demo", "--epochs", "-1"], "--epochs: must be >= 1, got -1"),
    (["demo", "--epochs", "two"], "'two' is not an integer"),
    (["demo", "--per-domain", "1"], "--per-domain/--subset: must be >= 2, got 1"),
    (["demo", "--width", "0"], "--width: must be >= 1, got 0"),
    (["demo", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["demo", "--seed", str(2**70)], "--seed: must be < 2**32"),
    (["demo", "--check-batches", "-1"], "--check-batches: must be >= 0, got -1"),
    (["demo", "--streams", "single,sideways"], "unknown stream(s) sideways"),
    (["demo", "--corruptions", "rain"], "unknown corruption(s) rain"),
    (["bench", "--shapes", "0"], "--shapes: must be >= 1, got 0"),
    (["bench", "--shapes", "-1"], "--shapes: must be >= 1, got -1"),
    (["bench", "--min-seconds", "0"], "--min-seconds: must be a finite number > 0"),
])
def test_bad_values_are_rejected_while_parsing(capsys, no_run, argv, needle):
    code, line = _fails(capsys, argv)
    assert code == 2 and needle in line, line
    assert line.startswith("datta-kernels ") and "error:" in line


def _demo_args(tmp_path, *extra):
    data = write_synthetic(tmp_path / "data", n_train=16, n_test=16)
    return ["demo", "--data-dir", str(data), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")] + TINY + list(extra)


def test_backend_that_cannot_run_here(tmp_path, capsys, no_run, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DATTA_BACKEND", raising=False)
    code, line = _fails(capsys, _demo_args(tmp_path, "--backend", "triton"))
    assert line.startswith("error: --backend triton:") and "TRITON_INTERPRET=1" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_backend_cuda_without_a_gpu(tmp_path, capsys, no_run):
    code, line = _fails(capsys, _demo_args(tmp_path, "--backend", "cuda"))
    assert line.startswith("error: --backend cuda:") and "cannot run on cpu" in line


def test_score_layer_checked_against_the_architecture(tmp_path, capsys, no_run):
    code, line = _fails(capsys, _demo_args(tmp_path, "--score-layer", "nosuch"))
    assert "--score-layer 'nosuch'" in line and "bn1, layers.0.bn1" in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_score_layer_that_exists_passes(tmp_path, capsys, monkeypatch):
    from datta_kernels.cli import _demo_config, check_demo

    args = build_parser().parse_args(_demo_args(tmp_path, "--score-layer", "layers.1.bn2"))
    assert check_demo(_demo_config(args), args.out) is None


def test_unwritable_out_is_rejected_before_the_run(tmp_path, capsys, no_run):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = _demo_args(tmp_path)
    argv[argv.index("--out") + 1] = str(blocker / "sub")
    code, line = _fails(capsys, argv)
    assert line.startswith("error: --out") and str(blocker / "sub") in line


def test_truncated_data_file_is_named(tmp_path, capsys, no_run):
    argv = _demo_args(tmp_path)
    bad = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-200])
    code, line = _fails(capsys, argv)
    assert str(bad) in line and "truncated" in line


def test_truncated_plain_data_file_is_named(tmp_path):
    from datta_kernels.eval.datasets import DataFormatError, read_idx

    root = write_synthetic(tmp_path / "d", n_train=4, n_test=4, gz=False)
    bad = root / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte.*truncated"):
        read_idx(bad)


def test_help_lists_the_valid_names(capsys):
    from datta_kernels.backends import backend_names
    from datta_kernels.eval.corruptions import CORRUPTIONS
    from datta_kernels.eval.runner import METHODS
    from datta_kernels.eval.streams import STREAMS

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    for name in (*METHODS, *STREAMS, *CORRUPTIONS, *backend_names()):
        assert name in text, name


def test_mistake_in_a_fresh_process_is_one_line():
    """What a user sees: one line on stderr, exit status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "datta_kernels.cli", "demo", "--backend", "nosuch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "nosuch" in proc.stderr, proc.stderr


def test_quick_preset_parses():
    args = build_parser().parse_args(["demo", "--quick", "--subset", "50"])
    assert args.quick and args.per_domain == 50


def test_validation_per_domain_flag_and_its_bound():
    from datta_kernels.cli import _demo_config
    cfg = _demo_config(build_parser().parse_args(["demo", "--quick", "--validation-per-domain", "64"]))
    assert cfg.validation_per_domain == 64
    cfg.validate()
    args = ["demo", "--validation-per-domain", "32", "--batch-sizes", "16,64"]
    cfg = _demo_config(build_parser().parse_args(args))
    with pytest.raises(ValueError, match="at least the largest batch size"):
        cfg.validate()


def test_validation_severities_flag_and_its_checks():
    from datta_kernels.cli import _demo_config
    from datta_kernels.eval.runner import DemoConfig
    assert DemoConfig().validation_severities == (1, 2, 3, 4, 5)
    cfg = _demo_config(build_parser().parse_args(["demo", "--severity", "5", "--validation-severities", "5"]))
    assert cfg.validation_severities == (5,) and cfg.severity == 5
    cfg.validate()
    for bad in ("0", "6", "3,3", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--validation-severities", bad])
    for bad in ((), (2, 2), (0,), (6,)):
        with pytest.raises(ValueError, match="validation_severities"):
            DemoConfig(validation_severities=bad).validate()


@pytest.mark.parametrize("flag,field,value,default,bad", [
    ("--daft-objective", "daft_objective", "margin", "mean", "median"),        # how DAFT is ranked
    ("--validation-mixing", "validation_mixing", "severity", "all", "corruption"),
])
def test_calibration_choice_flags(flag, field, value, default, bad):
    """``--daft-objective`` / ``--validation-mixing``: a valid value reaches the demo's
    configuration (which validates), the default when absent, argparse refuses a bad one."""
    from datta_kernels.cli import _demo_config
    cfg = _demo_config(build_parser().parse_args(["demo", flag, value]))
    assert getattr(cfg, field) == value
    cfg.validate()
    assert getattr(_demo_config(build_parser().parse_args(["demo"])), field) == default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", flag, bad])


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])


def test_cli_startup_does_not_import_dynamo():
    """``datta-kernels`` answers quickly: importing the package must not pull in torch._dynamo
    (~1.5 s of CPU), which ``@torch.compiler.assume_constant_result`` on
    ``backends.resolve`` used to do; the marker it sets is set directly instead."""
    code = ("import sys, datta_kernels.cli as c; c.build_parser(); "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc


def test_resolve_carries_the_constant_result_marker():
    from datta_kernels import backends

    marked = torch.compiler.assume_constant_result(lambda: None)
    names = [k for k in vars(marked) if k.startswith("_dynamo")]
    assert names and all(getattr(backends.resolve, k) == getattr(marked, k) for k in names)


def test_validation_corruptions_flag(capsys, no_run):
    """``--validation-corruptions``: the set that calibrates; the test corruptions default to the
    rest; naming one of them as a test corruption needs --report-validation; a bad set is one
    line before anything runs."""
    from datta_kernels.cli import _demo_config
    from datta_kernels.eval.validation import TEST
    assert _demo_config(build_parser().parse_args(["demo"])).test_corruptions == TEST
    cfg = _demo_config(build_parser().parse_args(["demo", "--validation-corruptions", "fog,contrast"]))
    assert cfg.validation_corruptions == ("fog", "contrast")
    assert "fog" not in cfg.test_corruptions and "speckle_noise" in cfg.test_corruptions
    cfg.validate()
    _, err = _fails(capsys, ["demo", "--validation-corruptions", "fog", "--corruptions", "fog,contrast"])
    assert "['fog'] are validation corruptions" in err and "--report-validation" in err
    _, err = _fails(capsys, ["demo", "--validation-corruptions", "fog,nosuch"])
    assert "nosuch" in err
    _, err = _fails(capsys, ["demo", "--validation-corruptions", "fog,fog"])
    assert "each once" in err
