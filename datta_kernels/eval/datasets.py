"""Fashion-MNIST from local idx files: nothing is ever downloaded at run time.

The idx format (LeCun et al.) is a big-endian header — two zero bytes, a dtype code, the
number of dimensions ``d`` — then ``d`` big-endian uint32 sizes, then the raw array. Files may
be gzipped (``.gz``, as Debian's ``dataset-fashion-mnist`` ships them) or plain.

Shapes: images come back as ``(N, 1, 28, 28)`` float32 in ``[0, 1]``, labels as ``(N,)`` int64.
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASSES",
    "DEFAULT_DIRS",
    "ENV_VAR",
    "DataFormatError",
    "DataNotFoundError",
    "FashionMNIST",
    "check_data_files",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
    "write_synthetic",
]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: Where we look when no directory is given, in order.  The first is what
#: ``apt-get install dataset-fashion-mnist`` creates on Debian/Ubuntu.
DEFAULT_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)
ENV_VAR = "DATTA_FASHION_MNIST"

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx dtype codes -> numpy dtypes (big-endian where it matters).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).str.lstrip("<>|"): k for k, v in _IDX_DTYPES.items()}

_HOW_TO_GET = (
    "Fashion-MNIST was not found. Either\n"
    "  * install it system-wide:  sudo apt-get install dataset-fashion-mnist\n"
    "    (puts the idx files under /usr/share/datasets/fashion-mnist), or\n"
    "  * point to any directory holding the four standard idx files, gzipped or not\n"
    "    (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,\n"
    f"    t10k-labels-idx1-ubyte): pass --data-dir DIR or set {ENV_VAR}=DIR.\n"
    "Nothing is downloaded at run time."
)


class DataNotFoundError(FileNotFoundError):
    """Raised with instructions when no directory holds the idx files."""


class DataFormatError(ValueError):
    """Raised when an idx file is unreadable: truncated, corrupt or not idx (names the file)."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one idx file (``.gz`` or plain) into a numpy array of its declared shape."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        # a truncated .gz ends in EOFError, a corrupt one in BadGzipFile (OSError) / zlib.error
        raise DataFormatError(f"{path}: cannot be read, truncated or corrupt ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(f"{path} is not an idx file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown idx dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: {len(data)} bytes, shorter than its header (truncated)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataFormatError(f"{path}: {len(data)} bytes, the header {dims} implies {expected} "
                              "(truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzipped when ``path`` ends in ``.gz``); used by tests."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _IDX_CODES[array.dtype.str.lstrip("<>|")]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _split_files(root: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` under ``root``, preferring plain over ``.gz``."""
    found = []
    for stem in _SPLITS[split]:
        candidates = [root / stem, root / f"{stem}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding all four idx files.

    An explicit ``data_dir`` must hold them (no fallback, so a typo is not silently ignored);
    otherwise ``$DATTA_FASHION_MNIST`` and then :data:`DEFAULT_DIRS` are tried.
    Raises :class:`DataNotFoundError` with instructions when nothing fits.
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get(ENV_VAR):
        candidates = [Path(os.environ[ENV_VAR])]
    else:
        candidates = list(DEFAULT_DIRS)
    for root in candidates:
        if all(_split_files(root, s) is not None for s in _SPLITS):
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(f"{_HOW_TO_GET}\n(looked in: {tried})")


@dataclass
class FashionMNIST:
    """Both splits in memory: images ``(N, 1, 28, 28)`` float32 in [0, 1], labels ``(N,)`` int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    root: Path

    @property
    def num_classes(self) -> int:
        return len(CLASSES)


def _load_split(root: Path, split: str) -> tuple[Tensor, Tensor]:
    img_path, lbl_path = _split_files(root, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(f"{root} ({split}): images {images.shape} and labels {labels.shape} "
                              "do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def check_data_files(root: str | os.PathLike) -> None:
    """Read every idx file under ``root`` once and check it (header, length, labels matching
    images): raises :class:`DataFormatError` naming the first bad file. About a second for
    Fashion-MNIST; lets a command reject bad data before it trains anything."""
    for split in _SPLITS:
        img_path, lbl_path = _split_files(Path(root), split)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataFormatError(f"{img_path} {images.shape} and {lbl_path} {labels.shape} do not match")


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> FashionMNIST:
    """Find (see :func:`find_data_dir`) and load both splits of Fashion-MNIST."""
    root = find_data_dir(data_dir)
    train_x, train_y = _load_split(root, "train")
    test_x, test_y = _load_split(root, "test")
    return FashionMNIST(train_x, train_y, test_x, test_y, root)


def write_synthetic(root: str | os.PathLike, n_train: int = 512, n_test: int = 256, seed: int = 0,
                    gz: bool = True) -> Path:
    """Write a tiny, learnable stand-in for Fashion-MNIST (same file names and format) into
    ``root``: class ``k`` is a bright rectangle whose position and shape depend on ``k``, on
    a dark background, plus noise. For tests and CI without the real dataset."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, len(CLASSES), n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.int16)
        for i, k in enumerate(labels):
            top, left = 3 + 2 * (k % 5), 3 + 3 * (k // 5) + int(rng.integers(0, 3))
            h, w = 8 + k, 18 - k
            images[i, top:top + h, left:left + w] += 150 + int(rng.integers(0, 60))
        img_name, lbl_name = _SPLITS[split]
        write_idx(root / f"{img_name}{suffix}", images.clip(0, 255).astype(np.uint8))
        write_idx(root / f"{lbl_name}{suffix}", labels)
    return root
