"""Test streams under the names the test-time-adaptation literature uses, over a label-only
:class:`~datta_kernels.eval.streams.DomainPool` (pixels are fetched per batch by the loader).

- ``continual`` (demo: ``single``): one corruption after another at ``--severity``, shuffled
  within each, never reset.
- ``mixed_domains`` (demo: ``mixed``): all corruptions at ``--severity`` pooled and shuffled.
- ``correlated`` (demo: ``single_noniid`` when label-sorted): ``continual`` with labels
  correlated in time within each corruption: label-sorted, or with ``--dirichlet α`` a Dirichlet
  label shift (each class spread over the time slots with Dirichlet(α) proportions; small α: few
  classes per batch, large α: close to i.i.d.).
- ``dynamic`` (demo: ``dynamic``): DATTA's protocol, one single-domain batch then one mixed batch.
- ``dynamic_random`` (demo: ``dynamic_random``): as ``dynamic`` with runs of 1-4 batches of each kind.
- ``gradual`` (new): per corruption, severities 1→2→3→4→5→4→3→2→1; each visit feeds all of that
  level's images, reshuffled.

The demo's names are accepted as aliases (``single`` = ``continual``, ``mixed`` = ``mixed_domains``,
``single_noniid`` = ``correlated``). Every stream is deterministic in its seed; batches never
straddle two domains (except mixed batches).
"""
from __future__ import annotations

import numpy as np
import torch

from .streams import DomainPool, Stream, make_stream

__all__ = ["ALIASES", "PROTOCOLS", "build_stream", "canonical", "restrict"]

#: Name -> the demo stream it reuses (None: built here).
PROTOCOLS = {"continual": "single", "mixed_domains": "mixed", "correlated": "single_noniid",
             "dynamic": "dynamic", "dynamic_random": "dynamic_random", "gradual": None}
ALIASES = {"single": "continual", "mixed": "mixed_domains", "single_noniid": "correlated"}
GRADUAL_LEVELS = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def canonical(name: str) -> str:
    """The protocol name for ``name`` (an alias of the demo), or ValueError."""
    name = ALIASES.get(name, name)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown stream {name!r}; choose from {list(PROTOCOLS)} "
                         f"(or the demo's {list(ALIASES)})")
    return name


def restrict(pool: DomainPool, names: list[str]) -> DomainPool:
    """The same index space with only the domains ``names`` (renumbered in that order; every other
    sample gets domain -1 and never appears in a stream)."""
    dom = torch.full_like(pool.domain, -1)
    for i, n in enumerate(names):
        dom[pool.domain == pool.names.index(n)] = i
    return DomainPool(pool.x, pool.y, dom, list(names))


def _dirichlet_order(idx: torch.Tensor, y: torch.Tensor, batch_size: int, alpha: float,
                     rng: np.random.Generator) -> torch.Tensor:
    """Order one domain's samples so each class is spread over the ``T = ceil(n / batch_size)``
    time slots with proportions drawn from Dirichlet(α·1_T); shuffled within a slot."""
    slots = max(1, -(-len(idx) // batch_size))
    buckets: list[list[int]] = [[] for _ in range(slots)]
    labels = y[idx].numpy()
    for c in np.unique(labels):
        members = idx.numpy()[labels == c]
        members = members[rng.permutation(len(members))]
        cuts = (np.cumsum(rng.dirichlet(np.full(slots, alpha)))[:-1] * len(members)).round().astype(int)
        for t, part in enumerate(np.split(members, cuts)):
            buckets[t] += part.tolist()
    order = [i for b in buckets for i in rng.permutation(np.asarray(b, dtype=np.int64)).tolist()]
    return torch.tensor(order, dtype=torch.int64)


def _gen(seed: int, name: str, batch_size: int) -> int:
    return seed * 7919 + list(PROTOCOLS).index(name) * 104729 + batch_size


def build_stream(pool: DomainPool, name: str, batch_size: int, seed: int = 0, *, severity: int = 5,
                 corruptions: list[str] | None = None, dirichlet: float | None = None) -> Stream:
    """The stream ``name`` (a key of :data:`PROTOCOLS` or an alias) over ``pool``.

    ``pool.names`` are the domains of :func:`benchmarks.domain_name`: ``corruption`` at
    ``severity``, ``corruption@s`` at other severities (only ``gradual`` uses those)."""
    name = canonical(name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if corruptions is None:
        corruptions = [n for n in pool.names if "@" not in n]
    main = restrict(pool, corruptions)
    if name == "gradual":
        g = torch.Generator().manual_seed(_gen(seed, name, batch_size))
        stream = Stream(name, batch_size)
        for c in corruptions:
            for s in GRADUAL_LEVELS:
                dom = c if s == severity else f"{c}@{s}"
                if dom not in pool.names:
                    raise ValueError(f"gradual needs severity {s} of {c!r} in the pool")
                idx = pool.indices(pool.names.index(dom))
                stream.add(list(idx[torch.randperm(len(idx), generator=g)].split(batch_size)), "single", dom)
        return stream
    if name == "correlated" and dirichlet is not None:
        if not dirichlet > 0:
            raise ValueError(f"the Dirichlet concentration must be > 0, got {dirichlet}")
        rng = np.random.default_rng(_gen(seed, name, batch_size))
        stream = Stream(name, batch_size)
        for d, dom in enumerate(main.names):
            order = _dirichlet_order(main.indices(d), main.y, batch_size, dirichlet, rng)
            stream.add(list(order.split(batch_size)), "single", dom)
        return stream
    stream = make_stream(main, PROTOCOLS[name], batch_size, seed)
    stream.name = name
    return stream
