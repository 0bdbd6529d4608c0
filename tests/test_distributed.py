"""DATTA across processes: 2 and 3 gloo ranks (spawned here, file:// rendezvous in tmp_path,
bounded waits) against one process on the concatenated batch.

Tolerances: fp32, 1e-5 relative (plus a small absolute floor for values near 0); decisions
identical.  Each scenario runs in one spawn of W processes (the imports dominate its time)."""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import datta_kernels as dk
from datta_kernels import ops
from datta_kernels.distributed import DistributedDATTA, SyncFusedDABN, convert_sync, merge_moments
from datta_kernels.nn import dabn_layers
from datta_kernels.surgery import convert_model
from datta_kernels.testing import close_process_group

from .test_adapt import tiny_resnet

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

RTOL, ATOL = 1e-5, 1e-6
BACKENDS = [b for b in ("reference", "cpu") if b in dk.available_backends()]
JOIN_TIMEOUT_S = 300     # a whole scenario, imports included, on a loaded 2-core machine


def _split(n_total: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n_total
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def _global_input(seed: int = 0, n: int = 7, c: int = 6, hw: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, hw, hw, generator=g) * 2 + 3


# ------------------------------------------------------------------ workers (run in children)
def _worker(rank: int, world: int, init: str, out: str, scenario: str, kw: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = globals()["_scenario_" + scenario](rank, world, **kw)
    except Exception as e:          # recorded for the parent to assert on
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    close_process_group()           # raises (the parent sees it) if the group would outlive us


def _layer(backend: str, preset: str, decision: str, c: int) -> dk.FusedDABN:
    torch.manual_seed(1)
    layer = dk.FusedDABN(c, preset=preset, backend=backend)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 0.3)
        layer.set_source_stats(torch.rand(c) * 2 + 2, torch.rand(c) * 3 + 1)
    layer.set_decision(decision)
    return layer


LAYER_CONFIGS = [  # (preset, decision, score mode)
    ("datta", "single", "dispersion"),      # batch statistics (w_b = 0.4)
    ("datta", "multiple", "pixel"),         # instance statistics with shrink, no batch term
    ("tbn", "single", "instance"),          # batch statistics only
]


def _scenario_layer(rank, world, sizes):
    """Every (backend, config) of the layer test in one spawn."""
    x_all = _global_input()
    grad_out = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(5))
    sl = _split(x_all.shape[0], sizes)[rank]
    out = {}
    for backend in BACKENDS:
        for preset, decision, score_mode in LAYER_CONFIGS:
            layer = convert_sync(_layer(backend, preset, decision, x_all.shape[1]))
            assert isinstance(layer, SyncFusedDABN) and layer.backend == backend
            layer.compute_score, layer.score_mode = True, score_mode
            x = x_all[sl].clone().requires_grad_(True)
            y = layer(x)
            (y * grad_out[sl]).sum().backward()
            out[backend, preset, decision, score_mode] = {
                "y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
                "score": layer.last_score, "per": layer.last_per_sample,
                "total": float(layer.last_global_batch),
                "score_call": layer.score(x_all[sl])}      # score() alone: also global
    # stream statistics (SPEC §3c) folded from the global batch: a few decisions in turn
    out["stream"] = _stream_steps(lambda layer: convert_sync(layer), x_all[sl])
    # channels_last in, channels_last out, same values (no grad: the backend's statistics)
    layer = convert_sync(_layer(BACKENDS[-1], "datta", "single", x_all.shape[1]))
    with torch.no_grad():
        y = layer(x_all[sl].contiguous(memory_format=torch.channels_last))
    out["channels_last"] = {"y": y, "cl": y.shape[0] == 0 or ops.is_channels_last(y)}
    return out


def _adapter(model, score_mode, backend, threshold, distributed, entropy_filter=None):
    cls = DistributedDATTA if distributed else dk.DATTA
    return cls(model, "datta", selector=dk.ThresholdSelector(threshold), daft=True, lr=5e-2,
               score_mode=score_mode, backend=backend, entropy_filter=entropy_filter)


def _stream(steps: int, n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 12, 12, generator=g) * (1 + 0.5 * (i % 2)) + 0.3 * i
            for i in range(steps)]


def _scenario_adapt(rank, world, sizes, backend, score_modes, threshold, steps, entropy_filter=None):
    out = {}
    for score_mode in score_modes:
        adapter = _adapter(tiny_resnet(0), score_mode, backend, threshold, True, entropy_filter)
        logits, scores, decisions = [], [], []
        for x in _stream(steps, sum(sizes)):
            logits.append(adapter(x[_split(x.shape[0], sizes)[rank]]))
            scores.append(adapter.last_score)
            decisions.append(adapter.last_decision)
        params = {k: v.detach().clone() for k, v in adapter.model.named_parameters()
                  if "bn" in k}
        out[score_mode] = {"logits": logits, "scores": scores, "decisions": decisions,
                           "params": params, "updates": adapter.n_updates}
    return out


def _scenario_mismatch(rank, world, what):
    c = 4 if (what == "channels" and rank == 1) else 3
    layer = SyncFusedDABN(c, process_group=None)
    dtype = torch.float64 if (what == "dtype" and rank == 1) else torch.float32
    layer = layer.to(dtype) if what == "dtype" else layer
    layer(torch.randn(2, c, 4, 4, dtype=dtype))
    return {"error": None}


_HELD = []


def _scenario_held_group(rank, world):
    """Keeps a reference to the default group past the teardown (what a module imported after
    init_process_group that binds group.WORLD does)."""
    _HELD.append(dist.group.WORLD)
    return {}


def _scenario_moments(rank, world):
    """gather_moments: bitwise-equal result on every rank."""
    from datta_kernels.distributed import gather_moments
    g = torch.Generator().manual_seed(rank)
    v = torch.randn(rank + 1, 5, generator=g) * 1e3 + 1e4
    count, mean, m2 = gather_moments(v)
    # converting an nn.SyncBatchNorm keeps its process group
    group = dist.new_group([0, 1, 2])
    bn = torch.nn.SyncBatchNorm(4, process_group=group)
    converted = convert_model(torch.nn.Sequential(bn))[0]
    kept = isinstance(converted, SyncFusedDABN) and converted.process_group is group
    return {"count": count, "mean": mean, "m2": m2, "kept_group": kept}


def _output_logits(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    return torch.randn(sum(sizes), 5, generator=g) * 3


def _scenario_output_spread(rank, world, cases):
    """DistributedDATTA's output check reads the global batch's spread (SPEC §4)."""
    adapter = DistributedDATTA(tiny_resnet(0), selector=dk.ThresholdSelector(1.0, low=0.5),
                               daft=False, score_mode="dispersion", output_spread_cut=0.5)
    return {"spreads": [adapter._output_spread(_output_logits(sizes)[_split(sum(sizes), sizes)[rank]])
                        for sizes in cases]}


# ------------------------------------------------------------------ the parent side
def _run(tmp_path, world: int, scenario: str, **kw) -> list[dict]:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.spawn(_worker, args=(world, init, str(out), scenario, kw), nprocs=world,
                   join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"scenario {scenario!r} did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(a, b, msg="", scaled=False):
    """1e-5 relative; ``scaled``: relative to the tensor's largest element (sums over the
    batch such as dgamma cancel, and their elements carry fp32 rounding of that size)."""
    atol = max(ATOL, RTOL * float(b.abs().max())) if scaled else ATOL
    torch.testing.assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m: f"{msg}: {m}")


STREAM_STEPS = ("single", "skewed", "multiple", "skewed")


def _stream_steps(wrap, x: torch.Tensor) -> list[dict]:
    """Outputs and stream buffers of a layer with stream statistics and a reset cut over
    STREAM_STEPS, each step on ``x`` scaled differently (``wrap``: the layer as run, synced or
    not)."""
    base = _layer(BACKENDS[-1], "datta", "single", x.shape[1])
    base.set_stream(0.3, reset=1.0)      # steps 1 and 3 restart the stream (divergence > 1), step 0 folds
    layer = wrap(base)
    assert (layer.stream_momentum, layer.stream_reset) == (0.3, 1.0)
    out = []
    for k, decision in enumerate(STREAM_STEPS):
        layer.set_decision(decision)
        with torch.no_grad():
            y = layer(x * (1 + k) + k)
        out.append({"y": y, "mean": layer.stream_mean.clone(), "var": layer.stream_var.clone()})
    return out


CASES = [  # (world, sizes): even, uneven, an empty rank, 3 ranks with an empty middle rank
    (2, [4, 3]), (2, [7, 0]), (3, [3, 0, 4]), (3, [1, 4, 2])]


@pytest.mark.parametrize("world,sizes", CASES)
def test_layer_matches_single_process(tmp_path, world, sizes, request):
    """Forward, dx, dgamma, dbeta, score and per-sample score of SyncFusedDABN on W ranks ==
    FusedDABN on the concatenated batch, for each CPU backend and three configurations."""
    request.node.user_properties += [("backend", b) for b in BACKENDS]   # counted (conftest)
    results = _run(tmp_path, world, "layer", sizes=sizes)
    for r in results:
        assert "error" not in r, r.get("error")
    for backend in BACKENDS:
        for config in LAYER_CONFIGS:
            _check_layer([r[(backend, *config)] for r in results], backend, *config)
    assert all(r["channels_last"]["cl"] for r in results)
    for k, want in enumerate(_stream_steps(lambda layer: layer, _global_input())):
        _close(torch.cat([r["stream"][k]["y"] for r in results]), want["y"], f"stream step {k}")
        for r in results:       # every rank folds the global batch: the same buffers
            _close(r["stream"][k]["mean"], want["mean"], f"stream mean step {k}")
            _close(r["stream"][k]["var"], want["var"], f"stream var step {k}")
    with torch.no_grad():
        y = _layer(BACKENDS[-1], "datta", "single", 6)(_global_input())
    _close(torch.cat([r["channels_last"]["y"] for r in results]), y, "channels_last", scaled=True)


def _check_layer(results, backend, preset, decision, score_mode):
    what = f"{backend}/{preset}/{decision}/{score_mode}"
    x_all = _global_input()
    grad_out = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(5))
    layer = _layer(backend, preset, decision, x_all.shape[1])
    layer.compute_score, layer.score_mode = True, score_mode
    x = x_all.clone().requires_grad_(True)
    y = layer(x)
    (y * grad_out).sum().backward()
    _close(torch.cat([r["y"] for r in results]), y.detach(), f"{what} forward")
    _close(torch.cat([r["dx"] for r in results]), x.grad, f"{what} dx", scaled=True)
    _close(sum(r["dw"] for r in results), layer.weight.grad, f"{what} dweight", scaled=True)
    _close(sum(r["db"] for r in results), layer.bias.grad, f"{what} dbias", scaled=True)
    _close(torch.cat([r["per"] for r in results]), layer.last_per_sample, f"{what} per-sample score")
    for r in results:
        _close(r["score"], layer.last_score, f"{what} score")
        _close(r["score_call"], layer.last_score, f"{what} score()")
        assert r["score"].equal(results[0]["score"])      # bitwise the same on every rank
        assert r["total"] == x_all.shape[0]


SCORE_MODES = ["dispersion", "pixel", "instance"]


@pytest.mark.parametrize("world,sizes", [(2, [5, 3]), (3, [4, 0, 4])])
def test_adapter_matches_single_process(tmp_path, world, sizes, request):
    """DistributedDATTA on W ranks == DATTA on the concatenated batch, 5 DAFT steps, every
    score mode: logits, scores (bitwise equal across ranks), decisions, parameters."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    request.node.user_properties.append(("backend", backend))   # counted (conftest)
    steps, threshold = 5, 1e9          # every batch "single": 5 DAFT steps
    results = _run(tmp_path, world, "adapt", sizes=sizes, backend=backend,
                   score_modes=SCORE_MODES, threshold=threshold, steps=steps)
    for r in results:
        assert "error" not in r, r.get("error")
    for mode in SCORE_MODES:
        _check_adapter([r[mode] for r in results], mode, backend, steps, threshold, sizes)


def test_adapter_entropy_filter_matches_single_process(tmp_path, request):
    """With EATA's reliable-sample filter (SPEC §4) the loss is the sum of the kept samples'
    entropies over the global batch size: DistributedDATTA on 2 ranks == DATTA on the whole
    batch, with a bound that keeps some samples of the first batch and drops others."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    request.node.user_properties.append(("backend", backend))   # counted (conftest)
    sizes, steps = [5, 3], 4
    with torch.no_grad():
        p = tiny_resnet(0)(_stream(1, sum(sizes))[0]).softmax(1)
    h = -(p * p.log()).sum(1) / math.log(p.shape[1])          # entropy in units of ln K
    bound = float(h.median())
    assert 0 < int((h < bound).sum()) < len(h)                  # the filter splits the batch
    results = _run(tmp_path, 2, "adapt", sizes=sizes, backend=backend, score_modes=("dispersion",),
                   threshold=1e9, steps=steps, entropy_filter=bound)
    for r in results:
        assert "error" not in r, r.get("error")
    _check_adapter([r["dispersion"] for r in results], "dispersion", backend, steps, 1e9, sizes, bound)


def _check_adapter(results, score_mode, backend, steps, threshold, sizes, entropy_filter=None):
    ref = _adapter(tiny_resnet(0), score_mode, backend, threshold, False, entropy_filter)
    for i, x in enumerate(_stream(steps, sum(sizes))):
        logits = ref(x)
        _close(torch.cat([r["logits"][i] for r in results]), logits,
               f"{score_mode} logits step {i}", scaled=True)
        for r in results:
            assert r["decisions"][i] == ref.last_decision
            assert r["scores"][i] == results[0]["scores"][i]
            assert r["scores"][i] == pytest.approx(ref.last_score, rel=RTOL, abs=ATOL)
    assert ref.n_updates == steps and all(r["updates"] == steps for r in results)
    params = {k: v for k, v in ref.model.named_parameters() if "bn" in k}
    for r in results:
        for k, v in params.items():
            _close(r["params"][k], v.detach(), f"{score_mode} parameter {k}")
            assert r["params"][k].equal(results[0]["params"][k])   # identical on every rank
    # the updates moved the parameters (the comparison is not vacuous)
    init = {k: v for k, v in tiny_resnet(0).named_parameters() if "bn" in k}
    assert any((params[k] - init[k]).abs().max() > 1e-4 for k in params)


def test_adapter_decisions_follow_global_score(tmp_path):
    """A threshold between the scores: decisions switch, and all ranks agree."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    probe = _adapter(tiny_resnet(0), "dispersion", backend, 1e9, False)
    scores = []
    for x in _stream(4, 6):
        probe(x)
        scores.append(probe.last_score)
    threshold = sorted(scores)[1] + 0.5 * (sorted(scores)[2] - sorted(scores)[1])
    ref = _adapter(tiny_resnet(0), "dispersion", backend, threshold, False)
    ref_logits, ref_decisions = [], []
    for x in _stream(4, 6):
        ref_logits.append(ref(x))
        ref_decisions.append(ref.last_decision)
    results = _run(tmp_path, 2, "adapt", sizes=[2, 4], backend=backend,
                   score_modes=["dispersion"], threshold=threshold, steps=4)
    results = [r["dispersion"] if "error" not in r else r for r in results]
    assert set(ref_decisions) == {"single", "multiple"}
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["decisions"] == ref_decisions
    for i, logits in enumerate(ref_logits):       # "multiple" batches run the no-grad path
        _close(torch.cat([r["logits"][i] for r in results]), logits, f"logits step {i}",
               scaled=True)


@pytest.mark.parametrize("what", ["channels", "dtype"])
def test_mismatch_between_ranks_is_an_error(tmp_path, what):
    results = _run(tmp_path, 2, "mismatch", what=what)
    for r in results:
        assert r["error"] is not None and "ranks disagree" in r["error"]


def test_teardown_refuses_a_group_that_outlives_it(tmp_path):
    """close_process_group raises when something still holds the default group after
    destroy_process_group (it would be torn down during interpreter shutdown, issue 22); every
    other scenario passing through it shows that none of them, DAFT's optimizer included
    (torch.optim imports torch.distributed.nn), leaves such a reference."""
    with pytest.raises(mp.ProcessRaisedException, match="still referenced"):
        _run(tmp_path, 2, "held_group")


def test_gathered_moments_bitwise_equal_and_exact(tmp_path):
    results = _run(tmp_path, 3, "moments")
    vals = torch.cat([torch.randn(r + 1, 5, generator=torch.Generator().manual_seed(r)) * 1e3 + 1e4
                      for r in range(3)]).double()
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["kept_group"]
        assert r["mean"].equal(results[0]["mean"]) and r["m2"].equal(results[0]["m2"])
        assert float(r["count"]) == vals.shape[0]
        torch.testing.assert_close(r["mean"], vals.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(r["m2"], vals.var(0, unbiased=False) * vals.shape[0],
                                   rtol=1e-9, atol=0)


# ------------------------------------------------------------------ in-process checks
def test_merge_moments_skips_empty_rows():
    v = torch.randn(6, 3, dtype=torch.float64)
    rows = torch.stack([
        torch.cat([torch.tensor([0.0]), torch.zeros(3), torch.zeros(3)]),
        torch.cat([torch.tensor([4.0]), v[:4].mean(0), (v[:4] - v[:4].mean(0)).square().sum(0)]),
        torch.cat([torch.tensor([0.0]), torch.zeros(3), torch.zeros(3)]),
        torch.cat([torch.tensor([2.0]), v[4:].mean(0), (v[4:] - v[4:].mean(0)).square().sum(0)]),
    ])
    count, mean, m2 = merge_moments(rows)
    assert float(count) == 6
    torch.testing.assert_close(mean, v.mean(0))
    torch.testing.assert_close(m2, (v - v.mean(0)).square().sum(0))


def test_uninitialised_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    layer = SyncFusedDABN(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        layer(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDATTA(tiny_resnet(0))


def test_state_dict_is_plain_batchnorm_compatible():
    model = tiny_resnet(0)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    synced = convert_model(model, process_group=None)
    assert all(isinstance(m, SyncFusedDABN) for m in dabn_layers(synced))
    result = synced.load_state_dict(plain, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(dk.convert_model(tiny_resnet(0)).state_dict()) == set(synced.state_dict())


def test_output_check_reads_the_global_spread(tmp_path):
    """The output check's spread on 2 ranks, uneven and with an empty slice, is the spread of
    the concatenated logits (float64 merge vs float32 two-pass: 1e-5) and bitwise the same on
    every rank, so every rank releases the same batches."""
    cases = [[5, 3], [6, 0], [1, 1]]
    results = _run(tmp_path, 2, "output_spread", cases=cases)
    for r in results:
        assert "error" not in r, r.get("error")
    for i, sizes in enumerate(cases):
        want = dk.prediction_spread(_output_logits(sizes))
        assert 0.05 < float(want) < 1
        for r in results:
            assert r["spreads"][i].dtype == torch.float32 and r["spreads"][i].dim() == 0
            assert torch.equal(r["spreads"][i], results[0]["spreads"][i])
            torch.testing.assert_close(r["spreads"][i], want, rtol=1e-5, atol=1e-6)
