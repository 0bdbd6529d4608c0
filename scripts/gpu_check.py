"""The Python steps of ``scripts/gpu_check.sh``: named GPU checks, each case under its own
try, one line per case (``PASS`` / ``FAIL`` / ``SKIP`` with the reason; a crash is a FAIL,
never a skip), exit status 1 when any case failed or none passed.

    python scripts/gpu_check.py rows        # GPU rows vs the reference: edge rules, fp16/bf16,
                                            # channels_last, (1,C,1,1), (256,2048,7,7),
                                            # (1,3,1024,1024), a misaligned view
    python scripts/gpu_check.py repro       # issue 21's defects 1-6, reproduced on the device
    python scripts/gpu_check.py opcheck     # torch.library.opcheck on CUDA tensors
    python scripts/gpu_check.py syncdebug   # no host sync after warm-up (both backends)
    python scripts/gpu_check.py adapters    # cluster_labels, DYN and DATTA (dispersion score,
                                            # threshold + spread rule, probe; DAFT off / on) on
                                            # the device vs CPU reference; no host sync in DYN
                                            # and in DATTA without DAFT
    python scripts/gpu_check.py sanitize --backend cuda   # compute-sanitizer's workload: one
                                            # shape per layout that splits rows and merges them

``--smoke`` runs the same cases on CPU (the ``cpu`` backend, and ``triton`` under
``TRITON_INTERPRET=1``) with small shapes, so CI keeps this file working without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

import torch

import datta_kernels as dk
from datta_kernels import reference as ref
from datta_kernels.backends import get as get_backend
from datta_kernels.nn import dabn_layers
from datta_kernels.testing import make_inputs, perturb_batchnorms, tol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_sweep import blends, dabn_case  # noqa: E402


class Skip(Exception):
    """A case that does not apply here (e.g. a second GPU it needs): reported as SKIP."""


class Report:
    def __init__(self):
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def case(self, name: str, fn, *args) -> None:
        t0 = time.perf_counter()
        status, note = "PASS", ""
        try:
            fn(*args)
            if DEVICE == "cuda":
                torch.cuda.synchronize()  # an asynchronous kernel fault belongs to this case
        except Skip as e:
            status, note = "SKIP", str(e)
        except Exception as e:  # noqa: BLE001 - every failure of a case is reported, then the next runs
            status, note = "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            traceback.print_exc(limit=4)
        self.counts[status] += 1
        print(f"{status} {name} ({time.perf_counter() - t0:.2f} s){': ' + note if note else ''}", flush=True)

    def exit_code(self) -> int:
        print(f"{self.counts['PASS']} passed, {self.counts['FAIL']} failed, {self.counts['SKIP']} skipped")
        return 1 if self.counts["FAIL"] or not self.counts["PASS"] else 0


DEVICE = "cuda"
SMOKE = False


def backends_here() -> list[str]:
    if not SMOKE:
        return ["cuda", "triton"]
    return ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def shape(gpu: tuple, smoke: tuple) -> tuple:
    return smoke if SMOKE else gpu


def dabn_vs_reference(backend: str, x: torch.Tensor, inp, blend_list=None) -> None:
    """Forward + backward of every listed (weights, shrink_k) vs the reference (gpu_sweep's
    tolerances); raises with every mismatch."""
    failures = []
    for i, (w, k) in enumerate(blend_list or list(blends())):
        tag = f"{backend} {tuple(x.shape)} {x.dtype}"
        dabn_case(backend, tag, x, inp, w, k, x.dtype, False, failures, seed=i)
    if failures:
        raise AssertionError(f"{len(failures)} mismatches; first: " + " | ".join(failures[:3]))


def stats_vs_reference(backend: str, x: torch.Tensor, inp) -> None:
    pdt = ref.acc_dtype(x.dtype)
    for got, want in zip(dk.instance_stats(x, backend=backend), ref.instance_stats(x), strict=True):
        torch.testing.assert_close(got, want.to(got.dtype), **tol(pdt, 2.0))
    if x.shape[2] * x.shape[3] > 1:
        _, a = dk.diversity_score(x, inp.source_mean, backend=backend)
        _, ar = dk.diversity_score(x, inp.source_mean, backend="reference")
        torch.testing.assert_close(a, ar, **tol(pdt, 10.0))


ONE_BLEND = [((0.6, 0.4, 0.0), None), ((0.85, 0.0, 0.15), 4.0)]


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values in a dense NCHW tensor whose data pointer is one element past an aligned
    one (no 16-byte vector path may be taken)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = buf[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 16 != 0
    return view


# ---------------------------------------------------------------- rows
def step_rows(rep: Report) -> None:
    for be in backends_here():
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        for c in (64, 1):  # (1, C, 1, 1): both edge rules, every blend
            s = (1, c, 1, 1)
            inp = make_inputs(s, device=DEVICE)
            rep.case(f"{be} edge {s} every blend", dabn_vs_reference, be, inp.x, inp)
        for s in [shape((4, 64, 1, 1), (4, 6, 1, 1)), shape((1, 64, 5, 7), (1, 3, 5, 7))]:
            inp = make_inputs(s, device=DEVICE)
            rep.case(f"{be} edge {s} every blend", dabn_vs_reference, be, inp.x, inp)
        for dt in dtypes:
            for layout in ("nchw", "channels_last"):
                s = shape((8, 64, 28, 28), (2, 5, 6, 7))
                inp = make_inputs(s, dtype=dt, device=DEVICE, layout=layout)
                rep.case(f"{be} {s} {dt} {layout}", dabn_vs_reference, be, inp.x, inp, ONE_BLEND)
                rep.case(f"{be} {s} {dt} {layout} stats+angles", stats_vs_reference, be, inp.x, inp)
        for s, dt, layout in [((256, 2048, 7, 7), torch.float32, "nchw"),
                              ((256, 2048, 7, 7), torch.bfloat16, "channels_last"),
                              ((1, 3, 1024, 1024), torch.float32, "nchw"),
                              ((1, 3, 1024, 1024), torch.float16, "channels_last")]:
            s = shape(s, (2, 33, 3, 3) if s[0] > 1 else (1, 3, 40, 40))
            inp = make_inputs(s, dtype=dt, device=DEVICE, layout=layout)
            rep.case(f"{be} {s} {dt} {layout}", dabn_vs_reference, be, inp.x, inp, ONE_BLEND)
            rep.case(f"{be} {s} {dt} {layout} stats+angles", stats_vs_reference, be, inp.x, inp)
        for dt in (torch.float32, torch.bfloat16):
            s = shape((3, 17, 31, 33), (2, 3, 5, 7))
            inp = make_inputs(s, dtype=dt, device=DEVICE)
            x = misaligned(inp.x)
            rep.case(f"{be} misaligned view {s} {dt}", dabn_vs_reference, be, x, inp, ONE_BLEND)
            rep.case(f"{be} misaligned view {s} {dt} stats+angles", stats_vs_reference, be, x, inp)


# ---------------------------------------------------------------- repro of issue 21
def repro_backward_passes(be: str, s: tuple, layout: str) -> None:
    """Defect 1: the D5 passes alone (the synced layer's backward) on the device."""
    inp = make_inputs(s, device=DEVICE, layout=layout)
    x = inp.x
    dy = torch.randn_like(x)
    impl = get_backend(be).impl()
    mean_i, _ = ref.instance_stats(x)
    sdy, sdyxc = impl.dabn_backward_sums(dy, x, mean_i)
    _, _, sdy_r, sdyxc_r = ref.dabn_backward_sums(dy, x, mean_i)
    torch.testing.assert_close(sdy, sdy_r, **tol(torch.float32, 10.0))
    torch.testing.assert_close(sdyxc, sdyxc_r, **tol(torch.float32, 10.0))
    a, b, c0 = (torch.randn_like(mean_i) for _ in range(3))
    dx = impl.dabn_backward_apply(dy, x, mean_i, a, b, c0)
    dyf, xc = ref.dabn_backward_centred(dy, x, mean_i)
    torch.testing.assert_close(dx, ref.dabn_backward_dx(dyf, xc, a, b, c0, x), **tol(torch.float32))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert dx.is_contiguous(memory_format=torch.channels_last)


def repro_synced_layer(be: str) -> None:
    """Defect 1 as a user meets it: SyncFusedDABN's backward on CUDA tensors (1-process NCCL
    group; gloo on CPU) equals FusedDABN's."""
    import socket

    import torch.distributed as dist
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo" if SMOKE else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8)).to(DEVICE)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    import copy
    plain = dk.convert_model(copy.deepcopy(net), backend=be)
    synced = dk.convert_model(copy.deepcopy(net), process_group=None, backend=be)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    grads = []
    for model in (plain, synced):
        model.train()
        out = model(x)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0, **tol(torch.float32, 10.0))


def repro_unit_batch(be: str) -> None:
    """Defect 2: N = H*W = 1 (the Triton backward's finalize failed to compile)."""
    for c in (64, 1):
        inp = make_inputs((1, c, 1, 1), device=DEVICE)
        dabn_vs_reference(be, inp.x, inp)


def repro_int32_batch_count() -> None:
    """Defect 3: N*H*W = 2^31 (fp16 (512, 1, 2048, 2048)): the Triton tbn output and dx equal
    the cuda backend's (int64 there); an int32 N*M turned the batch weight into the source's."""
    if SMOKE:
        raise Skip("2^31 elements (tests/test_triton_launch.py checks the launch arguments on CPU)")
    free = torch.cuda.mem_get_info()[0]
    if free < 40 * 2**30:
        raise Skip(f"needs ~40 GiB free, {free / 2**30:.0f} GiB here")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((512, 1, 2048, 2048), device=DEVICE, dtype=torch.float16, generator=g)
    dy = torch.randn(x.shape, device=DEVICE, dtype=torch.float16, generator=g)
    smean, svar = torch.full((1,), 3.0, device=DEVICE), torch.full((1,), 4.0, device=DEVICE)
    tbn = torch.tensor([0.0, 1.0, 0.0], device=DEVICE)
    outs = {}
    for be in ("cuda", "triton"):
        impl = get_backend(be).impl()
        y, mean_i, var_i = impl.dabn_forward(x, None, None, smean, svar, tbn, None, 1e-5)
        dx, _, _ = impl.dabn_backward(dy, x, None, smean, svar, tbn, None, 1e-5, mean_i, var_i)
        outs[be] = (y, dx)
        del mean_i, var_i
    for name, i in (("y", 0), ("dx", 1)):
        err = (outs["triton"][i].float() - outs["cuda"][i].float()).abs().max().item()
        assert err < 1e-2, f"{name}: triton vs cuda max error {err} (source-weighted output?)"
    # the batch, not the source (mean 3, var 4), normalised y: its mean is ~0, not ~-1.5
    assert abs(outs["triton"][0][:8].float().mean().item()) < 0.05


def repro_device_guard() -> None:
    """Defect 4: a tensor on cuda:1 while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs (tests/test_triton_launch.py checks the guard on CPU)")
    torch.cuda.set_device(0)
    inp = make_inputs((4, 16, 9, 9), device="cuda:1")
    args = (inp.x, inp.weight, inp.bias, inp.source_mean, inp.source_var, (0.6, 0.4, 0.0))
    y_t, y_c = dk.dabn(*args, backend="triton"), dk.dabn(*args, backend="cuda")
    torch.cuda.synchronize(1)
    torch.testing.assert_close(y_t, y_c, **tol(torch.float32))


def repro_large_batch_angles(be: str) -> None:
    """Defect 5: more than 65,535 samples through the angles pass."""
    inp = make_inputs(shape((70_000, 3, 2, 2), (40, 3, 2, 2)), device=DEVICE)
    _, a = dk.diversity_score(inp.x, inp.source_mean, backend=be)
    _, ar = dk.diversity_score(inp.x, inp.source_mean, backend="reference")
    torch.testing.assert_close(a, ar, **tol(torch.float32, 10.0))


def repro_autotune_bits() -> None:
    """Defect 6: the element-wise Triton kernels give the same bits for every autotune config,
    and the reducing ones have one num_warps."""
    import triton

    from datta_kernels.backends.triton import kernels as jit
    if SMOKE:
        raise Skip("the interpreter has one config (tests/test_triton_launch.py checks the configs)")
    inp = make_inputs((8, 64, 28, 28), device=DEVICE)
    impl = get_backend("triton").impl()
    dy = torch.randn_like(inp.x)
    for name in ("_stats_partial_kernel", "_bwd_partial_kernel", "_angles_partial_kernel"):
        assert len({c.num_warps for c in getattr(jit, name).configs}) == 1, name
    results = []
    saved = {k: (getattr(jit, k).configs, dict(getattr(jit, k).cache))
             for k in ("_normalize_kernel", "_bwd_dx_kernel")}
    blend = torch.tensor([0.6, 0.4, 0.0], device=DEVICE)
    params = (inp.source_mean, inp.source_var, blend, None, 1e-5)
    try:
        for warps in (4, 8):
            for k in saved:
                getattr(jit, k).configs = [triton.Config({}, num_warps=warps, num_stages=2)]
                getattr(jit, k).cache.clear()
            y, mean_i, var_i = impl.dabn_forward(inp.x, inp.weight, inp.bias, *params)
            dx, _, _ = impl.dabn_backward(dy, inp.x, inp.weight, *params, mean_i, var_i)
            results.append((y, dx))
    finally:
        for k, (configs, cache) in saved.items():
            getattr(jit, k).configs = configs
            getattr(jit, k).cache.clear()
            getattr(jit, k).cache.update(cache)
    assert torch.equal(results[0][0], results[1][0]), "normalize: num_warps 4 and 8 differ"
    assert torch.equal(results[0][1], results[1][1]), "dx: num_warps 4 and 8 differ"


def step_repro(rep: Report) -> None:
    for be in backends_here():
        for layout in ("nchw", "channels_last"):
            s = shape((1, 4, 512, 512), (1, 4, 9, 9))  # few planes: rows split across programs
            rep.case(f"1 {be} backward passes {s} {layout}", repro_backward_passes, be, s, layout)
        rep.case(f"1 {be} synced layer backward (1-process group)", repro_synced_layer, be)
        rep.case(f"2 {be} (1, C, 1, 1) forward+backward", repro_unit_batch, be)
        rep.case(f"5 {be} angles of 70,000 samples", repro_large_batch_angles, be)
    rep.case("3 N*H*W = 2^31: triton == cuda (tbn)", repro_int32_batch_count)
    rep.case("4 tensor on cuda:1, cuda:0 current", repro_device_guard)
    rep.case("6 triton bits independent of the autotune config", repro_autotune_bits)


# ---------------------------------------------------------------- opcheck
def opcheck_public(be: str, layout: str) -> None:
    inp = make_inputs((2, 3, 4, 5), device=DEVICE, layout=layout)
    blend = torch.tensor([0.2, 0.3, 0.5], device=DEVICE)
    x, w, b = (t.clone().requires_grad_() for t in (inp.x, inp.weight, inp.bias))
    ops = torch.ops.datta
    torch.library.opcheck(ops.dabn_forward.default,
                          (x, w, b, inp.source_mean, inp.source_var, blend, 1.0, 1e-5, be))
    torch.library.opcheck(ops.instance_stats.default, (inp.x, be))
    mean_i, var_i = ops.instance_stats(inp.x, be)
    torch.library.opcheck(ops.diversity_angles.default, (inp.x, inp.source_mean, mean_i.mean(0), be))
    dy = torch.randn_like(inp.x)
    torch.library.opcheck(ops.dabn_backward.default, (dy, inp.x, inp.weight, inp.source_mean, inp.source_var,
                                                      blend, 1.0, 1e-5, mean_i, var_i, be))


def opcheck_kernel_ops(layout: str) -> None:
    inp = make_inputs((2, 3, 4, 5), device=DEVICE, layout=layout)
    ops, x = torch.ops.datta, inp.x
    dy = torch.randn_like(x)
    mean_i, var_i = ops._instance_stats(x)
    torch.library.opcheck(ops._instance_stats.default, (x,))
    torch.library.opcheck(ops._dabn_backward_sums.default, (dy, x, mean_i))
    torch.library.opcheck(ops._dabn_backward_apply.default, (dy, x, mean_i, mean_i, var_i, mean_i))
    # the synced layer's (N, C) steps
    c = x.shape[1]
    blend = torch.tensor([0.2, 0.3, 0.5], device=DEVICE)
    count = torch.tensor(40.0, device=DEVICE, dtype=torch.float64)
    batch = (inp.source_mean + 0.1, inp.source_var * 1.5, count)
    packed = ops._batch_moments_local(mean_i, var_i, 20)
    torch.library.opcheck(ops._batch_moments_local.default, (mean_i, var_i, 20))
    torch.library.opcheck(ops._batch_moments_merge.default, (torch.stack([packed, packed]), torch.float32))
    torch.library.opcheck(ops._blend_moments.default,
                          (mean_i, var_i, inp.source_mean, inp.source_var, blend, *batch, 20, 2.0, 1e-5))
    args = (mean_i, var_i, inp.weight, inp.source_mean, inp.source_var, blend, *batch, mean_i, var_i,
            20, None, 1e-5)
    torch.library.opcheck(ops._dabn_backward_batch_terms.default, args)
    terms = torch.zeros(2 * c, device=DEVICE, dtype=torch.float64)
    torch.library.opcheck(ops._dabn_backward_coefficients.default, (*args, terms))


def step_opcheck(rep: Report) -> None:
    for be in backends_here():
        for layout in ("nchw", "channels_last"):
            rep.case(f"opcheck public ops backend={be} {layout}", opcheck_public, be, layout)
    for layout in ("nchw", "channels_last"):
        rep.case(f"opcheck kernel ops on {DEVICE} {layout}", opcheck_kernel_ops, layout)


# ---------------------------------------------------------------- sync debug
@contextlib.contextmanager
def no_host_sync():
    """Inside, any host sync raises (``torch.cuda.set_sync_debug_mode("error")``, after a
    synchronize so that earlier work cannot trip it); the mode is reset on exit."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def no_sync_after_warmup(be: str) -> None:
    """FusedDABN forward (both decisions) + backward, and the functional ops, with
    torch.cuda.set_sync_debug_mode("error") after two warm-up rounds (on CPU, --smoke, the
    rounds alone)."""
    torch.manual_seed(0)
    net = dk.convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                               torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                               torch.nn.BatchNorm2d(16)), backend=be).to(DEVICE)
    x = torch.randn(8, 3, 20, 20, device=DEVICE)
    layers = dabn_layers(net)

    def round_():
        for single in (True, False):
            for layer in layers:
                layer.set_decision(single)
            net(x).square().mean().backward()
        stats = dk.instance_stats(x, backend=be)
        dk.diversity_score(x, torch.zeros(3, device=DEVICE), backend=be)
        return stats
    round_(), round_()
    if SMOKE:
        return  # the code path only: no device to sync with on CPU
    with no_host_sync():
        round_()


def step_syncdebug(rep: Report) -> None:
    for be in backends_here():
        rep.case(f"{be}: no host sync after warm-up", no_sync_after_warmup, be)


# ---------------------------------------------------------------- adapters (issue 20 on the device)
def _adapter_model(seed: int = 0) -> torch.nn.Module:
    """Three BatchNorm layers (the first one affine in the image, so a dispersion score layer
    comes after it), source statistics and affine parameters away from identity."""
    torch.manual_seed(seed)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                      nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return perturb_batchnorms(m)


def _adapter_stream(n: int = 6) -> list[torch.Tensor]:
    """Single-domain, two-domain and near-duplicate (label-sorted-like) batches, on CPU."""
    g = torch.Generator().manual_seed(7)
    hw = shape((16, 16), (10, 10))
    out = []
    for t in range(n):
        x = torch.randn(16, 3, *hw, generator=g)
        if t % 3 == 1:
            x[8:] = x[8:] * 3 + 2                      # two domains
        elif t % 3 == 2:
            x = x[:1] + 0.05 * x                       # 16 near-copies of one image
        out.append(x)
    return out


def _make_adapter(kind: str, be: str, device: str, cuts=None):
    model = _adapter_model().to(device)
    if kind == "dyn":
        return dk.DYN(model, backend=be)
    high, low, skew = cuts
    probe = dk.ClassProbe(16, 5)
    g = torch.Generator().manual_seed(3)
    probe.weight.copy_(torch.randn(32, 5, generator=g))
    rule = dk.ThresholdSelector(high, low=low, skew_cut=skew)
    return dk.DATTA(model, score_mode="dispersion", selector=rule, daft=kind == "datta_daft", lr=1e-3,
                    backend=be, class_probe=probe.to(device))


def _gap_cut(values: list[float], below: int = 1) -> float:
    """A cut in the middle of the widest gap between sorted values with at least ``below``
    values under it and one above (far from every value)."""
    v = sorted(values)
    i = max(range(below - 1, len(v) - 1), key=lambda k: v[k + 1] - v[k])
    return (v[i] + v[i + 1]) / 2


def _datta_cuts(stream) -> tuple[float, float, float]:
    """Score and spread cuts that give this stream all three decisions, each in the widest
    gap of the stream's own values (so a last-bit difference between devices cannot flip a
    decision): the score cut leaves at least two batches below it (then ``multiple`` above),
    the spread cut splits those into ``skewed`` and ``single``."""
    probe = _make_adapter("datta_free", "reference", "cpu", (1e9, -1e9, 1e-9))
    scores, spreads = [], []
    for x in stream:
        probe(x)
        scores.append(float(probe.last_score))
        spreads.append(float(probe.last_spread))
    high = _gap_cut(scores, below=2)
    return high, -1e9, _gap_cut([p for s, p in zip(scores, spreads) if s < high])


def adapter_vs_reference(kind: str, be: str) -> None:
    """DYN / DATTA (dispersion score, threshold + spread rule, class probe; DAFT off / on) on
    the device with backend ``be`` vs the same adapter on CPU with the reference backend:
    logits close and the same decision on every batch of a stream with all three kinds."""
    stream = _adapter_stream()
    cuts = None if kind == "dyn" else _datta_cuts(stream)
    want_a = _make_adapter(kind, "reference", "cpu", cuts)
    got_a = _make_adapter(kind, be, DEVICE, cuts)
    decisions = []
    for i, x in enumerate(stream):
        want = want_a(x)
        got = got_a(x.to(DEVICE))
        torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3,
                                   msg=lambda m, i=i: f"batch {i}: {m}")
        if kind != "dyn":
            assert got_a.last_decision == want_a.last_decision, (i, got_a.last_decision, want_a.last_decision)
            decisions.append(want_a.last_decision)
    if kind != "dyn":
        assert len(set(decisions)) == 3, decisions          # the stream exercised every decision
        assert (got_a.n_updates > 0) == (kind == "datta_daft") and got_a.n_updates == want_a.n_updates


def adapter_no_sync(kind: str, be: str) -> None:
    """The sync-free adapters (DYN; DATTA with a threshold rule and DAFT off) make no host sync
    after two warm-up batches (torch.cuda.set_sync_debug_mode("error"))."""
    stream = _adapter_stream()
    a = _make_adapter(kind, be, DEVICE, None if kind == "dyn" else _datta_cuts(stream))
    stream = [x.to(DEVICE) for x in stream]
    a(stream[0]), a(stream[1])
    if SMOKE:
        return
    with no_host_sync():
        for x in stream[2:]:
            a(x)


def cluster_labels_vs_cpu() -> None:
    """``cluster_labels`` on the device equals the CPU labels (checked against scipy by the
    tests) on random, planted, duplicated and zero rows, N = 1 .. 96, and makes no host sync."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for t in range(shape(200, 20)):
        n, c = int(torch.randint(1, 97, (1,), generator=g)), int(torch.randint(1, 33, (1,), generator=g))
        x = torch.randn(n, c, generator=g)
        cases.append(x.abs() + 0.1 if t % 2 else x)
    centres = torch.randn(4, 16, generator=g) * 10
    member = torch.tensor([2, 0, 0, 3, 1, 2, 3, 1, 0, 2, 1, 3])
    cases.append(centres[member] + 0.01 * torch.randn(12, 16, generator=g))
    zero_rows = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [1.0, 3.0]])
    cases += [torch.ones(4, 3), torch.zeros(5, 3), zero_rows]
    for i, x in enumerate(cases):
        want = dk.cluster_labels(x)
        got = dk.cluster_labels(x.to(DEVICE))
        assert torch.equal(got.cpu(), want), (i, got.tolist(), want.tolist())
    if SMOKE:
        return
    x = cases[0].to(DEVICE)
    dk.cluster_labels(x)
    with no_host_sync():
        dk.cluster_labels(x)


def step_adapters(rep: Report) -> None:
    rep.case(f"cluster_labels on {DEVICE} == cpu, no host sync", cluster_labels_vs_cpu)
    for be in backends_here():
        for kind in ("dyn", "datta_free", "datta_daft"):
            rep.case(f"{be}: {kind} adapter vs cpu reference", adapter_vs_reference, kind, be)
        for kind in ("dyn", "datta_free"):
            rep.case(f"{be}: {kind} adapter, no host sync after warm-up", adapter_no_sync, kind, be)


# ---------------------------------------------------------------- sanitizer workload
def sanitize_workload(be: str, layout: str, dt: torch.dtype) -> None:
    """Every kernel once on a shape with few planes (rows split, partials merged)."""
    s = shape((1, 3, 384, 320), (1, 3, 9, 9))
    inp = make_inputs(s, dtype=dt, device=DEVICE, layout=layout)
    x = inp.x if layout == "channels_last" else misaligned(inp.x)
    impl = get_backend(be).impl()
    dy = torch.randn_like(x)
    blend = torch.tensor([0.2, 0.3, 0.5], device=DEVICE)
    src = (inp.source_mean, inp.source_var, blend)
    y, mean_i, var_i = impl.dabn_forward(x, inp.weight, inp.bias, *src, 1.0, 1e-5)
    impl.dabn_normalize(x, inp.weight, inp.bias, *src, None, 1e-5, mean_i, var_i)
    impl.dabn_backward(dy, x, inp.weight, *src, 1.0, 1e-5, mean_i, var_i)
    impl.dabn_backward_sums(dy, x, mean_i)
    impl.dabn_backward_apply(dy, x, mean_i, mean_i, var_i, mean_i)
    impl.diversity_angles(x, inp.source_mean, mean_i.mean(0))
    impl.instance_stats(x)


def step_sanitize(rep: Report, backend: str) -> None:
    for layout in ("nchw", "channels_last"):
        for dt in (torch.float32, torch.bfloat16):
            rep.case(f"{backend} workload {layout} {dt}", sanitize_workload, backend, layout, dt)


STEPS = {"rows": step_rows, "repro": step_repro, "opcheck": step_opcheck, "syncdebug": step_syncdebug,
         "adapters": step_adapters}


def main(argv=None) -> int:
    global DEVICE, SMOKE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "sanitize"])
    p.add_argument("--backend", default="cuda", help="sanitize: the backend whose kernels run")
    p.add_argument("--smoke", action="store_true", help="CPU, small shapes (CI)")
    args = p.parse_args(argv)
    SMOKE = args.smoke
    DEVICE = "cpu" if SMOKE else "cuda"
    if not SMOKE and not torch.cuda.is_available():
        print("FAIL no CUDA device (use --smoke on CPU)")
        return 1
    rep = Report()
    if args.step == "sanitize":
        step_sanitize(rep, "cpu" if SMOKE and args.backend == "cuda" else args.backend)
    else:
        STEPS[args.step](rep)
    return rep.exit_code()


if __name__ == "__main__":
    sys.exit(main())
