"""The CUDA sources compile without a GPU (csrc/cuda/).

* every ``csrc/cuda/*.cu`` with ``nvcc -c`` for sm_80 and sm_90 (one nvcc call per file,
  both architectures, ``--threads 2``), with the half/bfloat16 restrictions torch's
  ``CUDAExtension`` adds, so what passes here also builds inside ``setup.py``;
* the torch-free host header ``datta_cuda.h`` with the host C++ compiler alone;
* the glue ``ops_cuda.cpp`` with ``-fsyntax-only`` against the installed torch headers
  (works with a CPU-only torch wheel: it still ships the c10/cuda headers; the one
  build-generated header it lacks is stubbed).

Compiler warnings are printed (``pytest -s`` or on failure) and reported as pytest warnings;
errors fail.  Skipped with a reason when nvcc / a host compiler is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# Flags torch.utils.cpp_extension.CUDAExtension passes to nvcc by default.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
TIMEOUT_S = 300


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
CUDA_INCLUDE = Path(NVCC).resolve().parents[1] / "include" if NVCC else None

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_cxx = pytest.mark.skipif(CXX is None or NVCC is None,
                               reason="needs a host C++ compiler and the CUDA headers next to nvcc")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print(f"--- {what}\n$ {' '.join(cmd)}\n{out}", file=sys.stderr)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{out}"
    if out:
        warnings.warn(f"{what}: compiler output:\n{out}", stacklevel=2)


#: kernel ops of csrc/ops.cpp with no CUDA kernel, and why: the op runs without one on CUDA
CUDA_EXEMPT = {
    "_build_info": "takes no tensor: its kernel is the catch-all one m.def registers",
    "_dispersion_score": "the cuda backend computes it with torch ops (backends/cuda.py), "
                         "it reads only (N, C) statistics",
    "_probe_spread": "ClassProbe runs its torch ops off the CPU (diversity.py); it reads only "
                     "(N, C) statistics",
    "_source_shift": "source_shift runs its torch ops off the CPU (diversity.py); it reads only "
                     "(N, C) statistics",
    "_threshold_decide": "ThresholdSelector.decide_stats runs its torch ops off the CPU "
                         "(diversity.py); it reads only (N, C) statistics",
    "_dabn_decide_forward": "DATTA's fused CPU score layer (adapt.py); off the CPU the layer runs "
                            "its separate ops",
    "_stream_anchor": "FusedDABN runs nn.stream_anchor's torch ops off the CPU; it reads only "
                      "(N, C) statistics",
    "_dabn_stream_forward": "FusedDABN's fused CPU path with stream statistics (nn.py); off the "
                            "CPU the layer runs stream_anchor and its usual ops",
}


def _declared_ops() -> set[str]:
    return set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text()))


def _registered(key: str) -> set[str]:
    """Op names registered under TORCH_LIBRARY_IMPL(datta, key, m) anywhere in csrc/."""
    names = set()
    for src in (ROOT / "csrc").rglob("*.cpp"):
        text = src.read_text()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(datta,\s*" + key + r",\s*m\)\s*\{(.*?)\n\}",
                                text, flags=re.S):
            names |= set(re.findall(r'm\.impl\(\s*"(\w+)"', block))
    return names


def test_every_kernel_op_has_a_cuda_registration():
    """Every op csrc/ops.cpp declares has a CUDA kernel (or a stated reason not to): the cuda
    backend calls the CPU backend's ops on CUDA tensors, so a missing one is a
    NotImplementedError on the GPU only (issue 21: _dabn_backward_sums / _apply were)."""
    declared = _declared_ops()
    assert {"_instance_stats", "_dabn_backward_sums", "_dabn_backward_apply"} <= declared
    cuda, cpu = _registered("CUDA"), _registered("CPU")
    assert not cuda - declared, f"CUDA registrations of undeclared ops: {sorted(cuda - declared)}"
    missing = declared - cuda - set(CUDA_EXEMPT)
    assert not missing, f"ops declared in csrc/ops.cpp without a CUDA kernel: {sorted(missing)}"
    assert not (set(CUDA_EXEMPT) & cuda), "an exempt op has a CUDA kernel: drop its exemption"
    assert declared - cpu <= {"_build_info"}, f"ops without a CPU kernel: {sorted(declared - cpu)}"
    from datta_kernels.backends.base import KernelBackend
    from datta_kernels.backends.cuda import CudaBackend
    assert CudaBackend.dispersion_score is KernelBackend.dispersion_score  # the exemption's reason


def test_cuda_launchers_declared_for_every_cuda_op():
    """Each CUDA glue function calls a launcher that datta_cuda.h declares and a .cu defines."""
    header = (CUDA_DIR / "datta_cuda.h").read_text()
    cu = "".join(p.read_text() for p in CU_FILES)
    for name in ("dabn_backward_sums", "dabn_backward_apply", "dabn_backward", "dabn_forward"):
        assert f"cudaError_t {name}(const Params& p, cudaStream_t stream);" in header, name
        assert f"cudaError_t {name}(const Params& p, cudaStream_t stream) {{" in cu, name


def test_sources_present():
    assert CU_FILES, "no .cu files under csrc/cuda"
    assert (CUDA_DIR / "datta_cuda.h").is_file()
    assert (CUDA_DIR / "ops_cuda.cpp").is_file()


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source: Path, tmp_path: Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
           "-std=c++17", "-O3", "--threads", "2", *gencode, *TORCH_NVCC_FLAGS,
           "-Xcompiler", "-Wall,-Wextra", f"-I{CUDA_DIR}"]
    _run(cmd, f"nvcc {source.name} (sm_{', sm_'.join(ARCHS)})")


@needs_cxx
def test_host_header_compiles_without_nvcc(tmp_path: Path):
    """datta_cuda.h is plain C++: the glue includes it without any CUDA compiler."""
    src = tmp_path / "uses_header.cpp"
    src.write_text('#include "datta_cuda.h"\n'
                   "size_t probe(const datta::cuda::Params& p) {\n"
                   "  return datta::cuda::workspace_bytes(datta::cuda::Op::kDabnForward, p);\n}\n")
    _run([CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CUDA_DIR}",
          f"-I{CUDA_INCLUDE}", str(src)], "host compile of datta_cuda.h")


def _torch_include() -> Path | None:
    try:
        import torch.utils.cpp_extension as ext
    except ImportError:
        return None
    paths = [Path(p) for p in ext.include_paths()]
    return paths[0] if paths and (paths[0] / "c10" / "cuda" / "CUDAGuard.h").is_file() else None


@needs_cxx
def test_glue_syntax(tmp_path: Path):
    """ops_cuda.cpp against the installed torch headers (catches ATen/c10 API mistakes)."""
    if not (CUDA_DIR.parent / "ops.h").is_file():
        pytest.skip("csrc/ops.h (the shared input check the glue uses) is not there yet")
    inc = _torch_include()
    if inc is None:
        pytest.skip("torch headers with c10/cuda not installed")
    stub = tmp_path / "stub"
    macros = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (inc / macros).is_file():  # generated by CUDA builds of torch only
        (stub / macros).parent.mkdir(parents=True)
        (stub / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    py_inc = sysconfig.get_paths()["include"]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-DDATTA_WITH_CUDA",
           "-isystem", str(stub), "-isystem", str(inc),
           "-isystem", str(inc / "torch" / "csrc" / "api" / "include"),
           "-isystem", str(CUDA_INCLUDE), "-isystem", py_inc, f"-I{CUDA_DIR.parent}",  # csrc/: ops.h
           str(CUDA_DIR / "ops_cuda.cpp")]
    _run(cmd, "syntax check of ops_cuda.cpp")
