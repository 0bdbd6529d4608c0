"""FINCH's first partition (``cluster_labels``), DYN's cluster statistics and the DYN adapter,
against a float64 NumPy/SciPy rendering of the authors' formulas (DYW77/DATTA at 3bee755:
``ttab/model_adaptation/finch.py``, ``utils.py:ClusterAwareBatchNorm2d``)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import nn

import datta_kernels as dk
from datta_kernels.cluster import cluster_moments, first_neighbours
from datta_kernels.functional import cluster_dabn
from datta_kernels.testing import perturb_batchnorms

from .conftest import backend_params

BACKENDS = backend_params("reference", "cpu")     # a row that cannot run skips with the reason


# ---------------------------------------------------------------- the authors' formulas, float64
def finch_first_partition(rows: np.ndarray) -> np.ndarray:
    """The authors' ``FINCH``: cosine distance, first neighbours, ``A = (onehot(nbr) + I)``,
    ``A A^T`` with a zero diagonal, weak components (scipy), relabelled as ``torch.unique``."""
    x = np.asarray(rows, dtype=np.float64)
    n = len(x)
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - z @ z.T
    np.fill_diagonal(dist, np.inf)
    nbr = dist.argmin(axis=1)
    a = np.zeros((n, n))
    a[np.arange(n), nbr] = 1.0
    a += np.eye(n)
    a = a @ a.T
    np.fill_diagonal(a, 0.0)
    _, labels = connected_components(sp.csr_matrix(a), directed=True, connection="weak")
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def authors_layer(x, mu_s, var_s, gamma, beta, rate, eps):
    """``ClusterAwareBatchNorm2d.forward`` in float64 NumPy (one-hot matmuls as theirs)."""
    x = np.asarray(x, dtype=np.float64)
    b, c = x.shape[:2]
    mu = x.mean(axis=(2, 3))
    var = x.var(axis=(2, 3), ddof=1)
    labels = finch_first_partition(mu)
    onehot = np.eye(labels.max() + 1)[labels]                       # (b, L)
    counts = onehot.sum(axis=0)[:, None] + eps
    cmu = onehot.T @ mu / counts
    cvar = onehot.T @ var / counts
    diff = (mu[:, None, :] - cmu[None, :, :]) ** 2                  # (b, L, c)
    cvar = cvar + np.einsum("blc,bl->lc", diff, onehot) / counts
    m = (1 - rate) * (onehot @ cmu) + rate * mu_s[None]
    v = (1 - rate) * (onehot @ cvar) + rate * var_s[None]
    y = (x - m[:, :, None, None]) / np.sqrt(v[:, :, None, None] + eps)
    return y * gamma[None, :, None, None] + beta[None, :, None, None]


# ---------------------------------------------------------------- cluster_labels
def test_labels_equal_scipy_components_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for t in range(1000):
        n = int(torch.randint(1, 97, (1,), generator=g))
        c = int(torch.randint(1, 33, (1,), generator=g))
        x = torch.randn(n, c, generator=g, dtype=torch.float64)
        if t % 2:
            x = x.abs() + 0.1 * t % 3     # all in one orthant: long neighbour chains
        got = dk.cluster_labels(x)
        assert got.dtype == torch.int64 and got.shape == (n,)
        np.testing.assert_array_equal(got.numpy(), finch_first_partition(x.numpy()), err_msg=f"batch {t}")


def test_planted_clusters_are_found():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=g) * 10
    member = torch.tensor([2, 0, 0, 3, 1, 2, 3, 1, 0, 2, 1, 3])
    rows = centres[member] + 0.01 * torch.randn(12, 16, generator=g)
    got = dk.cluster_labels(rows)
    # one cluster per centre, numbered by smallest member: centre 2 first (row 0), then 0, 3, 1
    assert got.tolist() == [0, 1, 1, 2, 3, 0, 2, 3, 1, 0, 3, 2]
    np.testing.assert_array_equal(got.numpy(), finch_first_partition(rows.double().numpy()))


@pytest.mark.parametrize("rows", [
    [[1.0, 2.0]],                                          # N = 1
    [[1.0, 0.0], [0.0, 1.0]],                              # N = 2: each the other's neighbour
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.5]],     # duplicated rows (ties: smallest index)
    [[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [1.0, 3.0]],      # zero rows (distance 1 to every row)
    [[0.0, 0.0, 0.0]] * 5,                                 # all zero
])
def test_edge_inputs_match_the_authors(rows):
    x = torch.tensor(rows, dtype=torch.float64)
    np.testing.assert_array_equal(dk.cluster_labels(x).numpy(), finch_first_partition(x.numpy()))
    assert dk.cluster_labels(x.float()).tolist() == dk.cluster_labels(x).tolist()


def test_first_neighbours_is_the_cosine_argmin():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert first_neighbours(x).tolist() == [1, 0, 3, 2]


@pytest.mark.parametrize("bad, err", [
    (torch.zeros(0, 3), ValueError), (torch.zeros(3, 0), ValueError), (torch.zeros(3), ValueError),
    (torch.zeros(3, 2, dtype=torch.int64), TypeError), ([[1.0]], TypeError)])
def test_bad_input_is_refused(bad, err):
    with pytest.raises(err):
        dk.cluster_labels(bad)


def test_labels_trace_once_per_batch_size_under_compile():
    """No data-dependent control flow: one graph for a batch size, no graph break."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    fn = torch.compile(dk.cluster_labels, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(24, 8, generator=g)
        assert fn(x).tolist() == dk.cluster_labels(x).tolist()
    assert counter.frame_count == 1


# ---------------------------------------------------------------- cluster statistics and the layer
def test_cluster_moments_are_the_authors():
    g = torch.Generator().manual_seed(3)
    f64 = {"generator": g, "dtype": torch.float64}
    mu, var = torch.randn(20, 6, **f64), torch.rand(20, 6, **f64)
    labels = dk.cluster_labels(mu)
    eps = 1e-5
    pm, pv = cluster_moments(mu, var, labels, eps)
    onehot = np.eye(int(labels.max()) + 1)[labels.numpy()]
    counts = onehot.sum(0)[:, None] + eps
    cmu = onehot.T @ mu.numpy() / counts
    cvar = onehot.T @ var.numpy() / counts + np.einsum(
        "blc,bl->lc", (mu.numpy()[:, None] - cmu[None]) ** 2, onehot) / counts
    np.testing.assert_allclose(pm.numpy(), onehot @ cmu, rtol=1e-12)
    np.testing.assert_allclose(pv.numpy(), onehot @ cvar, rtol=1e-12)


def _bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                      nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return perturb_batchnorms(m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("rate", [0.8, 0.3])
def test_layer_matches_the_authors_float64(backend, layout, rate):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 6, 9, 7, generator=g) * 2 + torch.randn(16, 6, 1, 1, generator=g)
    x[:8] += 3.0                                  # two domains in the batch
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mu_s, var_s = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    gamma, beta = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    blend = torch.tensor([rate, 0.0, 1 - rate])
    y = cluster_dabn(x, gamma, beta, mu_s, var_s, blend, eps=1e-5, backend=backend)
    want = authors_layer(x.numpy(), mu_s.double().numpy(), var_s.double().numpy(),
                         gamma.double().numpy(), beta.double().numpy(), rate, 1e-5)
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dyn_adapter_matches_the_authors_model(backend):
    """The whole DYN model: every BatchNorm2d replaced by the authors' layer, float64."""
    model = _bn_model()
    adapter = dk.DYN(copy.deepcopy(model), backend=backend)
    assert adapter.update_rule == "never" and adapter.optimizer is None
    x = torch.randn(12, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    x[6:] = x[6:] * 2 + 1
    ref = copy.deepcopy(model).double()
    bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]

    def hook(bn):
        def fwd(mod, inp, out):
            y = authors_layer(inp[0].detach().numpy(), bn.running_mean.numpy(), bn.running_var.numpy(),
                              bn.weight.detach().numpy(), bn.bias.detach().numpy(), 0.8, bn.eps)
            return torch.from_numpy(y)
        return fwd
    for bn in bns:
        bn.register_forward_hook(hook(bn))
    with torch.no_grad():
        want = ref(x.double())
    got = adapter(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # backward-free: nothing changes between batches
    torch.testing.assert_close(adapter(x), got, rtol=0, atol=0)


def test_dyn_arguments_and_state():
    with pytest.raises(ValueError, match="source_rate"):
        dk.DYN(_bn_model(), source_rate=1.5)
    a = dk.DYN(_bn_model(), source_rate=0.5)
    assert all(layer.cluster for layer in a.layers)
    assert a.layers[0].blend_multiple.tolist() == [0.5, 0.0, 0.5]
    b = dk.DYN(_bn_model())
    assert b.layers[0].preset == "dyn"
    b.load_state_dict(a.state_dict())
    assert b.layers[0].blend_multiple.tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="no shrink"):
        dk.FusedDABN(4, preset="datta", cluster=True)


def test_cluster_layer_gradients_follow_autograd_of_the_formula():
    """With a graph to record, x's gradient runs through the (differentiable) statistics."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    sm, sv = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    sv = sv + 1
    blend = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    fn = lambda x, w, b: cluster_dabn(x, w, b, sm, sv, blend, backend="reference")  # noqa: E731
    torch.autograd.gradcheck(fn, (x, w, b))
