"""Soak test: a long dynamic stream through one ``DATTA`` adapter, checking that it stays flat.

    python scripts/soak.py                        # the full run: 20 000 batches (several minutes)
    python scripts/soak.py --batches 300          # the CI run (well under a minute)

What it streams (synthetic, so it needs no dataset): 1024 images of the ``write_synthetic``
kind (10 classes of bright rectangles on noise, 1x28x28), corrupted by 6 of the demo's
corruptions (``datta_kernels.eval.corruptions``, severity 3) = 6 domains.  The stream is
*dynamic* (SPEC §5): even batches come from one domain (the domain changes every 50 batches),
odd batches mix all domains; batch ``i`` is drawn from a generator seeded with ``(seed, i)``,
so any suffix of the stream can be replayed.  The model is the demo's ``SmallResNet`` at
width 8, trained for one short epoch on the clean images (a few seconds), wrapped by
``DATTA(model)`` with its defaults (preset ``datta``, ``KDESelector(window=1000)``, DAFT on,
backend ``auto``).  Threads: ``--threads`` (default 1, so latency is not at the mercy of the
other cores).

Checks (exit status 1 if any fails, 0 otherwise):

- memory: resident set size (``/proc/self/statm``) sampled every ``--sample-every`` batches;
  the highest sample of the last tenth of the stream may exceed the highest sample of the
  tenth right after the warm-up by less than ``--max-growth`` (default 1 %);
- latency: per-batch wall time of the adapter call; the median of the last tenth over the
  median of the tenth after the warm-up, for each decision (``single`` batches also run a
  backward), must stay under ``--max-drift`` (default 1.5);
- resume: at the middle of the stream the adapter's ``state_dict`` goes through
  ``torch.save`` / ``torch.load(weights_only=True)`` into a fresh adapter on a fresh copy of
  the source model; replaying the rest of the stream (``--resume-batches``, default all of it)
  must give bit-identical logits (compared by hash) and so identical predictions.

Warm-up: the first ``max(batches // 10, 100)`` batches (capped at a third of the stream): the
KDE selector answers ``multiple`` for 49 batches, thread pools and allocator caches fill.
Every per-batch record lives in arrays allocated before the stream starts, so the bookkeeping
itself does not grow.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import torch

import datta_kernels as dk
from datta_kernels.eval.corruptions import corrupt_all
from datta_kernels.eval.models import SmallResNet, TrainConfig, train

CORRUPTIONS = ("gaussian_noise", "contrast", "brightness", "defocus_blur", "pixelate", "fog")
SEGMENT = 50  # batches per single-domain segment (every other batch is mixed)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, 28, 28) in [0, 1] and labels (n,): class k is a bright rectangle
    whose position and shape depend on k, on dark noise (as ``eval.datasets.write_synthetic``)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.float32)
    for i, k in enumerate(labels):
        top, left = 3 + 2 * (k % 5), 3 + 3 * (k // 5) + int(rng.integers(0, 3))
        images[i, top:top + 8 + k, left:left + 18 - k] += 150 + int(rng.integers(0, 60))
    x = torch.from_numpy(images.clip(0, 255) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def batch_indices(i: int, seed: int, n_domains: int, per_domain: int, batch_size: int) -> np.ndarray:
    """Pool indices of batch ``i`` of the dynamic stream (a pure function of ``i``)."""
    rng = np.random.default_rng((seed, i))
    if i % 2 == 0:                                    # single-domain batch
        domain = (i // 2 // SEGMENT) % n_domains
        return domain * per_domain + rng.choice(per_domain, batch_size, replace=False)
    return rng.choice(n_domains * per_domain, batch_size, replace=False)   # mixed batch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def logits_hash(logits: torch.Tensor) -> int:
    digest = hashlib.blake2b(logits.contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def build(args) -> tuple[SmallResNet, torch.Tensor]:
    """The trained source model and the pool of corrupted images (domains side by side)."""
    x, y = synthetic_images(args.images, args.seed)
    cfg = TrainConfig(width=8, epochs=1, train_subset=None, batch_size=64, seed=args.seed)
    model = train(cfg, x, y, progress=False)
    domains = corrupt_all(x, CORRUPTIONS, 3, args.seed)
    pool = torch.cat([domains[n] for n in CORRUPTIONS]).contiguous()
    return model, pool


def run(adapter, pool, args, start: int, stop: int, rec: dict, measure: bool) -> None:
    """Feed batches ``start..stop-1`` through ``adapter``; write into the preallocated ``rec``."""
    n_domains, per_domain = len(CORRUPTIONS), args.images
    for i in range(start, stop):
        x = pool[torch.from_numpy(batch_indices(i, args.seed, n_domains, per_domain, args.batch_size))]
        t0, c0 = time.perf_counter(), time.process_time()
        logits = adapter(x)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        rec["hash"][i] = logits_hash(logits)
        if measure:
            rec["ms"][i], rec["cpu_ms"][i] = dt * 1e3, dc * 1e3
            rec["single"][i] = adapter.last_decision == "single"
            if i % args.sample_every == 0:
                rec["rss"][i // args.sample_every] = rss_bytes()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for what is checked.")
    p.add_argument("--batches", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=1024, help="clean images (per domain)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=50, help="batches between RSS samples")
    p.add_argument("--resume-batches", type=int, default=None,
                   help="batches replayed after the mid-stream resume (default: the whole rest)")
    p.add_argument("--max-growth", type=float, default=0.01, help="allowed RSS growth after warm-up")
    p.add_argument("--max-drift", type=float, default=1.5, help="allowed ratio of median latencies")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p


def summarize(rec: dict, args, adapter, *, warm: int, mid: int, stop: int, mismatch: np.ndarray,
              setup_s: float, stream_s: float) -> dict:
    """The soak's numbers and its failures (memory growth, latency drift, resume mismatches)."""
    n = args.batches
    tenth = max((n - warm) // 10, 1)
    # memory: highest sample in the tenth after warm-up vs in the last tenth
    k = args.sample_every
    rss = rec["rss"]
    base = rss[warm // k: (warm + tenth) // k + 1].max()
    last = rss[(n - tenth) // k:].max()
    growth = last / base - 1
    # latency: median of the tenth after warm-up vs the last tenth, per decision
    ms, single = rec["ms"], rec["single"]
    drift = {}
    for name, mask in (("single", single), ("multiple", ~single)):
        a = ms[warm:warm + tenth][mask[warm:warm + tenth]]
        b = ms[n - tenth:][mask[n - tenth:]]
        if len(a) >= 5 and len(b) >= 5:
            drift[name] = {"first_ms": float(np.median(a)), "last_ms": float(np.median(b)),
                           "ratio": float(np.median(b) / np.median(a))}
    after, cpu_after = ms[warm:], rec["cpu_ms"][warm:]
    result = {
        "batches": n, "batch_size": args.batch_size, "threads": args.threads, "warmup_batches": warm,
        "setup_seconds": setup_s, "stream_seconds": stream_s,
        "latency_ms": {"p50": float(np.percentile(after, 50)), "p90": float(np.percentile(after, 90)),
                       "p99": float(np.percentile(after, 99)), "max": float(after.max()),
                       "cpu_p50": float(np.percentile(cpu_after, 50))},
        "single_fraction": float(single.mean()), "updates": adapter.n_updates,
        "rss_mib": {"after_warmup": base / 2**20, "end": last / 2**20,
                    "min": rss[warm // k:].min() / 2**20, "max": rss[warm // k:].max() / 2**20},
        "rss_growth": float(growth), "latency_drift": drift,
        "resume": {"at": mid, "replayed": stop - mid, "mismatched_batches": len(mismatch)},
        "torch": torch.__version__, "backend": dk.backends.resolve("auto", "cpu", torch.float32),
    }
    failures = []
    if growth >= args.max_growth:
        failures.append(f"memory grew {growth:.2%} after warm-up (limit {args.max_growth:.0%})")
    for name, d in drift.items():
        if d["ratio"] > args.max_drift:
            failures.append(f"median latency of {name} batches drifted x{d['ratio']:.2f} "
                            f"(limit x{args.max_drift})")
    if len(mismatch):
        failures.append(f"resume at batch {mid}: {len(mismatch)} of {stop - mid} replayed batches "
                        f"differ, first at batch {mid + int(mismatch[0])}")
    result["failures"] = failures
    return result


def report(result: dict, args) -> None:
    lat, rss, res, drift = (result["latency_ms"], result["rss_mib"], result["resume"],
                            result["latency_drift"])
    print(f"soak: {result['batches']} batches of {args.batch_size} in "
          f"{result['stream_seconds']:.1f} s (+{result['setup_seconds']:.1f} s setup), "
          f"{args.threads} thread(s), backend {result['backend']}, "
          f"{result['single_fraction']:.1%} single, {result['updates']} updates")
    print(f"  latency after warm-up: p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}, "
          f"max {lat['max']:.1f} (CPU time p50 {lat['cpu_p50']:.2f} ms); drift "
          + ", ".join(f"{k} x{d['ratio']:.3f}" for k, d in drift.items()))
    print(f"  RSS after warm-up {rss['after_warmup']:.1f} MiB, at the end {rss['end']:.1f} MiB "
          f"(growth {result['rss_growth']:+.3%})")
    print(f"  resume at batch {res['at']}: {res['replayed'] - res['mismatched_batches']}/"
          f"{res['replayed']} replayed batches bit-identical")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    for msg in result["failures"]:
        print(f"FAIL: {msg}", file=sys.stderr)
    print("soak: " + ("FAILED" if result["failures"] else "all checks passed"))


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.batches < 60 or args.batch_size < 2 or args.images < args.batch_size or args.sample_every < 1:
        p.error("need --batches >= 60, --batch-size >= 2, --images >= --batch-size, --sample-every >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_setup = time.perf_counter()
    model, pool = build(args)
    source = copy.deepcopy(model)
    adapter = dk.DATTA(model)
    n = args.batches
    rec = {"hash": np.zeros(n, np.int64), "ms": np.zeros(n), "cpu_ms": np.zeros(n),
           "single": np.zeros(n, bool), "rss": np.zeros((n - 1) // args.sample_every + 1, np.int64)}
    setup_s = time.perf_counter() - t_setup
    warm = min(max(n // 10, 100), n // 3)
    mid = n // 2

    t0 = time.perf_counter()
    run(adapter, pool, args, 0, mid, rec, measure=True)
    saved = io.BytesIO()
    torch.save(adapter.state_dict(), saved)
    run(adapter, pool, args, mid, n, rec, measure=True)
    stream_s = time.perf_counter() - t0

    stop = n if args.resume_batches is None else min(n, mid + args.resume_batches)
    resumed = dk.DATTA(copy.deepcopy(source))
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    replay = {"hash": np.zeros(n, np.int64)}
    run(resumed, pool, args, mid, stop, replay, measure=False)
    mismatch = np.flatnonzero(replay["hash"][mid:stop] != rec["hash"][mid:stop])

    result = summarize(rec, args, adapter, warm=warm, mid=mid, stop=stop, mismatch=mismatch,
                       setup_s=setup_s, stream_s=stream_s)

    report(result, args)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
