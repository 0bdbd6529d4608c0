"""``datta-kernels``: ``info`` (what can run here), ``bench`` (kernel timings), ``demo``
(DATTA and the baselines on corrupted Fashion-MNIST streams, fully offline) and ``run`` (the
same on CIFAR-10-C / CIFAR-100-C / ImageNet-C files with a real model).

Run ``datta-kernels <command> --help`` for the options of each command.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import shlex
import sys
import tempfile
import time

import torch

__all__ = ["main"]

#: ``--quick``: fewer images and streams, one model; about 1-2 minutes on a 2-core CPU.
QUICK = {"per_domain": 300, "streams": ("single", "mixed", "dynamic"), "batch_sizes": (16, 64),
         "check_batches": 10, "validation_per_domain": 200, "calibration_batches": 12}
#: (N, C, H, W) of ``bench``: the SmallResNet's stem and last stage at bs 64, then ResNet-50-like
#: layers (early wide-spatial, late many-channel) at bs 32.
BENCH_SHAPES = ((64, 16, 28, 28), (64, 64, 7, 7), (32, 64, 56, 56), (32, 256, 28, 28), (32, 2048, 7, 7))


def _csv(kind=str):
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


# --- info ---------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from . import __version__, _ext, available_backends, backends

    print(f"datta_kernels {__version__}  (torch {torch.__version__}, python {sys.version.split()[0]})")
    print(f"devices: cpu ({torch.get_num_threads()} threads)", end="")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(", cuda: " + ", ".join(names))
    else:
        print(f", no CUDA device (torch built with CUDA {torch.version.cuda})" if torch.version.cuda
              else ", no CUDA (CPU-only torch build)")
    info = _ext.build_info()
    print("compiled extension: " + ("; ".join(f"{k}={v}" for k, v in info.items() if k != "built")
                                    if info.get("built") else "not built"))
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {device} (float32), in auto order:")
        auto = backends.resolve("auto", device, torch.float32)
        for name, why in backends.explain(device).items():
            state = "available" + ("  <- auto" if name == auto else "") if not why else "unavailable"
            print(f"  {name:<10} {state}")
            for reason in why:
                print(f"      - {reason}")
    print(f"available: {', '.join(available_backends())}")
    return 0


# --- bench --------------------------------------------------------------------------------

def _bench_impls(x, names: list[str]) -> dict:
    """Zero-argument callables timing one DABN forward on ``x`` per implementation."""
    from . import dabn, reference
    from .presets import PRESETS

    preset, c, dev = PRESETS["datta"], x.shape[1], x.device
    w, b = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev)
    sm, sv = torch.randn(c, device=dev), torch.rand(c, device=dev) + 0.5
    blend = torch.tensor(preset.multiple, device=dev)
    bn = torch.nn.BatchNorm2d(c).to(device=dev, dtype=x.dtype).eval()
    impls = {"eager reference": lambda: reference.dabn(x, w, b, sm, sv, blend, preset.shrink_k)}
    for name in names:
        impls[f"dabn[{name}]"] = lambda n=name: dabn(x, w, b, sm, sv, blend, shrink_k=preset.shrink_k,
                                                     backend=n)
    impls["nn.BatchNorm2d eval"] = lambda: bn(x)
    return impls


def cmd_bench(args) -> int:
    from . import available_backends
    from .benchmarking import describe_machine, gbps, time_contestants, write_markdown
    from .presets import PRESETS

    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    preset = PRESETS["datta"]
    names = [b for b in available_backends(device) if b != "reference"] + ["reference"]
    print(f"DABN forward, preset datta 'multiple' blend {preset.multiple} (shrink k={preset.shrink_k}), "
          f"{device} {args.dtype}; minimal bytes = 2 reads + 1 write of x")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for shape in BENCH_SHAPES[:args.shapes] if args.shapes else BENCH_SHAPES:
        x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        nbytes = 3 * x.numel() * x.element_size()
        impls = _bench_impls(x, names)
        with torch.no_grad():
            secs = time_contestants(impls, device, reps=5, min_seconds=args.min_seconds * len(impls),
                                    warm_each=False)
        ref_s = secs["eager reference"]
        rows += [["x".join(map(str, shape)), k, f"{s * 1e3:.3f}", f"{gbps(nbytes, s):.1f}",
                  f"{ref_s / s:.2f}x"] for k, s in secs.items()]
    print(write_markdown("", "datta-kernels bench", describe_machine(), (),
                         [(["shape (N,C,H,W)", "impl", "ms", "GB/s", "vs eager ref"], rows)]))
    return 0


# --- demo ---------------------------------------------------------------------------------

def _demo_config(args):
    from .eval.models import TrainConfig
    from .eval.runner import DemoConfig

    cfg = DemoConfig()
    if args.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    cfg.numerics = args.numerics
    overrides = {"epochs": args.epochs, "train_subset": args.train_subset, "width": args.width,
                 "numerics": args.numerics}
    cfg.train = dataclasses.replace(TrainConfig(), **{k: v for k, v in overrides.items() if v is not None})
    for key in ("data_dir", "per_domain", "corruptions", "severity", "streams", "batch_sizes", "methods",
                "lr", "backend", "score_layer", "score_mode", "seed", "check_batches", "cache_dir",
                "validation_per_domain", "validation_severities", "validation_mixing", "daft_objective",
                "validation_corruptions", "stream_probes"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    cfg.retrain, cfg.progress, cfg.recalibrate = args.retrain, not args.no_progress, args.recalibrate
    cfg.report_validation = args.report_validation
    if args.calibration_batches is not None:
        cfg.calibration_batches = args.calibration_batches
    return cfg


def cmd_demo(args) -> int:
    from .eval.datasets import DataFormatError, DataNotFoundError
    from .eval.runner import run_demo

    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: the demo needs {', '.join(missing)} (figure, progress bars): "
              "pip install 'datta_kernels[demo]' or pip install " + " ".join(missing),
              file=sys.stderr)
        return 2
    from .eval.numerics import pin

    pin(args.numerics)  # before check_demo builds a model: the switches hold only before any CPU kernel
    cfg = _demo_config(args)
    t0 = time.perf_counter()
    try:
        cfg.validate()
        why = check_demo(cfg, args.out)
    except (ValueError, DataNotFoundError) as e:
        why = str(e)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    return _run_and_write(args, lambda command: run_demo(cfg, command=command),
                          (DataNotFoundError, DataFormatError), t0)


def _run_and_write(args, experiment, errors: tuple, t0: float, describe=str) -> int:
    """``demo``'s and ``run``'s tail: ``experiment(command)`` (the results document), its
    expected failures ``errors`` as one ``error: describe(e)`` line (exit 2); else the result
    files in ``args.out``, the tables, and what was written in how long (since ``t0``; with
    the device when the document records one)."""
    from .eval.report import format_tables, write_outputs

    command = "datta-kernels " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        doc = experiment(command)
    except errors as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    paths = write_outputs(doc, args.out)
    print()
    print(format_tables(doc))
    took = f"{time.perf_counter() - t0:.0f} s"
    if "device" in doc["meta"]:
        took += f", device {doc['meta']['device']}"
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['summary']} and {paths['figure']} ({took})")
    return 0


# --- run (published benchmarks) -----------------------------------------------------------

def _error_line(e: BaseException) -> str:
    """One line for an error that may come back from a DataLoader worker with its traceback."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
    last = lines[-1]
    for prefix in ("BenchmarkDataError: ", "CheckpointError: "):
        if prefix in last:
            last = last.split(prefix, 1)[1]
    return last


def cmd_run(args) -> int:
    from .eval.bench_runner import RunConfig, run_benchmark
    from .eval.benchmarks import BenchmarkDataError
    from .eval.numerics import pin
    from .eval.zoo import CheckpointError

    if importlib.util.find_spec("matplotlib") is None:
        print("error: run writes a figure and needs matplotlib: pip install 'datta_kernels[demo]'",
              file=sys.stderr)
        return 2
    keys = ("dataset", "data_dir", "model", "checkpoint", "random_init", "trust_checkpoint", "width", "mean",
            "std", "corruptions", "severity", "num_ex", "subset", "streams", "batch_sizes", "methods",
            "dirichlet", "lr", "backend", "device", "workers", "seed", "calibrate_on", "calibration_batches",
            "cache_dir", "numerics")
    pin(args.numerics)  # before any check builds a model: the switches hold only before any CPU kernel
    cfg = RunConfig(**{k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    if (args.subset is not None or args.all_images) and args.dataset != "imagenet-c":
        print("error: --subset / --all-images apply to --dataset imagenet-c only (CIFAR: --num-ex)",
              file=sys.stderr)
        return 2
    if args.all_images:
        if args.subset is not None:
            print("error: --subset and --all-images exclude each other", file=sys.stderr)
            return 2
        cfg.subset = None
    cfg.progress, cfg.recalibrate = not args.no_progress, args.recalibrate
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run_and_write(args, lambda command: run_benchmark(cfg, command=command),
                          (BenchmarkDataError, CheckpointError), time.perf_counter(), _error_line)


def _add_run_parser(sub) -> None:
    from .eval.numerics import MODES

    r = sub.add_parser("run", help="DATTA vs baselines on CIFAR-10-C / CIFAR-100-C / ImageNet-C, real models",
                       description="Run every method on the published corruption benchmarks, read from "
                       "local files in their published layouts (nothing is downloaded). Streams: continual, "
                       "mixed_domains, correlated, dynamic, dynamic_random, gradual (README: 'Running on "
                       "the published benchmarks').")
    r.add_argument("--dataset", required=True, help="cifar10-c, cifar100-c or imagenet-c")
    r.add_argument("--data-dir", required=True, help="CIFAR: folder of <corruption>.npy + labels.npy; "
                   "ImageNet-C: folder of <corruption>/<severity>/<wnid>/*.JPEG")
    r.add_argument("--model", required=True, help="wrn28-10, resnet26, torchvision:<name>, or a file "
                   "written by torch.save(model)")
    r.add_argument("--checkpoint", default=None, help="weights for --model (a state dict, or one under "
                   "'state_dict'/'model', 'module.' prefix allowed)")
    r.add_argument("--random-init", action="store_true", help="no checkpoint: random weights (accuracies "
                   "mean nothing; for checking the pipeline)")
    r.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints holding pickled Python objects (only for files you trust)")
    r.add_argument("--width", type=int, default=None,
                   help="widen factor of wrn28-10 (default 10) / base width of resnet26 (default 16)")
    r.add_argument("--mean", type=_csv(float), default=None, help="input mean per channel, e.g. "
                   "0.485,0.456,0.406 (default: ImageNet's for torchvision:*, none otherwise)")
    r.add_argument("--std", type=_csv(float), default=None, help="input std per channel (with --mean)")
    r.add_argument("--corruptions", type=_csv(), default=None, help="comma-separated (default: the 15)")
    r.add_argument("--severity", type=int, default=None, help="1..5 (default 5)")
    r.add_argument("--num-ex", type=int, default=None, help="images per corruption (default: all)")
    r.add_argument("--subset", type=int, default=None,
                   help="ImageNet-C: the fixed seeded subset size (default 5000)")
    r.add_argument("--all-images", action="store_true", help="ImageNet-C: all 50000 images, no subset")
    r.add_argument("--streams", type=_csv(), default=None, help="comma-separated (default continual)")
    r.add_argument("--batch-size", "--batch-sizes", dest="batch_sizes", type=_csv(int), default=None,
                   help="e.g. 64 or 16,64 (default 64)")
    r.add_argument("--methods", type=_csv(), default=None, help="default source,tbn,tent,datta")
    r.add_argument("--calibrate-on", type=_csv(), default=None,
                   help="validation corruptions that calibrate datta_disp / datta_cal, never reported "
                   "(CIFAR-10-C's extra: speckle_noise,gaussian_blur,spatter,saturate)")
    r.add_argument("--calibration-batches", type=_int_at_least(2), default=None,
                   help="validation batches of each type that calibrate datta_disp / datta_cal (default: "
                   "about 3,000 images of each type, at least 40 batches)")
    r.add_argument("--recalibrate", action="store_true",
                   help="calibrate datta_cal again, ignoring the calibration cache")
    r.add_argument("--cache-dir", default=None,
                   help="calibration cache (default $XDG_CACHE_HOME/datta_kernels)")
    r.add_argument("--dirichlet", type=float, default=None,
                   help="correlated stream: Dirichlet concentration (default: label-sorted)")
    r.add_argument("--lr", type=float, default=None, help="entropy-step lr of tent and datta (default 1e-3)")
    r.add_argument("--backend", default=None, help="kernel backend (default auto)")
    r.add_argument("--numerics", default="native", choices=MODES,
                   help="CPU numerics: native (default, as torch finds this machine) or portable "
                   "(AVX2 kernels, 2 threads: the same numbers across vector widths and core counts; "
                   "AMD and Intel CPUs still differ)")
    r.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: ImageNet-C min(8, CPUs) on CUDA, 1 on CPU; "
                   "CIFAR-C 2 on CUDA, 0 on CPU)")
    r.add_argument("--seed", type=int, default=None, help="seed of the streams (default 0)")
    r.add_argument("--out", default="datta-out", help="output directory (default ./datta-out)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- argument checks: everything that can be wrong is found before anything is computed ------

class _Parser(argparse.ArgumentParser):
    """``argparse`` whose mistakes answer with one line, ``prog: error: ...``, and exit status 2
    (the default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _seed(text: str) -> int:
    """argparse type: a seed in [0, 2**32) (the streams multiply it; torch seeds are 64-bit)."""
    value = _int_at_least(0)(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32, got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: a non-empty comma-separated list of integers >= 1."""
    parse = _int_at_least(1)
    values = tuple(parse(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def _severities(text: str) -> tuple[int, ...]:
    """argparse type: a non-empty comma-separated list of distinct corruption severities 1..5."""
    from .eval.corruptions import check_severities
    try:
        return check_severities(_positive_ints(text), repr(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(what: str, known):
    """argparse type: a non-empty comma-separated subset of ``known``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"needs at least one {what}")
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(bad)}; choose from "
                                             + ", ".join(known))
        return names
    return parse


def _writable_dir(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be used as an output directory (None: it can). Creates it and
    writes (then removes) a probe file, so a finished run is never lost to its output."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"{flag} {path}: not a writable directory ({e.strerror or e})"
    return None


def check_demo(cfg, out: str) -> str | None:
    """Every mistake in a demo configuration that shows without loading data or training: the
    first one as a one-line message naming the bad value or file (None: all fine). Checks
    what argparse types cannot: the backend can run here, the score layer exists in the model
    (built, not trained), the output and cache directories are writable, the data files read."""
    from torch import nn

    from . import backends
    from .eval.datasets import DataFormatError, check_data_files, find_data_dir
    from .eval.models import cache_dir

    try:
        backends.resolve(cfg.backend, "cpu", torch.float32)
    except (ValueError, RuntimeError) as e:
        return f"--backend {cfg.backend}: {e}"
    if cfg.score_layer is not None:
        model = cfg.train.build()
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if cfg.score_layer not in layers:
            return (f"--score-layer {cfg.score_layer!r} is not a BatchNorm2d of the demo model; "
                    f"choose from {', '.join(layers)}")
    why = _writable_dir(out, "--out")
    if why:
        return why
    cache = cache_dir(cfg.cache_dir)
    # a model will be saved, or a calibration may be
    if (cfg.retrain or not any(cache.glob(f"*{cfg.train.key()}.pt"))
            or any(m.startswith("datta_cal") for m in cfg.methods)):
        why = _writable_dir(str(cache), "--cache-dir")
        if why:
            return why
    root = find_data_dir(cfg.data_dir)          # DataNotFoundError: the caller prints how to get it
    try:
        check_data_files(root)
    except DataFormatError as e:
        return f"data: {e}"
    return None


def build_parser() -> argparse.ArgumentParser:
    from .backends import backend_names
    from .calibration import DAFT_OBJECTIVES
    from .eval.corruptions import CORRUPTIONS
    from .eval.numerics import MODES
    from .eval.runner import METHODS, MIXINGS, STREAM_PROBES
    from .eval.streams import STREAMS
    from .eval.validation import VALIDATION

    p = _Parser(prog="datta-kernels", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="version, devices, which backends can run and why not")

    b = sub.add_parser("bench", help="time the DABN forward kernels against the eager reference")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"))
    b.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    b.add_argument("--shapes", type=_int_at_least(1), default=None,
                   help=f"only the first N shapes (1..{len(BENCH_SHAPES)})")
    b.add_argument("--min-seconds", type=_positive_float, default=0.3, help="time budget per measurement")

    d = sub.add_parser("demo", help="DATTA vs baselines on corrupted Fashion-MNIST streams (offline)",
                       description="Train (or load the cached) small ResNet on clean Fashion-MNIST, "
                       "corrupt the test set, and run every method on every stream. Needs the dataset "
                       "locally: `apt-get install dataset-fashion-mnist` or --data-dir.")
    d.add_argument("--out", default="datta-out", help="output directory (default ./datta-out)")
    d.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST idx files (.gz or not)")
    d.add_argument("--quick", action="store_true",
                   help=f"smaller run (~1-2 min): {QUICK['per_domain']} images per corruption, "
                   f"streams {','.join(QUICK['streams'])}")
    d.add_argument("--per-domain", "--subset", dest="per_domain", type=_int_at_least(2), default=None,
                   help="test images per corruption (default 1000)")
    d.add_argument("--corruptions", type=_names("corruption", CORRUPTIONS), default=None,
                   help="comma-separated subset of: " + ", ".join(CORRUPTIONS) + " (default: every one "
                   "that is not a validation corruption, 13 with the default validation corruptions)")
    d.add_argument("--validation-corruptions", type=_names("corruption", CORRUPTIONS), default=None,
                   help="comma-separated corruptions that calibrate datta_disp / datta_cal and are never "
                   "reported on (default " + ",".join(VALIDATION) + "); the test corruptions are the rest")
    d.add_argument("--report-validation", action="store_true",
                   help="allow --corruptions to name a validation corruption (default speckle_noise, "
                   "gaussian_blur, spatter); its numbers are labelled as validation numbers")
    d.add_argument("--calibration-batches", type=_int_at_least(2), default=None,
                   help="validation batches of each type that calibrate datta_disp / datta_cal "
                   "(default: about 3,000 images of each type, at least 40 batches)")
    d.add_argument("--validation-per-domain", type=_int_at_least(2), default=None,
                   help="images of each validation domain (the validation corruptions at severities "
                   "1-5 of the second half of the test set, and clean held-out training images) that "
                   "calibrate datta_disp / datta_cal (default 1000; at least the largest batch size; "
                   "fewer: a faster, noisier calibration)")
    d.add_argument("--validation-severities", type=_severities, default=None,
                   help="comma-separated severities of the validation corruptions that calibrate "
                   "datta_disp / datta_cal (default 1,2,3,4,5: choices independent of --severity; "
                   "e.g. 5 with --severity 5 calibrates for a deployment of known severity)")
    d.add_argument("--validation-mixing", default=None, choices=MIXINGS,
                   help="what a mixed validation batch of datta_cal's calibration pools: all = every "
                   "validation domain (default), severity = the validation corruptions of one severity, "
                   "as a test stream's mixed batches pool the corruptions of one (SPEC §6)")
    d.add_argument("--daft-objective", default=None, choices=DAFT_OBJECTIVES,
                   help="how datta_cal's calibration ranks DAFT's settings on the validation streams: "
                   "mean = their mean accuracy (default), margin = their smallest margin against the "
                   "best of source, tbn, bn_adapt, tent and dyn on each stream (SPEC §6 step 5)")
    d.add_argument("--stream-probes", default=None, choices=STREAM_PROBES,
                   help="which class probe decides the batches of datta_cal's validation streams: "
                   "held_out = the one fitted without the batch's corruption family, as a test batch "
                   "meets a probe that never saw its corruption (default), deployed = the one fitted "
                   "on every family (SPEC §6 step 4)")
    d.add_argument("--severity", type=int, default=None, choices=range(1, 6), help="1..5 (default 3)")
    d.add_argument("--streams", type=_names("stream", STREAMS), default=None,
                   help="comma-separated subset of: " + ", ".join(STREAMS) + " (default all)")
    d.add_argument("--batch-sizes", type=_positive_ints, default=None, help="e.g. 16,64 (default)")
    d.add_argument("--methods", type=_names("method", METHODS), default=None,
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default all)")
    d.add_argument("--lr", type=_positive_float, default=None,
                   help="entropy-step lr of tent and datta (default 1e-3)")
    d.add_argument("--backend", default=None, choices=("auto",) + backend_names(),
                   help="kernel backend for every method: auto (default), " + ", ".join(backend_names())
                   + "; `datta-kernels info` says which can run here")
    d.add_argument("--score-layer", default=None,
                   help="module name of the BatchNorm where DATTA scores diversity, e.g. bn1, "
                   "layers.0.bn1, layers.1.bn2 (default: the first; with --score-mode dispersion the "
                   "first whose input is nonlinear in the image)")
    d.add_argument("--score-mode", default=None, choices=("pixel", "instance", "dispersion"),
                   help="diversity score mode of the datta/datta_icme/datta_noft/datta_oracle rows "
                   "(default pixel, the authors'; instance is an approximation; the datta_disp row "
                   "always uses dispersion)")
    d.add_argument("--seed", type=_seed, default=None, help="seed of test subset, corruptions and streams")
    d.add_argument("--check-batches", type=_int_at_least(0), default=None,
                   help="batches of the reference-backend agreement check (0 skips it)")
    d.add_argument("--retrain", action="store_true", help="retrain the source model, ignoring the cache")
    d.add_argument("--recalibrate", action="store_true",
                   help="calibrate datta_cal again, ignoring the calibration cache (which holds calibrate's "
                   "choices keyed on the model, the validation data, the settings, the code and the machine)")
    d.add_argument("--cache-dir", default=None,
                   help="model and calibration cache (default $XDG_CACHE_HOME/datta_kernels)")
    d.add_argument("--train-subset", type=_int_at_least(1), default=None,
                   help="training images (default 45000)")
    d.add_argument("--epochs", type=_int_at_least(1), default=None, help="training epochs (default 2)")
    d.add_argument("--width", type=_int_at_least(1), default=None, help="ResNet base width (default 16)")
    d.add_argument("--numerics", default="portable", choices=MODES,
                   help="portable (default): train and adapt on AVX2 kernels and 2 threads, the same "
                   "numbers on AMD CPUs with AVX2 or AVX-512 (those of bench/results/demo.md; an "
                   "Intel CPU gives its own); native: "
                   "as torch finds this machine (faster on wide CPUs; its own model copy and numbers)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return {"info": cmd_info, "bench": cmd_bench, "demo": cmd_demo, "run": cmd_run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
