"""The demo's model and validation domains for the design-check scripts of ``bench/`` (validation
data only), and their results-file header."""
from __future__ import annotations

import argparse
import copy
import dataclasses

import numpy as np
import torch

from datta_kernels.benchmarking import describe_machine, provenance
from datta_kernels.calibration import STREAM_KINDS, _streams, calibrate
from datta_kernels.eval.datasets import load_fashion_mnist
from datta_kernels.eval.models import TrainConfig, load_or_train
from datta_kernels.eval.numerics import pin
from datta_kernels.eval.runner import DemoConfig
from datta_kernels.eval.streams import DomainPool, Stream, make_stream
from datta_kernels.eval.validation import pool_of, validation_domains


def setup(title: str, doc: str, per_domain: int = 1000, note: str = "") -> tuple:
    """``(data, model, vdom)``: Fashion-MNIST, the cached demo model and the demo's validation
    domains (``per_domain`` images each); prints the markdown header (title, command, commit,
    machine, domains) and the first paragraph of ``doc`` after its summary line.  The process
    runs on the demo's portable numerics (pinned here, before any kernel: every script's first
    call), so its numbers are the demo's on any x86-64 CPU with AVX2."""
    numerics = pin("portable")
    data = load_fashion_mnist()
    model, _ = load_or_train(TrainConfig(), data.train_x, data.train_y, progress=False)
    vdom = validation_domains(data, per_domain, 0, train=TrainConfig())
    prov, m = provenance(), describe_machine()
    print(f"# {title}\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, numerics "
          f"{'portable (AVX2)' if numerics['portable'] else 'NOT portable: ' + numerics['why']} "
          "(accuracy-only: no timing)")
    print(f"- validation domains: {', '.join(vdom)} ({per_domain} images each){note}\n")
    print(doc.split("\n\n")[1] + "\n")
    return data, model, vdom


def calibrated_study(title: str, doc: str, parser: argparse.ArgumentParser | None = None) -> tuple:
    """``(args, cfg, model, vdom, rep)`` for a study of ``calibrate``'s steps 1-4: the command
    line (``parser``, or a new one, with ``--batch-size``, default 64), the demo's configuration,
    :func:`setup`'s model and validation domains (its header printed), and ``calibrate``'s report
    for that batch size as the demo runs it (``cfg``'s backend and seed) with one DAFT rate,
    2e-3, to save time, then DAFT switched off (steps 1-4 do not depend on the rate)."""
    p = parser or argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    cfg = DemoConfig()
    _, model, vdom = setup(title, doc, per_domain=cfg.validation_per_domain)
    rep = calibrate(copy.deepcopy(model), vdom, args.batch_size, lr=2e-3, backend=cfg.backend,
                    seed=cfg.seed).calibration
    return args, cfg, model, vdom, without_daft(rep)


def without_daft(rep):
    """``calibrate``'s report ``rep`` with DAFT switched off, and with it every DAFT-only choice
    (the entropy filter, DAFT on ``multiple``, step 5b's pre blend of the second forward), which
    an adapter without DAFT refuses."""
    return dataclasses.replace(rep, daft=False, entropy_filter=None, daft_multiple=False,
                               pre_single_blend=None)


def image_families(domains) -> np.ndarray:
    """The corruption family (the name before ``@``) of every image of ``domains``, in the order
    :func:`~datta_kernels.calibration._streams` concatenates them."""
    names = list(domains)
    return np.repeat([n.split("@")[0] for n in names], [len(domains[n][1]) for n in names])


def defined_batches(s: Stream) -> Stream:
    """``s`` without its batches of one sample (their statistics are undefined; ``calibrate``
    drops them too)."""
    keep = [i for i, b in enumerate(s.batches) if len(b) > 1]
    return dataclasses.replace(s, batches=[s.batches[i] for i in keep], kinds=[s.kinds[i] for i in keep],
                               domains=[s.domains[i] for i in keep])


def validation_streams(domains, batch_size: int, seed: int,
                       kinds=None) -> tuple[DomainPool, dict[str, Stream]]:
    """``calibrate``'s validation streams (SPEC §6 steps 4-5; ``kinds``: only these report
    names) as :class:`~datta_kernels.eval.streams.Stream` objects over one pool of ``domains``,
    for the eval runners (``run_lockstep``): the same batches as ``calibrate`` runs (checked),
    batches of one sample dropped as it drops them."""
    pool = pool_of(domains)
    out = {}
    for key, kind in STREAM_KINDS.items():
        if kinds is not None and key not in kinds:
            continue
        out[key] = defined_batches(make_stream(pool, kind, batch_size, seed))
    _, _, check = _streams(domains, batch_size, seed, kinds)
    assert all(len(check[k]) == len(out[k].batches)
               and all(torch.equal(a, b) for a, b in zip(check[k], out[k].batches)) for k in check)
    return pool, out
