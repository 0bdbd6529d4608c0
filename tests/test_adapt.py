"""DATTA (SPEC §4) and the baselines: decisions, DAFT updates, reset, resume, syncs."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import datta_kernels as dk
from datta_kernels import DATTA, KDESelector, ThresholdSelector
from datta_kernels.adapt import TBN, BNAdapt, Source, Tent, softmax_entropy
from datta_kernels.nn import dabn_layers
from datta_kernels.testing import tol


def tiny_resnet(seed: int = 0, classes: int = 5) -> nn.Module:
    """A small residual CNN in eval mode with trained-looking BN statistics (3 BN layers)."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(x + self.bn2(self.conv2(x)))
            return self.fc(torch.relu(self.bn3(self.conv3(x))).mean(dim=(2, 3)))

    model = Net().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        for _ in range(4):
            model(torch.randn(16, 3, 12, 12))
    return model.eval()


def make_stream(n: int = 24, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Alternating single-domain batches (one corruption: contrast + shift for the whole batch)
    and mixed batches (a different corruption per sample), (batch, 3, 12, 12) each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(batch, 3, 12, 12, generator=g)
        if i % 2 == 0:
            scale = 0.5 + torch.rand(1, generator=g)
            shift = torch.randn(1, 3, 1, 1, generator=g)
        else:
            scale = 0.3 + 2 * torch.rand(batch, 1, 1, 1, generator=g)
            shift = 1.5 * torch.randn(batch, 3, 1, 1, generator=g)
        out.append(x * scale + shift)
    return out


def affine_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([torch.cat([m.weight, m.bias]) for m in dabn_layers(model)]).detach().clone()


def threshold_for(stream) -> float:
    """A threshold splitting the stream's scores in two (so both decisions occur)."""
    probe = DATTA(tiny_resnet(), selector=ThresholdSelector(0.0), daft=False)
    scores = []
    for x in stream:
        probe(x)
        scores.append(probe.last_score)
    return float(torch.tensor(scores).median())


def seeded_kde(stream) -> KDESelector:
    """A KDESelector whose history is already clearly bimodal with its valley near the median
    score of ``stream`` (a random-init CNN's scores alone are rarely bimodal in a few batches),
    so that the stream produces both decisions through the real KDE rule."""
    v = threshold_for(stream)
    rng = np.random.default_rng(0)
    history = np.r_[rng.normal(0.5 * v, 0.08 * v, 100), rng.normal(1.5 * v, 0.08 * v, 100)]
    sel = KDESelector(window=1000, warmup=8)
    sel.load_state_dict({"kind": "kde", "window": 1000, "warmup": 8, "history": history.tolist()})
    return sel


def test_reference_and_auto_agree_over_a_stream():
    stream = make_stream(30)
    selector = seeded_kde(stream)
    adapters = [DATTA(tiny_resnet(), selector=copy.deepcopy(selector), backend=b, lr=1e-2)
                for b in ("reference", "auto")]
    for x in stream:
        ref_logits, auto_logits = (a(x) for a in adapters)
        assert adapters[0].last_decision == adapters[1].last_decision
        torch.testing.assert_close(auto_logits, ref_logits, **tol(torch.float32, 10))
    assert 0 < adapters[0].n_updates == adapters[1].n_updates < len(stream)
    torch.testing.assert_close(affine_params(adapters[1].model), affine_params(adapters[0].model),
                               **tol(torch.float32, 10))


def test_daft_updates_exactly_on_single_batches():
    stream = make_stream(12)
    adapter = DATTA(tiny_resnet(), selector=ThresholdSelector(threshold_for(stream)), lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in adapter.model.named_parameters()
              if not p.requires_grad}
    assert set(frozen) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight", "fc.bias"}
    decisions = []
    for x in stream:
        before = affine_params(adapter.model)
        adapter(x)
        changed = not torch.equal(before, affine_params(adapter.model))
        decisions.append(adapter.last_decision)
        assert changed == (adapter.last_decision == "single")
    assert "single" in decisions and "multiple" in decisions
    assert adapter.n_updates == decisions.count("single") and adapter.n_batches == len(stream)
    for n, p in adapter.model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)


def assert_one_entropy_step(adapter, twin, want):
    """The adapter's affine parameters equal ``twin``'s after one SGD-Nesterov step (lr 1e-2)
    on the mean entropy of ``twin``'s logits ``want``."""
    opt = torch.optim.SGD([p for m in dabn_layers(twin) for p in (m.weight, m.bias)], lr=1e-2,
                          momentum=0.9, nesterov=True)
    softmax_entropy(want).mean().backward()
    opt.step()
    torch.testing.assert_close(affine_params(adapter.model), affine_params(twin), rtol=0, atol=0)


@pytest.mark.parametrize("decision,selector", [("single", ThresholdSelector(1e9)),
                                                ("multiple", ThresholdSelector(-1e9)),
                                                ("skewed", ThresholdSelector(1e9, low=1e8))])
def test_daft_multiple_steps_on_single_and_multiple_batches_only(decision, selector):
    """``daft_multiple=True``: the entropy step also on ``multiple`` batches, on their blend
    (the logits and the step equal a twin forward with that decision), never on ``skewed``."""
    x = make_stream(1)[0]
    model = tiny_resnet()
    adapter = DATTA(copy.deepcopy(model), selector=selector, lr=1e-2, daft_multiple=True)
    assert adapter.daft_multiple and "daft_multiple=True" in repr(adapter)
    plain = DATTA(copy.deepcopy(model), selector=selector, lr=1e-2)
    assert not plain.daft_multiple
    before = affine_params(adapter.model)
    logits = adapter(x)
    assert adapter.last_decision == decision
    assert adapter.n_updates == (decision != "skewed")
    plain(x)
    assert plain.n_updates == (decision == "single")
    twin = dk.convert_model(copy.deepcopy(model), "datta")
    for layer in dabn_layers(twin):
        layer.set_decision(decision)
    want = twin(x)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    if decision == "skewed":
        assert torch.equal(before, affine_params(adapter.model))
        return
    assert_one_entropy_step(adapter, twin, want)


@pytest.mark.parametrize("decision,selector", [("single", ThresholdSelector(1e9)),
                                                ("multiple", ThresholdSelector(-1e9)),
                                                ("skewed", ThresholdSelector(1e9, low=1e8))])
def test_daft_pre_single_renormalises_the_layers_before_the_score_layer(decision, selector):
    """``daft_pre_single=True`` (SPEC §4): DAFT's second forward of a batch decided ``single``
    runs the layers before the score layer on their ``single`` blend, so the logits and the
    step equal a twin with every layer on ``single``; a ``multiple`` batch (fine-tuned with
    ``daft_multiple``) and a ``skewed`` one keep them on ``multiple``, and after every batch
    they are back on ``multiple`` for the next batch's first forward."""
    x = make_stream(1)[0]
    model = tiny_resnet()
    adapter = DATTA(copy.deepcopy(model), selector=selector, lr=1e-2, score_mode="dispersion",
                    daft_multiple=True, daft_pre_single=True)
    assert adapter.daft_pre_single and "daft_pre_single=True" in repr(adapter)
    logits = adapter(x)
    assert adapter.last_decision == decision and adapter.score_layer == "bn2"
    pre = adapter.layers[0]
    assert not bool(pre.decision) and not bool(pre.skewed)          # back on "multiple"
    twin = dk.convert_model(copy.deepcopy(model), "datta")
    layers = dabn_layers(twin)
    for layer in layers[1:]:
        layer.set_decision(decision)
    layers[0].set_decision("single" if decision == "single" else "multiple")
    want = twin(x)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    if decision == "single":       # the layers before the score layer did change the result
        plain = DATTA(copy.deepcopy(model), selector=selector, lr=1e-2, score_mode="dispersion")
        assert not plain.daft_pre_single
        assert not torch.allclose(plain(x), logits, rtol=0, atol=1e-6)
    if decision == "skewed":
        assert adapter.n_updates == 0
        return
    assert_one_entropy_step(adapter, twin, want)
    if decision == "single":    # a decision written into them by hand between batches stays
        pre.set_decision("skewed")
        adapter(x)
        assert adapter.n_updates == 2 and not bool(pre.decision) and bool(pre.skewed)


def test_daft_pre_single_needs_daft():
    with pytest.raises(ValueError, match="needs daft=True"):
        DATTA(tiny_resnet(), selector=ThresholdSelector(0.0), daft=False, daft_pre_single=True)


def test_entropy_filter_step_matches_a_float64_rendering():
    """``entropy_filter=e0`` (EATA's reliable-sample filter, SPEC §4): the step is SGD-Nesterov on
    ``(1/N) sum_i H_i [H_i < e0 ln K]``, here rendered in float64 from the softmax by hand on a
    float64 twin; the bound sits at the batch's median entropy (between two samples), so the
    filter keeps some samples and drops others.  A bound below every entropy leaves the
    parameters where they were."""
    x = make_stream(1)[0]
    model = tiny_resnet()
    twin = dk.convert_model(copy.deepcopy(model), "datta").double()
    for layer in dabn_layers(twin):
        layer.set_decision("single")
    logits = twin(x.double())
    p = logits.softmax(1)
    ent = -(p * p.log()).sum(1)
    k = logits.shape[1]
    mid = ent.detach().sort().values[len(x) // 2 - 1:len(x) // 2 + 1]   # a bound between two samples
    e0 = float(mid.mean()) / np.log(k)
    keep = ent < e0 * np.log(k)
    assert 0 < int(keep.sum()) < len(x)
    adapter = DATTA(copy.deepcopy(model), selector=ThresholdSelector(1e9), lr=1e-2, entropy_filter=e0)
    assert adapter.entropy_filter == e0 and f"entropy_filter={e0:g}" in repr(adapter)
    out = adapter(x)
    torch.testing.assert_close(out.double(), logits.detach(), **tol(torch.float32, 10))
    opt = torch.optim.SGD([q for m in dabn_layers(twin) for q in (m.weight, m.bias)], lr=1e-2,
                          momentum=0.9, nesterov=True)
    ((ent * keep).sum() / len(x)).backward()
    opt.step()
    torch.testing.assert_close(affine_params(adapter.model).double(), affine_params(twin),
                               rtol=1e-5, atol=1e-6)
    # the unfiltered step differs (the filter did something)
    plain = DATTA(copy.deepcopy(model), selector=ThresholdSelector(1e9), lr=1e-2)
    plain(x)
    assert not torch.allclose(affine_params(plain.model), affine_params(adapter.model), rtol=0, atol=1e-7)
    none = DATTA(copy.deepcopy(model), selector=ThresholdSelector(1e9), lr=1e-2, entropy_filter=1e-6)
    before = affine_params(none.model)
    none(x)
    assert none.n_updates == 1 and torch.equal(before, affine_params(none.model))


@pytest.mark.parametrize("bad", [0, -0.4, float("nan"), float("inf"), True, "0.4"])
def test_entropy_filter_bad_values(bad):
    with pytest.raises(ValueError, match="entropy_filter must be a positive number"):
        DATTA(tiny_resnet(), selector=ThresholdSelector(0.0), entropy_filter=bad)


def test_entropy_filter_needs_daft():
    with pytest.raises(ValueError, match="needs an updating adapter"):
        DATTA(tiny_resnet(), selector=ThresholdSelector(0.0), daft=False, entropy_filter=0.4)


def test_daft_multiple_needs_daft():
    with pytest.raises(ValueError, match="needs daft=True"):
        DATTA(tiny_resnet(), selector=ThresholdSelector(0.0), daft=False, daft_multiple=True)


def test_predict_then_update_and_the_step():
    """The logits are those of the pre-update model; the step is SGD-Nesterov on the mean
    entropy of exactly those logits."""
    x = make_stream(1)[0]
    adapter = DATTA(tiny_resnet(), selector=ThresholdSelector(1e9), lr=1e-2)  # always single
    twin = copy.deepcopy(adapter.model)
    for layer in dabn_layers(twin):
        layer.set_decision("single")
    logits = adapter(x)
    want = twin(x)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert adapter.last_decision == "single" and not logits.requires_grad
    assert_one_entropy_step(adapter, twin, want)


def test_daft_runs_a_single_batch_again_with_a_graph_after_the_decision():
    """With the score layer past the first layer (the dispersion score), DATTA takes the
    forward without a graph, and a batch decided ``single`` under DAFT is forwarded again with
    one: the logits and the step equal a forward recorded from the start with the layers before
    the score layer on ``multiple``; the layers up to the score layer ran twice; the selector is asked once
    per batch (a KDE window grows by one)."""
    x = make_stream(1)[0]
    model = tiny_resnet()
    adapter = DATTA(copy.deepcopy(model), selector=ThresholdSelector(1e9), lr=1e-2, score_mode="dispersion",
                    score_layer="bn2")
    calls = []
    for name in ("bn1", "bn2", "bn3"):
        getattr(adapter.model, name).register_forward_hook(
            lambda m, i, o, name=name: calls.append((name, torch.is_grad_enabled())))
    logits = adapter(x)
    pre = adapter._score_at
    assert pre == 1 and adapter.last_decision == "single" and adapter.n_updates == 1
    # the first forward stops inside the score layer (its hook never runs), the second records
    assert calls == [("bn1", False), ("bn1", True), ("bn2", True), ("bn3", True)]
    twin = dk.convert_model(copy.deepcopy(model), "datta")
    for i, layer in enumerate(dabn_layers(twin)):
        layer.set_decision("multiple" if i < pre else "single")
    want = twin(x)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert_one_entropy_step(adapter, twin, want)
    kde = DATTA(tiny_resnet(), selector=KDESelector(window=50, warmup=2), score_mode="dispersion")
    for k, xb in enumerate(make_stream(4), 1):
        kde(xb)
        assert kde.selector.count == k


def test_multiple_batches_build_no_graph():
    seen = []
    adapter = DATTA(tiny_resnet(), selector=ThresholdSelector(-1.0))  # always multiple
    adapter.model.bn3.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    before = affine_params(adapter.model)
    adapter(make_stream(1)[0])
    assert adapter.last_decision == "multiple" and seen == [False]
    assert torch.equal(before, affine_params(adapter.model)) and torch.is_grad_enabled()


def test_episodic_reset():
    stream = make_stream(6)
    fresh_model = tiny_resnet()
    adapter = DATTA(copy.deepcopy(fresh_model), selector=ThresholdSelector(1e9), lr=1e-2,
                    episodic=True)
    start = affine_params(adapter.model)
    for x in stream:
        got = adapter(x)
        once = DATTA(copy.deepcopy(fresh_model), selector=ThresholdSelector(1e9), lr=1e-2)
        torch.testing.assert_close(got, once(x), rtol=0, atol=0)
    assert not torch.equal(start, affine_params(adapter.model))   # the last batch's step
    adapter.reset()
    torch.testing.assert_close(affine_params(adapter.model), start, rtol=0, atol=0)
    assert not adapter.optimizer.state
    kde = DATTA(tiny_resnet(), selector=KDESelector(window=50, warmup=5))
    for x in stream:
        kde(x)
    kde.reset()
    assert kde.selector.count == 0 and kde.last_decision is None


@pytest.mark.parametrize("daft", [True, False])
def test_resume_from_state_dict_reproduces_predictions(daft):
    stream = make_stream(26)
    selector = seeded_kde(stream)
    make = lambda: DATTA(tiny_resnet(), selector=copy.deepcopy(selector), daft=daft, lr=1e-2)
    a = make()
    for x in stream[:16]:
        a(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert b.selector.count == 216 and b.n_batches == 16
    decisions = []
    for x in stream[16:]:
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        assert a.last_decision == b.last_decision
        decisions.append(a.last_decision)
    assert len(set(decisions)) == 2 and (a.n_updates > 0) == daft
    torch.testing.assert_close(affine_params(b.model), affine_params(a.model), rtol=0, atol=0)


def test_threshold_without_daft_is_sync_free(monkeypatch):
    stream = make_stream(4)
    t = threshold_for(stream)
    adapter = DATTA(tiny_resnet(), selector=ThresholdSelector(t), daft=False)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the adapter step")

    for x in stream:
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, no_sync)
            adapter(x)
        assert adapter._last_decision_t is not None
        assert adapter.last_decision == ("single" if adapter.last_score < t else "multiple")


def test_baseline_by_row_name():
    """``baseline(name, ...)`` builds the row's class; only Tent takes the rate; a bad name is
    refused by name."""
    from datta_kernels.adapt import BASELINES, DYN, baseline
    assert BASELINES == {"source": Source, "tbn": TBN, "bn_adapt": BNAdapt, "tent": Tent, "dyn": DYN}
    model = tiny_resnet()
    for name, cls in BASELINES.items():
        a = baseline(name, copy.deepcopy(model), lr=3e-3, backend="reference")
        assert type(a) is cls
        assert (a.optimizer.param_groups[0]["lr"] == 3e-3) if name == "tent" else a.optimizer is None
    assert baseline("dyn", copy.deepcopy(model), lr=1.0).source_rate == 0.8
    with pytest.raises(ValueError, match="unknown baseline 'datta'.*source, tbn"):
        baseline("datta", model, lr=1e-3)


def test_baselines():
    stream = make_stream(4)
    model = tiny_resnet()
    src, tbn, bna = (cls(copy.deepcopy(model)) for cls in (Source, TBN, BNAdapt))
    tent = Tent(copy.deepcopy(model), lr=1e-2)
    twin = dk.convert_model(copy.deepcopy(model), "tbn")   # tent's model before each step
    start = affine_params(tent.model)
    for x in stream:
        torch.testing.assert_close(src(x), model(x), **tol(torch.float32, 5))
        torch.testing.assert_close(tbn(x), dk.convert_model(copy.deepcopy(model), "tbn")(x),
                                   **tol(torch.float32))
        torch.testing.assert_close(bna(x), dk.convert_model(copy.deepcopy(model), "bn_adapt")(x),
                                   **tol(torch.float32))
        torch.testing.assert_close(tent(x), twin(x), **tol(torch.float32))
        twin.load_state_dict(tent.model.state_dict())
    assert tent.n_updates == tent.n_batches == len(stream)
    assert not torch.equal(start, affine_params(tent.model))
    for a in (src, tbn, bna):
        assert a.optimizer is None and a.n_updates == 0
    for a in (src, tbn, bna, tent):
        assert a.last_decision is None and a.last_score is None
    assert [a.layers[0].preset for a in (src, tbn, bna, tent)] == ["source", "tbn", "bn_adapt", "tbn"]


def test_preset_none_keeps_layer_configuration():
    model = dk.convert_model(tiny_resnet(), weights=((0.5, 0.5, 0.0), (0.9, 0.1, 0.0)),
                             backend="reference")
    kept = DATTA(model, preset=None, backend=None, daft=False)
    assert kept.layers[0].preset == "custom" and kept.layers[0].backend == "reference"
    again = DATTA(kept.model, preset="tbn", daft=False)
    assert again.layers[0].preset == "tbn" and again.layers[0].backend == "auto"


def test_bad_arguments():
    with pytest.raises(ValueError, match="no nn.BatchNorm2d"):
        DATTA(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="unknown preset"):
        DATTA(tiny_resnet(), preset="dat")
    with pytest.raises(ValueError, match="sum to 1"):
        DATTA(tiny_resnet(), weights=((0.6, 0.6, 0.0), (1.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="affine"):
        DATTA(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    with pytest.raises(ValueError, match="score_layer"):
        DATTA(tiny_resnet(), score_layer="fc")
    with pytest.raises(ValueError, match="score_mode"):
        DATTA(tiny_resnet(), score_mode="pixels")
    with pytest.raises(TypeError, match="selector"):
        DATTA(tiny_resnet(), selector="valley")


@pytest.mark.cuda
def test_cuda_matches_cpu_and_threshold_path_never_syncs():
    stream = make_stream(6)
    t = threshold_for(stream)
    model = tiny_resnet()
    cpu = DATTA(copy.deepcopy(model), selector=ThresholdSelector(t), daft=False)
    gpu = DATTA(copy.deepcopy(model).cuda(), selector=ThresholdSelector(t), daft=False)
    for x in stream:
        want = cpu(x)
        x = x.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = gpu(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got.cpu(), want, **tol(torch.float32, 10))
        assert gpu.last_decision == cpu.last_decision


def test_datta_around_a_compiled_model():
    """DATTA(torch.compile(model)): with a device-side decision (threshold, daft=False) the
    whole model stays one graph while decisions flip; with the host-side decision and DAFT the
    graph splits at the score layer, compiles a few variants during the first batches, then
    never again.  Predictions match the eager adapter."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(10)]
    t = threshold_for(batches)
    for daft, frames_max in ((False, 1), (True, 12)):
        counter = CompileCounter()
        eager = DATTA(tiny_resnet(), selector=ThresholdSelector(t), daft=daft)
        compiled = DATTA(torch.compile(tiny_resnet(), backend=counter),
                         selector=ThresholdSelector(t), daft=daft)
        decisions, frames = [], []
        for x in batches:
            torch.testing.assert_close(compiled(x), eager(x), **tol(torch.float32, 5.0))
            decisions.append(eager.last_decision)
            frames.append(counter.frame_count)
        assert len(set(decisions)) == 2, "the stream must flip the decision"
        assert frames[-1] <= frames_max and frames[-1] == frames[len(frames) // 2], frames
