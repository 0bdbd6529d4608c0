"""Test streams over corrupted domains (SPEC §5).

A :class:`DomainPool` holds every corrupted copy of the test subset side by side; a
:class:`Stream` is only an ordered list of index batches into it, plus what each batch truly is
(``"single"``: all from one corruption, ``"mixed"``: drawn from all of them) and its domain. So
building five streams costs five permutations, never five copies of the images.

Streams (all deterministic in ``seed``):

- ``single``: one corruption after another, shuffled within each;
- ``single_noniid``: the same order of domains, but label-sorted within each (class-imbalanced
  batches, the non-i.i.d. case that breaks test-batch statistics);
- ``mixed``: all corruptions pooled and shuffled;
- ``dynamic``: alternate one single-domain batch and one mixed batch (the authors' protocol);
  each domain's samples are split in two halves, one feeding the single-domain batches and one
  the mixed batches, so every sample is seen exactly once;
- ``dynamic_random``: as ``dynamic`` but with segments of 1-4 batches of each kind.

Batches never straddle two domains; a domain's last batch may be short.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["STREAMS", "DomainPool", "Stream", "build_pool", "make_stream", "pool_of"]

STREAMS = ("single", "single_noniid", "mixed", "dynamic", "dynamic_random")
MIXED = "mixed"


@dataclass
class DomainPool:
    """All domains concatenated: ``x`` ``(D·n, C, H, W)``, ``y`` ``(D·n,)``, ``domain`` ``(D·n,)``
    holding the index into ``names``."""

    x: Tensor
    y: Tensor
    domain: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def indices(self, d: int) -> Tensor:
        return (self.domain == d).nonzero().flatten()

    def batches(self, stream: Stream) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` of each batch of ``stream`` (which indexes this pool), in order."""
        return ((self.x[idx], self.y[idx]) for idx in stream.batches)


def pool_of(domains: dict[str, tuple[Tensor, Tensor]]) -> DomainPool:
    """A :class:`DomainPool` of ``{name: (images, labels)}`` domains of any sizes."""
    names = list(domains)
    x = torch.cat([domains[n][0] for n in names])
    y = torch.cat([domains[n][1] for n in names])
    dom = torch.cat([torch.full((len(domains[n][1]),), i) for i, n in enumerate(names)])
    return DomainPool(x, y, dom, names)


def build_pool(domains: dict[str, Tensor], y: Tensor) -> DomainPool:
    """Stack ``{name: images (n, C, H, W)}`` that all share the labels ``y`` ``(n,)``."""
    names = list(domains)
    x = torch.cat([domains[n] for n in names])
    return DomainPool(x, y.repeat(len(names)), torch.arange(len(names)).repeat_interleave(len(y)), names)


@dataclass
class Stream:
    """An ordered list of batches: ``batches[i]`` indexes the pool, ``kinds[i]`` is
    ``"single"``/``"mixed"`` and ``domains[i]`` the corruption name (or ``"mixed"``)."""

    name: str
    batch_size: int
    batches: list[Tensor] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches)

    def add(self, batches: list[Tensor], kind: str, domain: str) -> None:
        self.batches += batches
        self.kinds += [kind] * len(batches)
        self.domains += [domain] * len(batches)


def _chunks(idx: Tensor, batch_size: int) -> list[Tensor]:
    return list(idx.split(batch_size))


def _shuffled(idx: Tensor, g: torch.Generator) -> Tensor:
    return idx[torch.randperm(len(idx), generator=g)]


def _label_sorted(idx: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
    # Shuffle first so the order within one class is random, then a stable sort by label.
    idx = _shuffled(idx, g)
    return idx[torch.sort(y[idx], stable=True).indices]


def _single_batches(pool: DomainPool, parts: list[Tensor], batch_size: int, g: torch.Generator,
                    noniid: bool = False) -> list[tuple[list[Tensor], str]]:
    out = []
    for d, idx in enumerate(parts):
        idx = _label_sorted(idx, pool.y, g) if noniid else _shuffled(idx, g)
        out.append((_chunks(idx, batch_size), pool.names[d]))
    return out


def _interleave(stream: Stream, singles: list[Tensor], single_domains: list[str], mixed: list[Tensor],
                seg_len) -> None:
    """Alternate segments (``seg_len()`` batches each) of single-domain and mixed batches,
    then append whatever is left of either."""
    i = j = 0
    while i < len(singles) or j < len(mixed):
        for _ in range(seg_len()):
            if i < len(singles):
                stream.add([singles[i]], "single", single_domains[i])
                i += 1
        for _ in range(seg_len()):
            if j < len(mixed):
                stream.add([mixed[j]], "mixed", MIXED)
                j += 1


def make_stream(pool: DomainPool, name: str, batch_size: int, seed: int = 0) -> Stream:
    """Build stream ``name`` (one of :data:`STREAMS`) over ``pool``; deterministic in ``seed``."""
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose from {STREAMS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed * 7919 + STREAMS.index(name) * 104729 + batch_size)
    stream = Stream(name, batch_size)
    parts = [pool.indices(d) for d in range(len(pool.names))]
    if name in ("single", "single_noniid"):
        for batches, dom in _single_batches(pool, parts, batch_size, g, noniid=name == "single_noniid"):
            stream.add(batches, "single", dom)
    elif name == "mixed":
        stream.add(_chunks(_shuffled(torch.cat(parts), g), batch_size), "mixed", MIXED)
    else:
        halves = [_shuffled(p, g) for p in parts]
        half_single = [p[: len(p) // 2] for p in halves]
        half_mixed = torch.cat([p[len(p) // 2:] for p in halves])
        singles, single_domains = [], []
        for batches, dom in _single_batches(pool, half_single, batch_size, g):
            singles += batches
            single_domains += [dom] * len(batches)
        mixed = _chunks(_shuffled(half_mixed, g), batch_size)
        if name == "dynamic":
            _interleave(stream, singles, single_domains, mixed, lambda: 1)
        else:
            _interleave(stream, singles, single_domains, mixed,
                        lambda: int(torch.randint(1, 5, (1,), generator=g)))
    return stream
