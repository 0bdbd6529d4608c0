"""CIFAR-10-C / CIFAR-100-C and ImageNet-C in their published layouts, read lazily.

Nothing is downloaded and nothing is loaded whole: a benchmark is an *index* (labels, which
domain each sample belongs to, where its pixels live) plus a :class:`BenchmarkDataset` that a
``DataLoader`` asks for one whole batch at a time (``dataset[list_of_indices]``), so decoding
runs in the loader's workers while the model computes.

Layouts (exactly as published):

- **CIFAR-10-C / CIFAR-100-C**: one folder holding ``<corruption>.npy`` of shape
  ``(5·n, 32, 32, 3)`` uint8 — severities 1..5 in that order, ``n`` images each (``n = 10 000``
  in the published files) — and ``labels.npy`` (integer dtype) of length ``5·n`` (the published
  one: the ``n`` test labels repeated per severity) or ``n``. Any ``n >= 1`` is accepted as long
  as every file agrees; ``n`` is the file length / 5. The arrays are memory-mapped
  (``np.load(mmap_mode="r")``); a batch reads only its rows.
- **ImageNet-C**: ``<corruption>/<severity>/<wnid>/<image>`` (``.JPEG``, any case, or ``.png``);
  the class index is the position of the wnid among the sorted wnid folders. Images are decoded
  with PIL, resized (shorter side 256, bilinear) and center-cropped (224), no torchvision needed.
  ``subset=5000`` (:data:`IMAGENET_SUBSET`) takes the common 5 000-image subset used by
  RobustBench-style evaluations, defined here as: the sorted list of ``(wnid, file name)`` pairs of
  each domain folder, permuted by ``torch.randperm(len, generator=torch.Generator().manual_seed(0))``,
  first 5 000 — a fixed list for a given file tree, independent of ``--seed``. ``subset=None``
  takes all images (50 000 per domain in the published data).

Every batch comes back as ``(uint8 images (B, 3, H, W), int64 labels (B,))``; the caller moves
it to the device and scales it to ``[0, 1]`` there (4× fewer bytes over the bus than float32).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .streams import DomainPool

__all__ = ["CIFAR_CORRUPTIONS", "DATASETS", "IMAGENET_SUBSET", "IMAGE_EXTENSIONS", "Benchmark",
           "BenchmarkDataError", "BenchmarkDataset", "load_benchmark", "load_cifar_c", "load_imagenet_c",
           "domain_name", "write_synthetic_cifar_c"]

#: The 15 benchmark corruptions of Hendrycks & Dietterich (2019), in their usual order.
CIFAR_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                     "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                     "elastic_transform", "pixelate", "jpeg_compression")
#: Dataset name -> number of classes (None: from the wnid folders).
DATASETS = {"cifar10-c": 10, "cifar100-c": 100, "imagenet-c": None}
IMAGENET_SUBSET = 5000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class BenchmarkDataError(ValueError):
    """A benchmark file or folder is missing or not in the published layout (names the path)."""


def domain_name(corruption: str, severity: int, main_severity: int) -> str:
    """``gaussian_noise`` at the run's severity, ``gaussian_noise@3`` at any other."""
    return corruption if severity == main_severity else f"{corruption}@{severity}"


@dataclass
class _Domain:
    """One (corruption, severity): where its samples live and their labels."""

    corruption: str
    severity: int
    labels: Tensor                      # (n,) int64
    rows: np.ndarray | None = None      # CIFAR: row indices into <corruption>.npy
    path: Path | None = None            # CIFAR: the .npy file
    files: list[Path] = field(default_factory=list)   # ImageNet-C: one image per sample


class BenchmarkDataset(torch.utils.data.Dataset):
    """Samples of every domain laid end to end (global index = domain offset + local index).

    ``dataset[indices]`` (a list or 1-D tensor) returns one batch ``(uint8 (B, 3, H, W), int64 (B,))``;
    use it with ``DataLoader(dataset, sampler=batches, batch_size=None)``.
    """

    def __init__(self, domains: list[_Domain], kind: str, resize: int = 256, crop: int = 224):
        self.domains, self.kind, self.resize, self.crop = domains, kind, resize, crop
        sizes = [len(d.labels) for d in domains]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._arrays: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        # Worker processes open their own memory maps (a pickled memmap would be copied whole).
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._arrays:
            self._arrays[path] = np.load(path, mmap_mode="r")
        return self._arrays[path]

    def _locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)})")
        d = np.searchsorted(self.offsets, idx, side="right") - 1
        return d, idx - self.offsets[d]

    def __getitem__(self, indices) -> tuple[Tensor, Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        d, local = self._locate(idx)
        # numpy, not torch, scatters the rows: torch's CPU index_put on uint8 took ~10 ms a batch.
        y = np.empty(len(idx), dtype=np.int64)
        if self.kind == "cifar":
            x = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
            for k in np.unique(d):
                pos = np.nonzero(d == k)[0]
                dom = self.domains[k]
                rows = dom.rows[local[pos]]
                order = np.argsort(rows, kind="stable")
                # Sorted rows read the memory map front to back; then put them back in batch order.
                x[pos[order]] = self._array(dom.path)[rows[order]]
                y[pos] = dom.labels.numpy()[local[pos]]
            return torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)
        x = torch.empty((len(idx), 3, self.crop, self.crop), dtype=torch.uint8)
        for i, (a, b) in enumerate(zip(d, local)):
            dom = self.domains[a]
            x[i] = decode_image(dom.files[b], self.resize, self.crop)
            y[i] = int(dom.labels[b])
        return x, torch.from_numpy(y)


def decode_image(path: Path, resize: int = 256, crop: int = 224) -> Tensor:
    """PIL decode -> RGB -> shorter side ``resize`` (bilinear) -> center ``crop``: uint8 (3, crop, crop)."""
    from PIL import Image  # checked by RunConfig.validate; a dependency of matplotlib ([demo])

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resize / min(w, h)
            nw, nh = max(crop, round(w * scale)), max(crop, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - crop) // 2, (nh - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise BenchmarkDataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@dataclass
class Benchmark:
    """An indexed benchmark: the :class:`BenchmarkDataset`, a label-only :class:`DomainPool`
    for the stream builders (its ``x`` is empty: pixels come from the dataset) and facts."""

    name: str
    root: Path
    dataset: BenchmarkDataset
    pool: DomainPool
    num_classes: int
    per_domain: dict[str, int]
    info: dict = field(default_factory=dict)


def _pool(domains: list[_Domain], main_severity: int) -> DomainPool:
    names = [domain_name(d.corruption, d.severity, main_severity) for d in domains]
    y = torch.cat([d.labels for d in domains])
    dom = torch.cat([torch.full((len(d.labels),), i, dtype=torch.int64) for i, d in enumerate(domains)])
    return DomainPool(torch.empty(0), y, dom, names)


def _check_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise BenchmarkDataError(f"{root}: {what} folder not found")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:
        raise BenchmarkDataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    return arr.shape, arr.dtype


def load_cifar_c(root: str | os.PathLike, corruptions: tuple[str, ...], severities: tuple[int, ...],
                 main_severity: int, num_ex: int | None = None, name: str = "cifar10-c",
                 num_classes: int = 10) -> Benchmark:
    """Index CIFAR-10-C / CIFAR-100-C under ``root``: the first ``num_ex`` images (all when None)
    of each corruption at each severity. Checks every file's shape and dtype without reading it."""
    root = Path(root)
    _check_dir(root, f"{name} data")
    lab_path = root / "labels.npy"
    if not lab_path.is_file():
        raise BenchmarkDataError(f"{lab_path}: labels file not found ({name} needs labels.npy next to "
                                 "the <corruption>.npy files)")
    n_total = None
    for c in corruptions:
        path = root / f"{c}.npy"
        if not path.is_file():
            have = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
            raise BenchmarkDataError(f"{path}: corruption {c!r} not found "
                                     f"(present: {', '.join(have) or 'none'})")
        shape, dtype = _npy_header(path)
        if len(shape) != 4 or shape[1:] != (32, 32, 3) or shape[0] < 5 or shape[0] % 5:
            raise BenchmarkDataError(f"{path}: shape {tuple(shape)}, expected (5*n, 32, 32, 3) "
                                     "(severities 1..5 x n images, n = 10000 published)")
        if dtype != np.uint8:
            raise BenchmarkDataError(f"{path}: dtype {dtype}, expected uint8")
        if n_total is not None and shape[0] != n_total:
            raise BenchmarkDataError(f"{path}: {shape[0]} images, but {corruptions[0]}.npy has {n_total}")
        n_total = shape[0]
    n = n_total // 5
    shape, dtype = _npy_header(lab_path)
    if len(shape) != 1 or shape[0] not in (n, 5 * n) or not np.issubdtype(dtype, np.integer):
        raise BenchmarkDataError(f"{lab_path}: shape {tuple(shape)} dtype {dtype}, expected integer labels "
                                 f"of length {5 * n} (or {n}) to match the {n_total} images per corruption")
    labels_all = np.asarray(np.load(lab_path, mmap_mode="r")).astype(np.int64)
    if labels_all.min(initial=0) < 0 or labels_all.max(initial=0) >= num_classes:
        raise BenchmarkDataError(f"{lab_path}: labels outside 0..{num_classes - 1} for {name}")
    take = n if num_ex is None else min(num_ex, n)
    domains = []
    for c in corruptions:
        for s in severities:
            rows = np.arange((s - 1) * n, (s - 1) * n + take, dtype=np.int64)
            lab = labels_all[rows] if len(labels_all) == 5 * n else labels_all[:take]
            domains.append(_Domain(c, s, torch.from_numpy(lab.copy()), rows=rows, path=root / f"{c}.npy"))
    ds = BenchmarkDataset(domains, "cifar")
    pool = _pool(domains, main_severity)
    return Benchmark(name, root, ds, pool, num_classes, {nm: take for nm in pool.names},
                     {"images_per_severity_in_files": n, "image_size": (32, 32)})


def _list_domain(folder: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """Sorted wnids and sorted ``(wnid, file)`` pairs of one ``<corruption>/<severity>`` folder."""
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not wnids:
        raise BenchmarkDataError(f"{folder}: no class (wnid) folders")
    items = []
    for w in wnids:
        files = sorted(p for p in (folder / w).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise BenchmarkDataError(f"{folder / w}: empty class folder "
                                     f"(no {'/'.join(IMAGE_EXTENSIONS)} images)")
        items += [(w, f) for f in files]
    return wnids, items


def load_imagenet_c(root: str | os.PathLike, corruptions: tuple[str, ...], severities: tuple[int, ...],
                    main_severity: int, num_ex: int | None = None, subset: int | None = IMAGENET_SUBSET,
                    resize: int = 256, crop: int = 224) -> Benchmark:
    """Index ImageNet-C under ``root``. ``subset``: the fixed seeded subset of that many images per
    domain (see the module docstring; None = all), then the first ``num_ex`` of it (None = all)."""
    root = Path(root)
    _check_dir(root, "imagenet-c data")
    classes: list[str] | None = None
    domains = []
    for c in corruptions:
        _check_dir(root / c, f"corruption {c!r}")
        for s in severities:
            folder = root / c / str(s)
            _check_dir(folder, f"severity {s} of corruption {c!r}")
            wnids, items = _list_domain(folder)
            if classes is None:
                classes = wnids
            elif wnids != classes:
                raise BenchmarkDataError(f"{folder}: {len(wnids)} class folders differ from the "
                                         f"{len(classes)} of {root / corruptions[0] / str(severities[0])}")
            if subset is not None and subset < len(items):
                perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:subset]
                items = [items[i] for i in perm.tolist()]
            if num_ex is not None:
                items = items[:num_ex]
            index = {w: i for i, w in enumerate(classes)}
            labels = torch.tensor([index[w] for w, _ in items], dtype=torch.int64)
            domains.append(_Domain(c, s, labels, files=[f for _, f in items]))
    ds = BenchmarkDataset(domains, "imagenet", resize=resize, crop=crop)
    pool = _pool(domains, main_severity)
    return Benchmark("imagenet-c", root, ds, pool, len(classes),
                     {nm: len(d.labels) for nm, d in zip(pool.names, domains)},
                     {"classes": len(classes), "subset": subset, "resize": resize, "crop": crop,
                      "image_size": (crop, crop)})


def write_synthetic_cifar_c(root: str | os.PathLike, corruptions=("gaussian_noise",), n: int = 10000,
                            num_classes: int = 10, seed: int = 0) -> Path:
    """Write random CIFAR-C files in the published layout (``<c>.npy`` ``(5n, 32, 32, 3)`` uint8,
    ``labels.npy`` ``(5n,)`` int64) for smoke runs and loader timings; written through a memory
    map, so a full-size file (n = 10 000, 154 MB) never sits in memory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(root / "labels.npy", np.tile(rng.integers(0, num_classes, n), 5).astype(np.int64))
    for c in corruptions:
        out = np.lib.format.open_memmap(root / f"{c}.npy", mode="w+", dtype=np.uint8,
                                        shape=(5 * n, 32, 32, 3))
        for i in range(0, 5 * n, 5000):
            out[i:i + 5000] = rng.integers(0, 256, out[i:i + 5000].shape, dtype=np.uint8)
        out.flush()
        del out
    return root


def load_benchmark(name: str, root, corruptions, severities, main_severity, num_ex=None,
                   subset: int | None = IMAGENET_SUBSET) -> Benchmark:
    """Dispatch on ``name`` (a key of :data:`DATASETS`)."""
    if name == "imagenet-c":
        return load_imagenet_c(root, corruptions, severities, main_severity, num_ex, subset)
    if name in DATASETS:
        return load_cifar_c(root, corruptions, severities, main_severity, num_ex, name, DATASETS[name])
    raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
