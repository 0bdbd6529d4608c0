"""Every Triton kernel through the real compiler (TTIR -> PTX -> cubin) for sm_80 and sm_90,
with no GPU: a kernel that only the interpreter accepts fails here, in CI.

Each case compiles one kernel for one specialisation that changes the generated code:
element dtype of ``x`` (fp32/fp16/bf16), layout (NCHW / channels_last), flags (weight, bias,
shrink, edge rules) and the block sizes ``backends/triton/config.py`` picks for representative
shapes.  Integer arguments are specialised as a real launch specialises them (Triton's own
rule: an int equal to 1 becomes a constexpr, one of 2^31 or more an i64, a multiple of 16
carries the ``tt.divisibility`` hint; pointers carry the hint too), so the code compiled is the
code a launch would compile: issue 21 found ``(N * M).to(...)`` failing only when N and M are
both the constexpr 1, which an all-i32 signature never shows.  Every kernel is also compiled
with every integer argument 1 (sm_90).

``triton.jit`` builds interpreter objects when ``TRITON_INTERPRET=1`` is set at import, so
under the interpreter this module re-runs itself in a subprocess without that variable.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ARCHS = (80, 90)

#: arguments holding elements of x (its dtype); fp64 totals (plane-long sums); every other
#: pointer is fp32 statistics/params
X_ARGS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
F64_ARGS = {"pmean_ptr", "pm2_ptr", "psdy_ptr", "psdyxc_ptr", "mean_cos_ptr", "count_ptr", "terms_ptr",
            "packed_ptr", "rows_ptr", "samples_ptr"}
FLOAT_ARGS = {"shrink_k", "eps", "nm", "nm1"}
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}

#: representative shapes and why: the ResNet-50 stage-1 benchmark shape (large tiles, no split),
#: a 224^2 stem with a small batch (row split across programs), H*W = 1 (BLOCK_P = 1),
#: 7x7 with many channels (many channels per NCHW tile).
#: (1, C, 1, 1) and (1, 1, 1, 1): N = M = 1 (both edge rules; N, M, ITERS, SPLITS... are the
#: constexpr 1).
SHAPES = {"bench": (64, 256, 56, 56), "stem224": (2, 64, 224, 224), "hw1": (4, 6, 1, 1),
          "late7": (64, 2048, 7, 7), "n1hw1": (1, 64, 1, 1), "unit": (1, 1, 1, 1)}


def _int_spec(value: int) -> tuple[str, bool]:
    """``(type, divisible by 16)`` of an int argument as a launch specialises it."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # older Triton: the same rule, written out
        if value == 1:
            return "constexpr", False
        return ("i64" if not -2**31 <= value < 2**31 else "i32"), value % 16 == 0
    ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
    return ty, attr == "D"


def _compile(fn, ints: dict, consts: dict, xdtype: str, arch: int, num_warps: int = 4):
    """Compile JITFunction ``fn`` with int/float args typed from their names; returns asm."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, consts = {}, {}, dict(consts)
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = DTYPES[xdtype] if name in X_ARGS else "*fp64" if name in F64_ARGS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name], div16 = _int_spec(ints[name])
            if sig[name] == "constexpr":
                consts[name] = ints[name]
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": 2}).asm


def _cases():
    """(id, kernel name, ints, constexprs, x dtype, num_warps) for every specialisation."""
    import torch

    from datta_kernels.backends.triton import config as cfg

    cpu = torch.device("cpu")
    reduce_warps = cfg.LAUNCH.reduce_num_warps
    cases = []
    for sname, (n, c, h, w) in SHAPES.items():
        m = h * w
        edge = dict(NO_INST=m <= 1, NO_BATCH=n * m <= 1)
        for cl in (False, True):
            lay = "cl" if cl else "nchw"
            fbn, fbc = cfg.finalize_blocks(n, c)
            full = sname == "bench"  # the full dtype x flag matrix once; the other shapes vary tiling
            for dt in DTYPES if full else ("bf16",):
                size = ITEMSIZE[dt]
                t = cfg.reduce_tiling(n, c, m, cl, size, cpu)
                bc, bp, ptiles = cfg.angles_tiling(c, m, cl, size)
                ints = dict(N=n, C=c, M=m, ITERS=t.iters, SPLITS=t.splits, CHUNK=t.chunk, P_TILES=ptiles)
                tile = dict(CHANNELS_LAST=cl, BLOCK_C=t.block_c, BLOCK_P=t.block_p)
                tag = f"{sname}-{lay}-{dt}-w{reduce_warps}"  # the reducers' num_warps is pinned
                cases.append((f"stats_partial-{tag}", "_stats_partial_kernel", ints, tile, dt, reduce_warps))
                cases.append((f"bwd_partial-{tag}", "_bwd_partial_kernel", ints, tile, dt, reduce_warps))
                cases.append((f"angles_partial-{tag}", "_angles_partial_kernel", ints,
                              dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_P=bp), dt, reduce_warps))
                for nw in (4, 8) if full and dt == "fp32" else (4,):
                    cases.append((f"bwd_dx-{sname}-{lay}-{dt}-w{nw}", "_bwd_dx_kernel", ints, tile, dt, nw))
                flag_sets = ((True, True, True), (False, False, False), (True, False, True))
                for hw, hb, sh in flag_sets if full else flag_sets[:1]:
                    flags = dict(HAS_WEIGHT=hw, HAS_BIAS=hb, SHRINK=sh and m > 1)  # as the launcher sets it
                    fid = "".join(k if v else "-" for k, v in zip("wbs", (hw, hb, sh), strict=True))
                    cases.append((f"normalize-{sname}-{lay}-{dt}-{fid}", "_normalize_kernel", ints,
                                  {**tile, **flags, **edge}, dt, 4))
                cases.append((f"stats_finalize-{sname}-{lay}-{dt}", "_stats_finalize_kernel", ints,
                              dict(CHANNELS_LAST=cl, BLOCK_N=fbn, BLOCK_C=fbc), dt, 4))
        for hw, sh in ((True, True), (False, False)) if sname == "bench" else ((True, True),):
            cases.append((f"bwd_finalize-{sname}-w{int(hw)}s{int(sh)}", "_bwd_finalize_kernel", ints,
                          dict(HAS_WEIGHT=hw, SHRINK=sh and m > 1, **edge, BLOCK_N=fbn, BLOCK_C=fbc),
                          "fp32", 4))
        sync = dict(NO_INST=m <= 1, SHRINK=m > 1, BLOCK_N=fbn, BLOCK_C=fbc)  # the synced layer's
        cases.append((f"sync_blend-{sname}", "_sync_blend_kernel", ints, sync, "fp32", 4))
        cases.append((f"batch_local-{sname}", "_batch_local_kernel", {**ints, "NM": n * m},
                      dict(BLOCK_N=fbn, BLOCK_C=fbc), "fp32", 4))
        for world in (1, 3):  # one rank (W the constexpr 1) and several
            cases.append((f"batch_merge-{sname}-w{world}", "_batch_merge_kernel", {**ints, "W": world},
                          dict(BLOCK_C=min(cfg.next_pow2(c), cfg.LAUNCH.finalize_elems)), "fp32", 4))
        for kname in ("_sync_terms_kernel", "_sync_coefs_kernel"):
            consts = {**sync, "HAS_WEIGHT": True}
            cases.append((f"{kname.strip('_')}-{sname}", kname, ints, consts, "fp32", 4))
        cases.append((f"angles_finalize-{sname}", "_angles_finalize_kernel", ints,
                      dict(BLOCK=min(cfg.LAUNCH.angles_reduce_block, cfg.next_pow2(ptiles))), "fp32", 4))
    return cases


def _all_ones_cases():
    """Every kernel with every integer argument the constexpr 1 and its smallest tiles (what
    a (1, 1, 1, 1) launch of it specialises to, whatever the tiling would pick)."""
    from triton.runtime.autotuner import Autotuner

    cases = []
    for kname in sorted(k for mod in _kernel_modules() for k in vars(mod) if k.endswith("_kernel")):
        kernel = _kernel(kname)
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        ints, consts = {}, {}
        for p in fn.params:
            if p.is_constexpr:
                # blocks of 1; edge rules on (N = M = 1); no shrink (it needs M > 1); no layout flags
                consts[p.name] = 1 if p.name.startswith("BLOCK") else p.name.startswith("NO_")
            elif not p.name.endswith("_ptr") and p.name not in FLOAT_ARGS:
                ints[p.name] = 1
        cases.append((f"ones-{kname.strip('_')}", kname, ints, consts, "fp32", 4))
    return cases


def _kernel_modules():
    from datta_kernels.backends.triton import kernels, sync_kernels
    return kernels, sync_kernels


def _kernel(name: str):
    """The kernel ``name`` of the backend's kernel modules (an Autotuner or a JITFunction)."""
    return next(getattr(mod, name) for mod in _kernel_modules() if hasattr(mod, name))


def _toolchain_missing() -> str | None:
    """Why compiling to cubin cannot work here (e.g. no ptxas), or None."""
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    try:
        _compile(_probe, {}, {"BLOCK": 16}, "fp32", 80)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means "no toolchain"
        return f"triton cannot compile for sm_80 on this machine: {type(e).__name__}: {e}"
    return None


if not INTERPRET:
    _CASES = _cases()
    _ONES = _all_ones_cases()
    _MISSING = _toolchain_missing()
else:
    _CASES, _ONES, _MISSING = [], [], None


@pytest.mark.skipif(INTERPRET, reason="compiled in a subprocess without TRITON_INTERPRET "
                                      "(test_compile_without_interpreter)")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_compiles(case, arch):
    if _MISSING:
        pytest.skip(_MISSING)
    from triton.runtime.autotuner import Autotuner

    _, kname, ints, consts, dt, nw = case
    kernel = _kernel(kname)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    asm = _compile(fn, ints, consts, dt, arch, num_warps=nw)
    assert ".entry" in asm["ptx"] and f"sm_{arch}" in asm["ptx"]
    assert len(asm["cubin"]) > 0


@pytest.mark.skipif(INTERPRET, reason="compiled in a subprocess without TRITON_INTERPRET "
                                      "(test_compile_without_interpreter)")
@pytest.mark.parametrize("case", _ONES, ids=[c[0] for c in _ONES])
def test_compiles_with_every_int_one(case):
    if _MISSING:
        pytest.skip(_MISSING)
    test_compiles(case, 90)


def test_int_specialisation_rule():
    """The rule _compile applies is the one a launch applies (checked against Triton's own
    function where this Triton has it)."""
    assert _int_spec(1) == ("constexpr", False)
    assert _int_spec(2) == ("i32", False)
    assert _int_spec(4096) == ("i32", True)
    assert _int_spec(2**31) == ("i64", True)


@pytest.mark.skipif(not INTERPRET, reason="only needed when TRITON_INTERPRET=1 is set")
def test_compile_without_interpreter():
    # a sub-run of one file: no backend rows of its own to require (DATTA_REQUIRE_BACKENDS)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DATTA_REQUIRE_BACKENDS")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout[-6000:] + proc.stderr[-2000:]
    if proc.returncode == 5 or " skipped" in out and " passed" not in out:
        pytest.skip("compile tests skipped in the subprocess:\n" + out)
    assert proc.returncode == 0, out
