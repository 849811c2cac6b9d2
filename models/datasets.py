"""Hosted data sets, read from IDX files with NumPy only (no torch, so the gateway can use it).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``); ``make data`` falls back to torchvision's downloader,
whose ``FashionMNIST/raw`` directory holds the same files. Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("var/data/FashionMNIST/raw"),
)
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOSTED = ("fashion-mnist:train", "fashion-mnist:test")


class DatasetMissingError(FileNotFoundError):
    """The data set files are not on this machine."""


@dataclass(frozen=True)
class Split:
    """One split of a hosted data set: uint8 images ``(N, H, W)`` and int64 labels ``(N,)``."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def slice(self, offset: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Images as float32 NCHW in [0, 1] and labels, for ``[offset, offset + limit)``."""
        images = self.images[offset : offset + limit].astype(np.float32) / 255.0
        return images[:, None, :, :], self.labels[offset : offset + limit].copy()


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the Fashion-MNIST IDX files, or a clear error saying how to get them."""
    candidates = [Path(explicit)] if explicit else []
    env = os.environ.get("ADVERSA_DATA_DIR")
    if env:
        candidates.append(Path(env))
    candidates.extend(DEFAULT_DIRS)
    for candidate in candidates:
        if _path(candidate, _FILES["test"][0]) is not None:
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetMissingError(
        f"Fashion-MNIST not found (looked in {tried}). Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian) or run `make data`, "
        "or point ADVERSA_DATA_DIR at a directory with the IDX files."
    )


def _path(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _open(path: Path) -> gzip.GzipFile | object:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_idx(path: Path, header_only: bool = False) -> tuple[tuple[int, ...], np.ndarray | None]:
    with _open(path) as handle:  # type: ignore[attr-defined]
        magic = handle.read(4)
        if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
            raise ValueError(f"{path}: expected an unsigned-byte IDX file")
        ndim = magic[3]
        dims = tuple(int.from_bytes(handle.read(4), "big") for _ in range(ndim))
        if header_only:
            return dims, None
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    expected = int(np.prod(dims))
    if data.size != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data, got {data.size}")
    return dims, data.reshape(dims)


def parse_name(dataset: str) -> tuple[str, str]:
    """``fashion-mnist:test`` -> ("fashion-mnist", "test"), or ValueError naming the hosted sets."""
    name, _, split = dataset.partition(":")
    if name != "fashion-mnist" or split not in _FILES:
        raise ValueError(f"expected one of {', '.join(HOSTED)}, got {dataset!r}")
    return name, split


def split_size(dataset: str, directory: str | os.PathLike[str] | None = None) -> int:
    """Number of examples in a hosted split, reading only the IDX header."""
    _, split = parse_name(dataset)
    path = _path(data_dir(directory), _FILES[split][1])
    assert path is not None
    dims, _ = _read_idx(path, header_only=True)
    return dims[0]


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, directory: str | None = None) -> Split:
    """Load a hosted split (cached per process)."""
    _, split = parse_name(dataset)
    root = data_dir(directory)
    image_path, label_path = (_path(root, stem) for stem in _FILES[split])
    assert image_path is not None and label_path is not None
    _, images = _read_idx(image_path)
    _, labels = _read_idx(label_path)
    assert images is not None and labels is not None
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return Split(dataset, images, labels.astype(np.int64))
