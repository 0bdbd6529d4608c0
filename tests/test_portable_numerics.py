"""Portable numerics (``datta_kernels.eval.numerics``): the demo's model and numbers do not depend
on the CPU's vector width or the parent process's thread count.

Each case runs in fresh interpreters, since the switches only hold before a process's first
CPU kernel (this pytest process has long run some)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from datta_kernels.eval import models, numerics
from datta_kernels.eval.models import TrainConfig
from datta_kernels.eval.report import _numerics_words

HAS_AVX2 = bool(getattr(torch.cpu, "_is_avx2_supported", lambda: False)())
HAS_AVX512 = bool(getattr(torch.cpu, "_is_avx512_supported", lambda: False)())
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="portable numerics need an x86-64 CPU with AVX2")

#: a parent process: ``before`` runs first (a kernel, a pin, thread settings), then it trains a
#: tiny recipe through ``load_or_train`` and prints the weights' SHA-256 and the numerics
PARENT = textwrap.dedent("""
    import json, sys, torch
    from datta_kernels.eval.numerics import describe, pin
    from datta_kernels.eval.models import TrainConfig, load_or_train
    {before}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(600, 1, 28, 28, generator=g), torch.randint(0, 10, (600,), generator=g)
    cfg = TrainConfig(width=4, epochs=1, train_subset=512, batch_size=64, numerics=sys.argv[2])
    _, info = load_or_train(cfg, x, y, cache=sys.argv[1], progress=False)
    print(json.dumps({{"sha": info["weights_sha256"], "source": info["source"], "here": describe()}}))
""")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}


def _python(code: str, *args: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=_clean_env() if env is None else env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train(tmp_path, name: str, mode: str, before: str, env: dict | None = None) -> dict:
    return _python(PARENT.format(before=before), str(tmp_path / name), mode, env=env)


@needs_avx2
def test_pin_in_a_fresh_process_gives_avx2_and_two_threads():
    got = _python("import json; from datta_kernels.eval.numerics import pin; print(json.dumps(pin()))")
    assert got["portable"] and got["cpu_capability"] == "AVX2" and got["threads"] == 2
    assert got["env"] == numerics.PORTABLE_ENV and "why" not in got


@needs_avx2
def test_importing_the_package_and_parsing_a_command_runs_no_kernel():
    """The CLI pins after parsing: nothing before that (any module's import, the parser) may run
    a CPU kernel, or ATen has chosen its kernels already (a JPEG table built at import did)."""
    got = _python(textwrap.dedent("""
        import importlib, json, pkgutil, datta_kernels
        for m in pkgutil.walk_packages(datta_kernels.__path__, "datta_kernels."):
            importlib.import_module(m.name)
        from datta_kernels.cli import build_parser
        build_parser().parse_args(["demo", "--quick"])
        from datta_kernels.eval.numerics import pin
        print(json.dumps(pin()))
    """))
    assert got["portable"], got


@pytest.mark.skipif(not HAS_AVX512, reason="on an AVX2-only CPU the native dispatch is AVX2 already")
def test_pin_after_a_kernel_says_it_came_too_late():
    got = _python("import json, torch; torch.ones(8).sum()\n"
                  "from datta_kernels.eval.numerics import pin; print(json.dumps(pin()))")
    assert not got["portable"] and got["cpu_capability"] != "AVX2"
    assert "ran in this process before" in got["why"]


def test_pin_native_changes_nothing_and_bad_modes_are_refused():
    before = ({k: os.environ.get(k) for k in numerics.PORTABLE_ENV}, torch.get_num_threads())
    got = numerics.pin("native")
    assert got["mode"] == "native" and "why" not in got
    assert before == ({k: os.environ.get(k) for k in numerics.PORTABLE_ENV}, torch.get_num_threads())
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics.pin("fast")
    with pytest.raises(ValueError, match="TrainConfig.numerics must be one of"):
        TrainConfig(numerics="fast")
    assert TrainConfig().numerics == "portable"
    assert TrainConfig().key() != TrainConfig(numerics="native").key()


@needs_avx2
def test_portable_training_gives_the_same_weights_whatever_the_parent(tmp_path):
    """Three parents: 1 thread on ATen's unvectorised kernels; 2 threads on the native ones;
    one pinned before anything (it trains in place, the others in a portable child). The
    portable weights agree to the bit; the native ones show the check could fail here."""
    one = "torch.ones(4).sum(); torch.set_num_threads(1)"
    two = "torch.ones(4).sum(); torch.set_num_threads(2)"
    a = _train(tmp_path, "a", "portable", one, env={**_clean_env(), "ATEN_CPU_CAPABILITY": "default"})
    b = _train(tmp_path, "b", "portable", two)
    c = _train(tmp_path, "c", "portable", "assert pin()['portable']")
    assert a["source"] == b["source"] == c["source"] == "trained"
    assert not a["here"]["portable"] and c["here"]["portable"]
    assert a["sha"] == b["sha"] == c["sha"]
    na = _train(tmp_path, "na", "native", one, env={**_clean_env(), "ATEN_CPU_CAPABILITY": "default"})
    nb = _train(tmp_path, "nb", "native", two)
    assert na["sha"] != nb["sha"], "native training agrees across these parents: the check is blind here"


def test_a_failed_training_child_is_an_error(monkeypatch, tmp_path):
    def fail(cmd, **kw):
        assert cmd[1:3] == ["-m", "datta_kernels.eval.models"] and kw["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        return subprocess.CompletedProcess(cmd, 1, stdout="portable numerics unavailable: no AVX2\n")

    monkeypatch.setattr(models.subprocess, "run", fail)
    monkeypatch.setattr(models, "train", lambda *a, **k: pytest.fail("trained in the parent"))
    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    with pytest.raises(RuntimeError, match="portable numerics failed.*exit 1.*no AVX2"):
        models.load_or_train(TrainConfig(width=4, epochs=1, train_subset=32), x, y, cache=tmp_path,
                             progress=False)
    assert not list(tmp_path.glob("*.pt")), "nothing may be cached from a failed training"


def test_the_summary_says_which_numerics():
    base = {"cpu_capability": "AVX2", "threads": 2, "env": numerics.PORTABLE_ENV, "portable": True}
    assert _numerics_words(None) == ""
    assert _numerics_words({"mode": "portable", **base}) == "; numerics portable (AVX2, 2 threads)"
    late = {**base, "cpu_capability": "AVX512", "portable": False, "why": "a CPU kernel ran first"}
    assert _numerics_words({"mode": "portable", **late}) == \
        "; numerics NOT portable (AVX512, 2 threads: a CPU kernel ran first)"
    assert _numerics_words({"mode": "native", **late}) == "; numerics native (AVX512, 2 threads)"
