"""The evaluation protocol: which data may decide a method, which data may report it.

Every method choice — score mode and its parts, score layer, selector, threshold — is made on
the **validation** domains: the corruptions ``speckle_noise`` and ``gaussian_blur`` (the
held-out pair of the CIFAR-10-C protocol) plus clean *training* images. Every reported number is
on the **test** domains: the other 13 corruptions of the test images. The threshold of the
demo's ``datta_disp`` row is calibrated here, per batch size, from batches whose type
(single-domain or mixed) is known by construction — no test label and no test image is used.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..adapt import DATTA
from ..diversity import ThresholdSelector, calibrate_threshold
from .corruptions import CORRUPTIONS, corrupt_all
from .streams import DomainPool, build_pool

__all__ = ["VALIDATION", "TEST", "validation_pool", "test_pool", "draw_batches", "batch_scores",
           "calibrate"]

#: The validation corruptions (decide methods here) and the test corruptions (report here).
VALIDATION = ("speckle_noise", "gaussian_blur")
TEST = tuple(c for c in CORRUPTIONS if c not in VALIDATION)


def _pick(n_total: int, n: int, seed: int, offset: int) -> Tensor:
    """Images ``offset .. offset + n`` of a seeded permutation of ``range(n_total)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[offset:offset + n]


def test_pool(data, per_domain: int, severity: int, seed: int,
              corruptions: tuple[str, ...] = TEST) -> DomainPool:
    """The test domains: ``corruptions`` of the first ``per_domain`` images of a seeded
    permutation of the test set (the images the demo reports on)."""
    pick = _pick(len(data.test_y), per_domain, seed, 0)
    return build_pool(corrupt_all(data.test_x[pick], corruptions, severity, seed), data.test_y[pick])


def validation_pool(data, per_domain: int, severity: int, seed: int) -> DomainPool:
    """The validation domains: clean training images, and the validation corruptions of test
    images disjoint from those :func:`test_pool` uses (the next ``per_domain`` of the same
    permutation, or its tail when the test set is too small)."""
    n_test = len(data.test_y)
    pick = _pick(n_test, per_domain, seed, min(per_domain, max(0, n_test - per_domain)))
    domains = corrupt_all(data.test_x[pick], VALIDATION, severity, seed)
    tpick = _pick(len(data.train_y), len(pick), seed + 1, 0)
    pool = build_pool({"clean_train": data.train_x[tpick], **domains}, data.test_y[pick])
    pool.y[:len(pick)] = data.train_y[tpick]
    return pool


def draw_batches(pool: DomainPool, batch_size: int, n: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """``n`` single-domain batches (cycling through the domains) and ``n`` mixed batches
    (drawn from every domain of the pool), as index tensors."""
    g = torch.Generator().manual_seed(seed * 7907 + batch_size)
    singles, mixed = [], []
    for k in range(n):
        idx = pool.indices(k % len(pool.names))
        singles.append(idx[torch.randperm(len(idx), generator=g)[:batch_size]])
        mixed.append(torch.randperm(len(pool), generator=g)[:batch_size])
    return singles, mixed


@torch.no_grad()
def batch_scores(model: nn.Module, pool: DomainPool, batches: list[Tensor], **datta_kw) -> list[float]:
    """The diversity score DATTA computes for each batch (a copy of ``model``, no updates)."""
    adapter = DATTA(copy.deepcopy(model), daft=False, selector=ThresholdSelector(0.0), **datta_kw)
    out = []
    for idx in batches:
        adapter(pool.x[idx])
        out.append(adapter.last_score)
    return out


def calibrate(model: nn.Module, pool: DomainPool, batch_size: int, n: int = 60, seed: int = 0,
              **datta_kw) -> dict:
    """A :class:`ThresholdSelector` threshold for DATTA on ``model`` with ``datta_kw`` (e.g.
    ``score_mode="dispersion"``), from ``n`` single and ``n`` mixed validation batches of
    ``batch_size``; returns ``{"threshold", "single", "mixed"}`` (the scores, for reports)."""
    singles, mixed = draw_batches(pool, batch_size, n, seed)
    s = batch_scores(model, pool, singles, **datta_kw)
    m = batch_scores(model, pool, mixed, **datta_kw)
    return {"threshold": calibrate_threshold(s, m), "single": s, "mixed": m}
