"""Shared fixtures: the device list, markers (``cuda``, ``triton``, ``ext``), backend rows that
skip with a reason instead of vanishing, and a count of the rows that ran per backend.

``DATTA_REQUIRE_BACKENDS=cpu[,triton,...]`` (set by ``.ci/run``) makes the session fail when the
compiled extension is missing or when no test row of a listed backend passed: a run that only
compared the reference with itself is not green."""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from datta_kernels import _ext

HAS_CUDA = torch.cuda.is_available()
HAS_EXT = not _ext.unavailable_reasons()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: devices every test that takes ``device`` runs on
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

_EXT_REASON = "datta_kernels._C not built: " + "; ".join(_ext.unavailable_reasons())


class Recorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _keep_numerics_switches():
    """``run_demo`` and ``datta-kernels demo`` pin portable numerics (``eval.numerics.pin``):
    environment switches and the thread count. Give every test the process as it found it."""
    from datta_kernels.eval.numerics import PORTABLE_ENV

    saved, threads = {k: os.environ.get(k) for k in PORTABLE_ENV}, torch.get_num_threads()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.set_num_threads(threads)


def backend_skip_reason(name: str) -> str | None:
    """Why a test row of backend ``name`` cannot run here (None: it can)."""
    if name in ("cpu", "cuda") and not HAS_EXT:
        return _EXT_REASON
    if name == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if name == "triton" and not TRITON_INTERPRET:
        return "the triton rows run on CPU tensors: they need TRITON_INTERPRET=1"
    return None


def backend_param(name: str, *values):
    """One parametrisation row whose first value is backend ``name``: skipped with the reason
    when that backend cannot run here (reported, not dropped from the parametrisation)."""
    reason = backend_skip_reason(name)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, *values, marks=marks)


def backend_params(*names: str) -> list:
    return [backend_param(n) for n in names]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    skip_ext = pytest.mark.skip(reason=_EXT_REASON)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "ext" in item.keywords and not HAS_EXT:
            item.add_marker(skip_ext)
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if isinstance(backend, str):
            item.user_properties.append(("backend", backend))


_RAN: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
    """Count passed rows per backend (a test that checks several backends in one row, like
    test_distributed's, records each with ``request.node.user_properties``)."""
    if report.when == "call" and report.passed:
        for key, value in report.user_properties:
            if key == "backend":
                _RAN[value] += 1


def _required() -> list[str]:
    return [b for b in os.environ.get("DATTA_REQUIRE_BACKENDS", "").split(",") if b.strip()]


def pytest_sessionfinish(session, exitstatus):
    missing = [b for b in _required() if not _RAN[b.strip()]]
    if (missing or (_required() and not HAS_EXT)) and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RAN and not _required():
        return
    ran = ", ".join(f"{b} {n}" for b, n in sorted(_RAN.items())) or "none"
    terminalreporter.write_line(f"backend rows passed: {ran}")
    missing = [b for b in _required() if not _RAN[b.strip()]]
    if _required() and not HAS_EXT:
        terminalreporter.write_line(f"FAILED: DATTA_REQUIRE_BACKENDS set and {_EXT_REASON}", red=True)
    if missing:
        terminalreporter.write_line(f"FAILED: DATTA_REQUIRE_BACKENDS={','.join(_required())}: no "
                                    f"passed row of {', '.join(missing)}", red=True)
