"""The Triton launchers' host-side decisions, without running a kernel (no GPU, no
interpreter): every kernel of ``backends/triton/kernels.py`` is replaced by a spy that records
its grid and arguments, and the backend is called on ``meta`` tensors, so shapes far beyond
this machine's memory cost nothing.  Issue 21's defects 3-7:

* the edge rules and the batch count ``N*M`` are decided on the host (an int32 ``N * M`` in a
  kernel wraps at 2^31 elements: ``no_batch`` turned true, the batch weight moved to the
  source);
* every launch runs under a device guard for x's device;
* no grid axis but the first exceeds 65,535 programs (the angles pass had N there);
* the kernels that reduce over a tile autotune no ``num_warps`` (it changes their bits);
* an older ``triton.autotune`` (no ``do_bench=``) still imports, and a Triton that fails the
  backend's import makes it unavailable with a reason instead of crashing ``info`` / ``auto``.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import datta_kernels.backends as backends  # noqa: E402
from datta_kernels.backends import triton as tb  # noqa: E402
from datta_kernels.backends.triton import config as tcfg  # noqa: E402
from datta_kernels.backends.triton import kernels as jit  # noqa: E402

KERNELS = sorted(k for k in vars(jit) if k.endswith("_kernel"))
META = torch.device("meta")


class _Spy:
    """Stands in for one kernel: ``kernel[grid](*args, **kwargs)`` records the call, with the
    arguments named after the real kernel's parameters."""

    def __init__(self, name: str, log: list, state: dict):
        self.name, self.log, self.state = name, log, state
        kernel = getattr(jit, name)
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps the JITFunction
        self.params = list(inspect.signature(fn.fn).parameters)  # (or the interpreter's function)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.params, args, strict=False)) | kwargs
            self.log.append({"kernel": self.name, "grid": tuple(grid), "args": named,
                             "guard": self.state.get("guard")})
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Every kernel replaced by a spy; yields (recorded launches, shared state)."""
    log, state = [], {}
    for k in KERNELS:
        monkeypatch.setattr(jit, k, _Spy(k, log, state))
    yield log, state


def _inputs(shape, dtype=torch.float32):
    n, c, h, w = shape
    x = torch.empty(shape, device=META, dtype=dtype)
    p = {name: torch.empty(c, device=META) for name in ("weight", "bias", "smean", "svar")}
    blend = torch.empty(3, device=META)
    stats = torch.empty((n, c), device=META)
    return x, p, blend, stats


def _run_all(shape, dtype=torch.float32):
    """Every backend method once on a meta input of ``shape``."""
    x, p, blend, stats = _inputs(shape, dtype)
    be = tb.TritonBackend()
    be.instance_stats(x)
    be.diversity_angles(x, p["smean"], p["smean"])
    be.dabn_forward(x, p["weight"], p["bias"], p["smean"], p["svar"], blend, 4.0, 1e-5)
    be.dabn_normalize(x, p["weight"], p["bias"], p["smean"], p["svar"], blend, None, 1e-5, stats, stats)
    be.dabn_backward(x, x, p["weight"], p["smean"], p["svar"], blend, 4.0, 1e-5, stats, stats)
    be.dabn_backward_sums(x, x, stats)
    be.dabn_backward_apply(x, x, stats, stats, stats, stats)


# ---------------------------------------------------------------- defect 3: N*M on the host
@pytest.mark.parametrize("shape", [(512, 1, 2048, 2048), (2**16, 1, 2**15, 1)],
                         ids=["fp16-2^31", "2^31-tall"])
def test_batch_count_beyond_int32_decided_on_host(launches, shape):
    """N*M = 2^31: the kernels get NO_BATCH False and the divisors as floats (an int32 N * M
    in the kernel wrapped to -2^31, so 'N*M <= 1' held and tbn's output became source's)."""
    log, _ = launches
    _run_all(shape, torch.float16)
    nm = shape[0] * shape[2] * shape[3]
    assert nm >= 2**31
    seen = set()
    for call in log:
        a = call["args"]
        if "NO_BATCH" in a:
            assert a["NO_BATCH"] is False and a["NO_INST"] is (shape[2] * shape[3] <= 1), call["kernel"]
            seen.add(call["kernel"])
        if "nm1" in a:
            assert a["nm1"] == float(nm - 1) and isinstance(a["nm1"], float)
            seen.add(call["kernel"])
        if "nm" in a:
            assert a["nm"] == float(nm)
        assert "N * M" not in str(a)
    assert {"_normalize_kernel", "_bwd_finalize_kernel", "_stats_finalize_kernel"} <= seen


def test_no_kernel_multiplies_n_by_m():
    """The int32 product is gone from the kernels' code (the host passes it)."""
    import ast

    from datta_kernels.backends.triton import sync_kernels

    tree = ast.Module(body=[*ast.parse(Path(jit.__file__).read_text()).body,
                            *ast.parse(Path(sync_kernels.__file__).read_text()).body], type_ignores=[])
    for fn in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                names = {getattr(node.left, "id", None), getattr(node.right, "id", None)}
                assert names != {"N", "M"}, f"{fn.name}: {ast.unparse(node)}"


@pytest.mark.parametrize("shape,no_inst,no_batch", [
    ((1, 3, 1, 1), True, True), ((2, 3, 1, 1), True, False), ((1, 3, 2, 1), False, False),
    ((4, 3, 5, 5), False, False)])
def test_edge_rules_on_host(launches, shape, no_inst, no_batch):
    log, _ = launches
    _run_all(shape)
    flags = {(c["args"]["NO_INST"], c["args"]["NO_BATCH"]) for c in log if "NO_BATCH" in c["args"]}
    assert flags == {(no_inst, no_batch)}


# ---------------------------------------------------------------- defect 4: device guard
def test_every_launch_runs_under_the_device_guard(launches, monkeypatch):
    log, state = launches
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        state["guard"] = device
        try:
            yield
        finally:
            state["guard"] = None

    monkeypatch.setattr(tb, "_device_guard", guard)
    _run_all((2, 3, 4, 4))
    assert log and all(c["guard"] == META for c in log), [(c["kernel"], c["guard"]) for c in log]
    assert len(entered) == 7  # one guard per backend call


def test_device_guard_selects_the_tensor_device():
    g = tb._device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(tb._device_guard(torch.device("cpu")), contextlib.nullcontext)


# ---------------------------------------------------------------- defect 5: grid limits
def test_angles_grid_takes_a_batch_beyond_65535(launches):
    log, _ = launches
    x, p, _, _ = _inputs((70_000, 3, 2, 2))
    tb.TritonBackend().diversity_angles(x, p["smean"], p["smean"])
    for call in log:
        assert all(size <= 65535 for size in call["grid"][1:]), call
    part = next(c for c in log if c["kernel"] == "_angles_partial_kernel")
    assert part["grid"][0] == 70_000 * part["args"]["P_TILES"]


def test_every_grid_within_cuda_limits(launches):
    log, _ = launches
    _run_all((70_000, 3, 2, 2))
    _run_all((1, 1, 2**20, 2**10))
    for call in log:
        assert call["grid"][0] < 2**31 and all(size <= 65535 for size in call["grid"][1:]), call


def test_check_grid_raises_clearly():
    assert tb._check_grid((5, 65535), "x") == (5, 65535)
    with pytest.raises(ValueError, match="grid axis 1"):
        tb._check_grid((1, 65536), "the test pass")


# ---------------------------------------------------------------- defect 6: num_warps pinned
def test_reducing_kernels_pin_num_warps(monkeypatch):
    """Kernels that tl.sum over a tile are decorated with the reducers' autotuner, whose
    configs share one num_warps; the element-wise ones may vary it (autotuning on, whatever
    DATTA_TRITON_AUTOTUNE says: gpu_check.sh runs this file with it off)."""
    monkeypatch.setattr(tcfg, "AUTOTUNE", True)
    src = Path(jit.__file__).read_text()
    for deco, name, body in re.findall(r"@(_autotune\w*)\n@triton\.jit\ndef (\w+)\((.*?)(?=\n@|\n# -{10})",
                                       src, flags=re.S):
        reduces = "tl.sum(" in body
        assert deco == ("_autotune_reduce" if reduces else "_autotune_map"), name
    for interpret in (False, True):
        red = tcfg.autotune_configs(reduces=True, interpret=interpret)
        assert {c.num_warps for c in red} == {tcfg.LAUNCH.reduce_num_warps}
    assert len({c.num_warps for c in tcfg.autotune_configs(reduces=False, interpret=False)}) > 1


def test_autotune_off_gives_one_config(monkeypatch):
    """DATTA_TRITON_AUTOTUNE=0 (gpu_check.sh's correctness steps): one config, no timing race."""
    monkeypatch.setattr(tcfg, "AUTOTUNE", False)
    for reduces in (True, False):
        configs = tcfg.autotune_configs(reduces=reduces, interpret=False)
        assert len(configs) == 1 and configs[0].num_warps == tcfg.LAUNCH.reduce_num_warps


# ---------------------------------------------------------------- defect 7: older / broken Triton
def test_autotune_timing_follows_the_signature(monkeypatch):
    def old_autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None,
                     warmup=25, rep=100):
        return lambda fn: fn
    monkeypatch.setattr(triton, "autotune", old_autotune)
    assert jit._autotune_timing() == {"warmup": 5, "rep": 20}

    def oldest_autotune(configs, key, prune_configs_by=None, reset_to_zero=None):
        return lambda fn: fn
    monkeypatch.setattr(triton, "autotune", oldest_autotune)
    assert jit._autotune_timing() == {}


@pytest.fixture
def fresh_triton_backend(monkeypatch):
    """The backend's modules forgotten, so the next import runs them again (the originals
    come back afterwards)."""
    for name in [m for m in sys.modules if m.startswith("datta_kernels.backends.triton")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(backends, "triton", tb, raising=False)
    monkeypatch.setattr(backends, "_LOADED", {})
    backends._resolve_cached.cache_clear()
    yield
    backends._resolve_cached.cache_clear()


def test_old_triton_imports_with_warmup_rep(fresh_triton_backend, monkeypatch):
    real, calls = triton.autotune, []

    def old_autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None,
                     warmup=25, rep=100):
        calls.append({"warmup": warmup, "rep": rep})
        return real(configs, key)
    monkeypatch.setattr(triton, "autotune", old_autotune)
    assert backends._triton_unavailable() == []
    assert calls and all(c == {"warmup": 5, "rep": 20} for c in calls)


def test_broken_triton_makes_the_backend_unavailable(fresh_triton_backend, monkeypatch):
    def broken_autotune(*args, **kwargs):
        raise TypeError("autotune() got an unexpected keyword argument 'do_bench'")
    monkeypatch.setattr(triton, "autotune", broken_autotune)
    why = backends._triton_unavailable()
    assert why and "TypeError" in why[0]
    assert backends.explain("cuda")["triton"]          # info: a reason, no crash
    assert "triton" not in backends.available_backends("cpu")
    assert backends.resolve("auto", "cpu", torch.float32) in ("cpu", "reference")
