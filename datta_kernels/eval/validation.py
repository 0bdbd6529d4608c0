"""The evaluation protocol: which data may decide a method, which data may report it.

Images: the Fashion-MNIST test set is cut in two halves.  The **first half** (images
``0 .. 4999``) is the only source of reported numbers: the test corruptions are applied to up to
``per_domain`` of them.  The **second half** (``5000 .. 9999``) is never reported on: the
validation corruptions are applied to it.  Clean held-out data are the training images the
source model never trained on (:func:`~.models.held_out_indices`).  So validation and test
images are disjoint for every ``per_domain`` (a larger one is refused), and
``tests/test_eval.py`` asserts it.

Corruptions: every method choice — score mode and its parts, score layer, selector, threshold,
the blends and rates of ``datta_cal`` — is made on the **validation** domains: ``speckle_noise``,
``gaussian_blur`` and ``spatter`` (three of the four held-out corruptions of the CIFAR-10-C
protocol, one each of noise, blur and weather; the fourth, ``saturate``, scales colour
saturation, which a grayscale image does not have) plus clean held-out images.
Every reported number is on the **test** domains, the other 13 corruptions.  Reporting on a
validation corruption needs ``allow_validation=True`` (the demo's ``--report-validation``) and is
labelled as such in the results.  Another set of validation corruptions can be named
(``corruptions=`` / ``validation=`` below, the demo's ``--validation-corruptions``): the test
corruptions are then the rest (:func:`reported_corruptions`), and the images stay the two halves.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..adapt import DATTA
from ..diversity import ThresholdSelector, calibrate_threshold
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt_all
from .models import TrainConfig, held_out_indices
from .streams import DomainPool, build_pool, pool_of

__all__ = ["VALIDATION", "TEST", "CLEAN", "check_validation", "reported_corruptions", "validation_pool",
           "test_pool", "reported_images",
           "validation_images", "validation_domains", "pool_of", "draw_batches", "batch_scores",
           "calibrate_threshold_on"]

#: The validation corruptions (decide methods here).
VALIDATION = ("speckle_noise", "gaussian_blur", "spatter")
#: the name of the clean held-out validation domain
CLEAN = "clean_heldout"


def check_validation(corruptions) -> tuple[str, ...]:
    """``corruptions`` as a tuple of validation corruptions, or a ``ValueError``: at least one,
    each a known corruption, none twice, and at least one corruption left to report on."""
    corruptions = tuple(corruptions)
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown validation corruption(s) {bad}; choose from {list(CORRUPTIONS)}")
    if not corruptions or len(set(corruptions)) != len(corruptions):
        raise ValueError(f"validation corruptions must name at least one corruption, each once; got "
                         f"{list(corruptions)}")
    if not reported_corruptions(corruptions):
        raise ValueError("validation corruptions must leave at least one test corruption to report on")
    return corruptions


def reported_corruptions(validation=VALIDATION) -> tuple[str, ...]:
    """The corruptions reported on when ``validation`` decides: every other one, in
    :data:`~.corruptions.CORRUPTIONS`' order (:data:`TEST` for the default)."""
    return tuple(c for c in CORRUPTIONS if c not in validation)


#: The test corruptions (report here) of the default validation set.
TEST = reported_corruptions()


def _halves(n_test: int) -> tuple[int, int]:
    """``(size of the reported half, size of the validation half)`` of a test set of ``n_test``."""
    return n_test - n_test // 2, n_test // 2


def _pick(lo: int, hi: int, n: int, seed: int) -> Tensor:
    """``n`` images of ``range(lo, hi)`` in a seeded order; refuses more than there are."""
    if n > hi - lo:
        raise ValueError(f"per_domain {n} exceeds the {hi - lo} images of this half of the test set "
                         "(reported and validation images are disjoint halves)")
    g = torch.Generator().manual_seed(seed)
    return lo + torch.randperm(hi - lo, generator=g)[:n]


def reported_images(n_test: int, per_domain: int, seed: int) -> Tensor:
    """Indices of the test images the demo reports on: from the first half only."""
    return _pick(0, _halves(n_test)[0], per_domain, seed)


def validation_images(n_test: int, per_domain: int, seed: int) -> Tensor:
    """Indices of the test images the validation corruptions are applied to: second half only."""
    first, _ = _halves(n_test)
    return _pick(first, n_test, per_domain, seed + 1)


def test_pool(data, per_domain: int, severity: int, seed: int,
              corruptions: tuple[str, ...] = TEST, allow_validation: bool = False,
              validation: tuple[str, ...] = VALIDATION) -> DomainPool:
    """The test domains: ``corruptions`` of ``per_domain`` images of the first half of the test
    set.  A validation corruption (one of ``validation``) is refused unless ``allow_validation``
    (then its numbers are validation numbers, and must be labelled so)."""
    leaked = [c for c in corruptions if c in validation]
    if leaked and not allow_validation:
        raise ValueError(f"{leaked} decide methods (validation corruptions) and are never reported "
                         "on; pass allow_validation=True (demo: --report-validation) to report on "
                         "them anyway, labelled as validation numbers")
    pick = reported_images(len(data.test_y), per_domain, seed)
    return build_pool(corrupt_all(data.test_x[pick], corruptions, severity, seed), data.test_y[pick])


def validation_domains(data, per_domain: int, seed: int, severities: tuple[int, ...] = SEVERITIES,
                       train: TrainConfig | None = None,
                       corruptions: tuple[str, ...] = VALIDATION) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (images, labels)}``: ``per_domain`` clean held-out training images (never trained
    on under ``train``, default :class:`TrainConfig`) as ``clean_heldout`` (left out when fewer
    are held out), and the validation ``corruptions`` (default :data:`VALIDATION`) at each of
    ``severities`` (``speckle_noise@3``, ...) of ``per_domain`` images of the second half of the
    test set."""
    corruptions = check_validation(corruptions)
    held = held_out_indices(train or TrainConfig(), len(data.train_y))
    g = torch.Generator().manual_seed(seed + 2)
    out = {}
    if len(held) >= per_domain:     # (a model trained on every training image has none)
        clean = held[torch.randperm(len(held), generator=g)[:per_domain]]
        out[CLEAN] = (data.train_x[clean], data.train_y[clean])
    pick = validation_images(len(data.test_y), per_domain, seed)
    for sev in severities:
        for name, x in corrupt_all(data.test_x[pick], corruptions, sev, seed).items():
            out[f"{name}@{sev}"] = (x, data.test_y[pick])
    return out


def validation_pool(data, per_domain: int, seed: int, severities: tuple[int, ...] = SEVERITIES,
                    train: TrainConfig | None = None,
                    corruptions: tuple[str, ...] = VALIDATION) -> DomainPool:
    """:func:`validation_domains` as one pool (each domain its own labels)."""
    return pool_of(validation_domains(data, per_domain, seed, severities, train, corruptions))


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


def calibrate_threshold_on(model: nn.Module, domains: dict[str, tuple[Tensor, Tensor]], batch_size: int,
                           n: int = 40, seed: int = 0, **datta_kw) -> dict:
    """A :class:`ThresholdSelector` threshold for DATTA on ``model`` with ``datta_kw`` (e.g.
    ``score_mode="dispersion"``), from ``n`` single and ``n`` mixed batches of ``batch_size``
    drawn from the validation ``domains``; returns ``{"threshold", "single", "mixed",
    "domains"}`` (the scores, for reports)."""
    pool = pool_of(domains)
    singles, mixed = draw_batches(pool, batch_size, n, seed)
    s = batch_scores(model, pool, singles, **datta_kw)
    m = batch_scores(model, pool, mixed, **datta_kw)
    return {"threshold": calibrate_threshold(s, m), "single": s, "mixed": m, "domains": list(domains)}
