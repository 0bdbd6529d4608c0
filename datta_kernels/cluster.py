"""Cluster-aware statistics (SPEC §3b): FINCH's first partition of a batch by its instance
means, and the per-cluster pooled moments of DYN's CABN (Discover Your Neighbours).

Both run on the device on ``(N, C)`` statistics (no pass over ``x``, no host sync, fixed op
sequence for a given ``N``: ``torch.compile`` traces them once per batch size).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cluster_labels", "first_neighbours", "cluster_moments"]


def _check_rows(mean: Tensor) -> None:
    if not isinstance(mean, Tensor):
        raise TypeError(f"expected a tensor, got {type(mean).__name__}")
    if mean.dim() != 2:
        raise ValueError(f"expected an (N, C) tensor, got shape {tuple(mean.shape)}")
    if not mean.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {mean.dtype}")
    if mean.shape[0] == 0 or mean.shape[1] == 0:
        raise ValueError(f"cannot cluster an empty {tuple(mean.shape)} tensor")


def first_neighbours(mean: Tensor) -> Tensor:
    """``(N,)`` int64: each row's nearest other row by cosine distance ``1 - <a, b>/(|a||b|)``
    (rows scaled by ``max(|row|, 1e-12)``, so a zero row is at distance 1 from every row);
    ties go to the smallest index.  ``N = 1``: the row itself."""
    _check_rows(mean)
    n = mean.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.int64, device=mean.device)
    z = mean.float() if mean.dtype in (torch.float16, torch.bfloat16) else mean
    z = torch.nn.functional.normalize(z, p=2.0, dim=1)
    dist = 1 - z @ z.T
    dist.fill_diagonal_(float("inf"))
    return dist.argmin(dim=1)


def cluster_labels(mean: Tensor) -> Tensor:
    """FINCH's first partition of the rows of ``mean`` ``(N, C)`` -> labels ``(N,)`` int64.

    Rows ``i`` and ``j`` are linked when one is the other's first neighbour
    (:func:`first_neighbours`) or they share one; the clusters are the connected components,
    numbered ``0, 1, ...`` in the order of their smallest member (the order of
    ``scipy.sparse.csgraph.connected_components``).  Those components are exactly the weak
    components of the graph ``i -> first_neighbour(i)``, and every node of such a graph reaches
    its component's one cycle: pointer doubling (``ceil(log2 N)`` gathers) finds the cycle's
    smallest node, a scatter-min the component's smallest member.  On the device, no host sync.
    """
    nbr = first_neighbours(mean)
    n = nbr.shape[0]
    idx = torch.arange(n, device=nbr.device)
    if n == 1:
        return torch.zeros_like(idx)
    # after step k: jump = f^(2^k), low[i] = min of f^t(i) for t in [0, 2^k]
    jump, low = nbr, torch.minimum(idx, nbr)
    for _ in range(max(1, math.ceil(math.log2(n)))):
        low = torch.minimum(low, low[jump])
        jump = jump[jump]
    # 2^k >= N: jump[i] lies on i's cycle, whose whole orbit low[jump] covers
    cycle_min = low[jump]
    smallest = torch.full_like(idx, n).scatter_reduce(0, cycle_min, idx, reduce="amin")[cycle_min]
    rank = (smallest == idx).cumsum(0) - 1
    return rank[smallest]


def cluster_moments(mean_i: Tensor, var_i: Tensor, labels: Tensor,
                    eps: float) -> tuple[Tensor, Tensor]:
    """DYN's cluster statistics, broadcast back to the samples: ``(N, C)`` mean and variance.

    For cluster ``l`` with ``n_l`` members (denominator ``n_l + eps``, as the authors' code)::

        mu_l   = sum_{n in l} mu_i[n] / (n_l + eps)
        var_l  = sum_{n in l} var_i[n] / (n_l + eps)  +  sum_{n in l} (mu_i[n] - mu_l)^2 / (n_l + eps)

    and sample ``n`` gets its cluster's ``(mu_l, var_l)``.  Differentiable in ``mean_i, var_i``
    (the labels are constants).
    """
    # per-cluster sums by index_add (O(N C), no (N, N) one-hot product: small matrix products
    # go through a multi-threaded BLAS that stalls on a busy machine)
    def cluster_sum(t: Tensor) -> Tensor:
        return t.new_zeros(t.shape).index_add(0, labels, t)             # (L = N, ...)
    counts = cluster_sum(torch.ones_like(mean_i[:, :1])) + eps            # (L, 1)
    mu = cluster_sum(mean_i) / counts                                     # (L, C)
    dev = (mean_i - mu[labels]).square()
    var = (cluster_sum(var_i) + cluster_sum(dev)) / counts
    return mu[labels], var[labels]
