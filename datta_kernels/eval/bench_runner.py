"""The experiment behind ``datta-kernels run``: DATTA and the baselines on a published
benchmark (CIFAR-10-C, CIFAR-100-C, ImageNet-C) with a real model, on the literature's streams.

Each stream is read once: the loader's workers decode batch ``t+1`` (pinned memory, a
non-blocking copy) while every method, each holding its own copy of the model, adapts on batch
``t`` in lockstep. The results document has the layout of the demo's (``report.write_outputs``
writes ``results.json`` / ``results.csv`` / ``summary.txt`` / ``datta_demo.png``).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__, backends
from ..benchmarking import provenance
from ..calibration import default_batches
from .benchmarks import CIFAR_CORRUPTIONS, DATASETS, IMAGENET_SUBSET, load_benchmark
from .cal_cache import cached_calibrate
from .corruptions import SEVERITIES
from .numerics import check_mode as check_numerics
from .numerics import pin as pin_numerics
from .protocols import build_stream, canonical
from .runner import CALIBRATED, METHODS, ORACLES, RunResult, cal_rates, detector_metrics, run_lockstep
from .validation import calibrate_threshold_on
from .zoo import BUILTIN, build_model, default_normalization

__all__ = ["RunConfig", "run_benchmark"]

TITLES = {"cifar10-c": "CIFAR-10-C", "cifar100-c": "CIFAR-100-C", "imagenet-c": "ImageNet-C"}
RANDOM_INIT_WARNING = ("--random-init: the model has random weights, so every accuracy below is "
                       "meaningless (use it to check the pipeline, not the methods)")


@dataclass
class RunConfig:
    """Everything one ``datta-kernels run`` depends on (recorded in ``results.json``)."""

    dataset: str
    data_dir: str
    model: str
    checkpoint: str | None = None
    random_init: bool = False
    trust_checkpoint: bool = False
    width: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    corruptions: tuple[str, ...] = CIFAR_CORRUPTIONS
    severity: int = 5
    num_ex: int | None = None
    subset: int | None = IMAGENET_SUBSET
    streams: tuple[str, ...] = ("continual",)
    batch_sizes: tuple[int, ...] = (64,)
    methods: tuple[str, ...] = ("source", "tbn", "tent", "datta")
    dirichlet: float | None = None
    #: validation corruptions (e.g. CIFAR-10-C's extra speckle_noise, gaussian_blur, spatter,
    #: saturate) that calibrate datta_disp and datta_cal; never reported on
    calibrate_on: tuple[str, ...] = ()
    #: images per calibration corruption, and validation batches of each type per batch size
    #: (None: ``datta_kernels.calibration.default_batches``)
    calibration_images: int = 1000
    calibration_batches: int | None = None
    lr: float = 1e-3
    backend: str = "auto"
    device: str = "auto"
    workers: int | None = None
    seed: int = 0
    #: calibrate datta_cal again even when the calibration cache holds its choices for these inputs
    recalibrate: bool = False
    #: calibration cache (None: ``$XDG_CACHE_HOME/datta_kernels``)
    cache_dir: str | None = None
    progress: bool = True
    #: CPU numerics (:mod:`.numerics`): ``"native"`` (default: as torch finds the machine) or
    #: ``"portable"`` (AVX2 kernels, 2 threads: the same numbers across vector widths and core
    #: counts, on one CPU maker;
    #: :func:`run_benchmark` pins them first); CUDA work is the same either way
    numerics: str = "native"

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def validate(self) -> None:
        """Raise ValueError (one line) on any bad argument; touches no data and builds no model."""
        check_numerics(self.numerics)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {list(DATASETS)}")
        if self.dataset == "imagenet-c" and importlib.util.find_spec("PIL") is None:
            raise ValueError("imagenet-c decodes JPEGs with Pillow, which is not installed: "
                             "pip install pillow")
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir {self.data_dir}: not a directory")
        builtin = self.model in BUILTIN or self.model.startswith("torchvision:")
        if not builtin and not Path(self.model).is_file():
            raise ValueError(f"--model {self.model!r}: neither a built-in architecture "
                             f"({', '.join(BUILTIN)}), torchvision:<name>, nor a saved model file")
        if builtin and self.checkpoint is None and not self.random_init:
            raise ValueError(f"--model {self.model} needs --checkpoint FILE (or --random-init to run "
                             "without trained weights)")
        if self.checkpoint is not None:
            if self.random_init:
                raise ValueError("--checkpoint and --random-init exclude each other")
            if not builtin:
                raise ValueError("--checkpoint goes with an architecture name; a saved model file "
                                 "already holds its weights")
            if not Path(self.checkpoint).is_file():
                raise ValueError(f"--checkpoint {self.checkpoint}: file not found")
        if self.width is not None and (self.model not in BUILTIN or self.width < 1):
            raise ValueError(f"--width must be >= 1 and applies to {', '.join(BUILTIN)} only")
        if (self.mean is None) != (self.std is None):
            raise ValueError("--mean and --std go together")
        if self.mean is not None and (len(self.mean) != 3 or len(self.std) != 3
                                      or not all(s > 0 for s in self.std)):
            raise ValueError("--mean and --std need 3 values each (RGB), std > 0")
        if not self.corruptions or any(not c or "/" in c or c.startswith(".") for c in self.corruptions):
            raise ValueError(f"--corruptions: bad list {list(self.corruptions)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"--severity must be 1..5, got {self.severity}")
        for name, v in (("--num-ex", self.num_ex), ("--subset", self.subset)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.streams = tuple(canonical(s) for s in self.streams)
        if not self.streams or not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError("need at least one stream and batch sizes >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        if any(m.startswith("datta_cal") for m in self.methods) and not self.calibrate_on:
            raise ValueError("datta_cal is calibrated on validation corruptions: pass --calibrate-on "
                             "(e.g. speckle_noise,gaussian_blur,spatter,saturate for CIFAR-10-C)")
        both = sorted(set(self.calibrate_on) & set(self.corruptions))
        if both:
            raise ValueError(f"{both} are both calibrated on (--calibrate-on) and reported on "
                             "(--corruptions): the two lists must be disjoint")
        if self.dirichlet is not None and not self.dirichlet > 0:
            raise ValueError(f"--dirichlet must be > 0, got {self.dirichlet}")
        if self.dirichlet is not None and "correlated" not in self.streams:
            raise ValueError("--dirichlet shapes the correlated stream; add correlated to --streams")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        try:
            backends.resolve(self.backend, self.resolved_device(), torch.float32)
        except Exception as e:
            raise ValueError(f"--backend {self.backend}: {e}") from None


def default_workers(dataset: str, device: str) -> int:
    """DataLoader workers when ``--workers`` is not given. CIFAR-C batches are memory-mapped row
    reads (~190k images/s in-process on one 2-core VM thread, far above any model), where worker
    IPC costs more than it hides on CPU; ImageNet-C decodes JPEGs, which is worth parallelising."""
    cpus = os.cpu_count() or 1
    if dataset == "imagenet-c":
        return min(8, cpus) if device == "cuda" else 1
    return min(2, cpus) if device == "cuda" else 0


def _machine(device: str) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "datta_kernels": __version__,
            "threads": torch.get_num_threads(), "device": device,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _loader(dataset, stream, device: str, workers: int):
    kw = {"num_workers": workers, "pin_memory": device == "cuda"}
    if workers > 0:
        kw["prefetch_factor"] = 4
    batches = [b.tolist() for b in stream.batches]
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, **kw)


def _bar(total: int, enabled: bool):
    if enabled:
        try:
            from . import progress_bar
            return progress_bar(total=total, desc="adapt", unit="batch")
        except ImportError:
            pass
    return None


def _run_stream(model, stream, dataset, methods, cfg: RunConfig, device: str, workers: int, bar,
                timing: dict, score_kw: dict) -> list:
    """All ``methods`` on ``stream`` in lockstep (:func:`~.runner.run_lockstep`); one pass of the
    loader. Adds to ``timing`` the seconds spent waiting for batches (``data``) and in the
    methods (``methods``)."""
    adapters = {m: METHODS[m](copy.deepcopy(model), cfg.backend, cfg.lr, score_kw, stream) for m in methods}
    sync = torch.cuda.synchronize if device == "cuda" else None

    def batches():
        loader = iter(_loader(dataset, stream, device, workers))
        while True:
            t_wait = time.perf_counter()
            try:
                xb, yb = next(loader)
            except StopIteration:
                return
            x = xb.to(device, non_blocking=True).float().div_(255)
            y = yb.to(device, non_blocking=True)
            timing["data"] += time.perf_counter() - t_wait
            yield x, y
            if bar is not None:
                bar.update(1)
    runs = run_lockstep(adapters, stream, batches(), sync=sync)
    timing["methods"] += sum(sum(r.ms) for r in runs) / 1e3
    return runs


def _row(res: RunResult) -> dict:
    row = res.row()         # per-domain accuracy and decisions: RunResult.row (PER_DOMAIN_STREAMS)
    row["error"] = 1.0 - row["accuracy"]
    return row


def _calibrate(cfg: RunConfig, model, device: str, log) -> dict:
    """The ``datta_disp`` thresholds and ``datta_cal`` reports per batch size, from the
    ``--calibrate-on`` corruptions at the run's severity (``{}`` without them)."""
    if not cfg.calibrate_on or not any(m in CALIBRATED for m in cfg.methods):
        return {}
    t0 = time.perf_counter()
    val = load_benchmark(cfg.dataset, cfg.data_dir, tuple(cfg.calibrate_on), (cfg.severity,), cfg.severity,
                         cfg.calibration_images, cfg.subset)
    domains = {}
    for d, name in enumerate(val.pool.names):
        x, y = val.dataset[val.pool.indices(d).numpy()]
        domains[name] = (x.to(device).float().div_(255), y.to(device))
    thresholds, reports = {}, {}
    for bs in cfg.batch_sizes:
        n_cal = cfg.calibration_batches or default_batches(bs)
        thresholds[bs] = calibrate_threshold_on(model, domains, bs, n_cal, cfg.seed,
                                                score_mode="dispersion", backend=cfg.backend)["threshold"]
        if any(m.startswith("datta_cal") for m in cfg.methods):
            reports[bs], info = cached_calibrate(
                model, domains, bs, cache=cfg.cache_dir, refresh=cfg.recalibrate, n_batches=n_cal,
                lr=cal_rates(cfg.lr), backend=cfg.backend, seed=cfg.seed)
            if info["source"] == "cache":
                log(f"datta_cal for batch size {bs}: loaded from the calibration cache ({info['path']})")
            log(str(reports[bs]))
    log(f"calibration on {', '.join(domains)} ({time.perf_counter() - t0:.1f} s): datta_disp thresholds "
        f"{thresholds}")
    return {"disp_thresholds": thresholds, "cal": reports}


def run_benchmark(cfg: RunConfig, command: str = "", log=print) -> dict:
    """Index the benchmark, build the model, run every method on every stream; return the
    results document (plus the raw :class:`RunResult` s under ``"_runs"``)."""
    cfg.validate()
    t_start = time.perf_counter()
    numerics = pin_numerics(cfg.numerics, log)  # first: the switches hold only before any CPU kernel
    commit = provenance()["commit"]     # the code this run imported (a later commit would not be)
    device = cfg.resolved_device()
    workers = cfg.workers if cfg.workers is not None else default_workers(cfg.dataset, device)
    severities = SEVERITIES if "gradual" in cfg.streams else (cfg.severity,)
    bench = load_benchmark(cfg.dataset, cfg.data_dir, tuple(cfg.corruptions), severities, cfg.severity,
                           cfg.num_ex, cfg.subset)
    per = bench.per_domain[cfg.corruptions[0]]
    log(f"data: {cfg.dataset} from {bench.root}: {len(cfg.corruptions)} corruptions x {per} images at "
        f"severity {cfg.severity}" + (" (+ severities 1-4 for gradual)" if len(severities) > 1 else "")
        + f", {bench.num_classes} classes; loader workers {workers}")
    if cfg.dataset == "imagenet-c" and bench.num_classes != 1000:
        log(f"note: {bench.num_classes} class folders, not ImageNet's 1000: a label is the position of its "
            "wnid among these folders, which matches an ImageNet classifier's outputs only with all 1000")
    if cfg.random_init:
        warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
    norm = (tuple(cfg.mean), tuple(cfg.std)) if cfg.mean is not None else default_normalization(cfg.model)
    model, model_info = build_model(cfg.model, bench.num_classes, cfg.checkpoint, cfg.random_init, cfg.width,
                                    norm, cfg.trust_checkpoint)
    model = model.to(device)
    resolved = backends.resolve(cfg.backend, device, torch.float32)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    log(f"model: {cfg.model} ({model_info['architecture']}, {model_info['parameters'] / 1e6:.2f} M "
        "parameters" + (f", {cfg.checkpoint}" if cfg.checkpoint else "") + f"); device {device} ({where}); "
        f"backend {resolved}")

    score_kw = {"score_layer": None, "score_mode": "pixel", **_calibrate(cfg, model, device, log)}
    streams = [build_stream(bench.pool, s, bs, cfg.seed, severity=cfg.severity,
                            corruptions=list(cfg.corruptions), dirichlet=cfg.dirichlet)
               for bs in cfg.batch_sizes for s in cfg.streams]
    bar = _bar(sum(len(s) for s in streams), cfg.progress)
    runs: list[RunResult] = []
    timing = {"data": 0.0, "methods": 0.0}
    try:
        for stream in streams:
            if bar is not None:
                bar.set_postfix_str(f"{stream.name} / bs{stream.batch_size}", refresh=False)
            runs += _run_stream(model, stream, bench.dataset, cfg.methods, cfg, device, workers, bar, timing,
                                score_kw)
    finally:
        if bar is not None:
            bar.close()
    images = sum(s.num_samples for s in streams)
    data_rate = images / max(timing["data"], 1e-9)
    method_rate = images * len(cfg.methods) / max(timing["methods"], 1e-9)
    log(f"time: {timing['data']:.1f} s waiting for data ({data_rate:,.0f} images/s), "
        f"{timing['methods']:.1f} s in the {len(cfg.methods)} methods ({method_rate:,.0f} images/s "
        "through one method)")

    rows = [_row(r) for r in runs]
    cont = [r for r in rows if r["stream"] == "continual" and r["method"] == "source"]
    src = max(cont, key=lambda r: r["batch_size"])["per_corruption"] if cont else {}
    detectors = [detector_metrics(r) for r in runs if r.stream.startswith("dynamic")
                 and r.method not in ORACLES and any(d is not None for d in r.decisions)]
    config = asdict(cfg)
    config["per_domain"] = per
    return {
        "meta": {"command": command, "commit": commit, "machine": _machine(device), "numerics": numerics,
                 "dataset": TITLES[cfg.dataset],
                 "device": device, "backend": resolved, "backend_requested": cfg.backend,
                 "seeds": {"streams": cfg.seed}, "config": config, "loader_workers": workers,
                 "seconds_waiting_for_data": timing["data"], "seconds_in_methods": timing["methods"],
                 "wall_seconds": time.perf_counter() - t_start},
        "model": {**model_info, "clean_test_accuracy": None},
        "data": {"root": str(bench.root), "per_domain": bench.per_domain, **bench.info},
        "source_accuracy_per_corruption": {c: src.get(c) for c in cfg.corruptions},
        "results": rows,
        "detector": detectors,
        "backend_check": None,
        "_runs": runs,
    }
