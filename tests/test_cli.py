"""``datta-kernels info / bench / demo`` end to end, on tiny settings and synthetic idx data."""
from __future__ import annotations

import json

import pytest

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
    # Second run reuses the cached model.
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["model"]["source"] == "cache"


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
    assert main(["demo", "--data-dir", str(data), "--methods", "magic"] + TINY) == 2
    assert "unknown method" in capsys.readouterr().err


def test_quick_preset_parses():
    args = build_parser().parse_args(["demo", "--quick", "--subset", "50"])
    assert args.quick and args.per_domain == 50


def test_no_command_is_an_error():
    with pytest.raises(SystemExit):
        main([])
