"""Data sets, with NumPy and Pillow only (no torch, so the gateway can use it).

Three kinds of data have a reference that jobs name (``{"dataset": ref, "offset": .., "limit": ..}``):

- ``fashion-mnist:train|test``: Fashion-MNIST, from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``); ``make data`` falls back to torchvision's downloader,
  whose ``FashionMNIST/raw`` directory holds the same files. Nothing is downloaded at run time.
- ``skimage-patches:train|test``: 32x32 RGB patches of the eight colour photographs that
  scikit-image's wheel ships in ``skimage/data``, each patch labelled by the photo it was cut from
  (see ``build_skimage_patches``). A substitute for an RGB benchmark, not CIFAR.
- a team's own sets, uploaded through ``POST /v1/datasets``: ``name[@version]:split`` (the latest
  version without ``@``). Their cards live under ``<var>/datasets/<name>/<version>/card.json``
  (``DatasetIndex``; in the store's ``registry/datasets`` with the S3 store,
  ``models.registry_store``); the arrays live once in the blob store, content-addressed
  (``datasets/<sha256>.npz``), however many versions name them.

``DataCatalog`` resolves a reference for a team (hosted sets and its own; another team's set is
as unknown as one that does not exist), describes it without loading it, and loads slices as
float32 NCHW in [0, 1] with int64 labels; ``to_bounds`` maps them into a model's input bounds.
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import hashlib
import importlib.util
import io
import os
import re
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from models.manifest import NAME_RE, RegistryCard, VersionedIndex, parse_ref
from models.store import BlobNotFoundError, BlobStore

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
SPLIT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


# --- errors: each says which HTTP status the gateway answers -------------------------------------


class DataError(Exception):
    """A data reference that cannot be served; the message says what was expected."""


class InvalidReferenceError(DataError, ValueError):
    """The reference is malformed or names a split the set does not have (422)."""


class UnknownDatasetError(DataError, LookupError):
    """No such data set or version visible to this team (404 on ``/v1/datasets``, 422 in a job)."""


class DatasetMissingError(DataError, FileNotFoundError):
    """The data set is known but its data is not on this machine or in the store (503)."""


# --- Fashion-MNIST -------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=4)
def _fashion_labels(split: str, directory: str | None) -> np.ndarray:
    """The labels of a Fashion-MNIST split alone (the gateway checks targets without the images)."""
    path = _path(data_dir(directory), _FILES[split][1])
    assert path is not None
    _, labels = _read_idx(path)
    assert labels is not None
    return labels.astype(np.int64)


# --- skimage-patches -----------------------------------------------------------------------------

SKIMAGE_PHOTOS = (
    ("astronaut.png", "astronaut"),
    ("chelsea.png", "cat (chelsea)"),
    ("coffee.png", "coffee cup"),
    ("hubble_deep_field.jpg", "galaxies (hubble deep field)"),
    ("ihc.png", "tissue stain (ihc)"),
    ("motorcycle_left.png", "motorcycle"),
    ("retina.jpg", "retina"),
    ("rocket.jpg", "rocket"),
)
SKIMAGE_CLASSES = tuple(label for _, label in SKIMAGE_PHOTOS)
PATCH = 32
PATCHES_PER_CLASS = {"train": 600, "test": 150}
TEST_FRACTION = 0.3  # the right 30% of every photo's width is the test region
SCALES = (160, 224)  # the photo's shorter side after resizing; patches are spread over both
SKIMAGE_SEED = 20240601


def skimage_data_dir() -> Path:
    """``skimage/data`` of the installed scikit-image (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        directory = Path(location) / "data"
        if all((directory / name).is_file() for name, _ in SKIMAGE_PHOTOS):
            return directory
    raise DatasetMissingError(
        "skimage-patches: expected scikit-image's bundled photographs "
        f"({', '.join(name for name, _ in SKIMAGE_PHOTOS)}) in skimage/data, got "
        f"{'no scikit-image' if not locations else 'an installation without them'}; "
        "install it with `pip install 'scikit-image>=0.24'` (the wheel ships them, nothing is downloaded)"
    )


@dataclass(frozen=True)
class _Region:
    """Where the patches of one (photo, split, scale) come from: the photo's columns
    ``[left, right)`` at full resolution, resized to ``size`` (W, H)."""

    photo: int
    left: int
    right: int
    size: tuple[int, int]
    count: int


def _regions(split: str, photo_sizes: list[tuple[int, int]]) -> list[_Region]:
    regions = []
    per_class = PATCHES_PER_CLASS[split]
    for photo, (width, height) in enumerate(photo_sizes):
        cut = round(width * (1 - TEST_FRACTION))
        left, right = (0, cut) if split == "train" else (cut, width)
        for k, short in enumerate(SCALES):
            factor = short / min(width, height)
            size = (round((right - left) * factor), round(height * factor))
            count = per_class // len(SCALES) + (1 if k < per_class % len(SCALES) else 0)
            regions.append(_Region(photo, left, right, size, count))
    return regions


def _positions(region: _Region, split: str, scale: int) -> np.ndarray:
    """``count`` distinct top-left corners ``(row, column)`` in the resized region."""
    width, height = region.size
    rows, cols = height - PATCH + 1, width - PATCH + 1
    if rows < 1 or cols * rows < region.count:
        raise DatasetMissingError(f"skimage-patches: photo {SKIMAGE_PHOTOS[region.photo][0]} is too "
                                  f"small for {region.count} {split} patches")
    rng = np.random.default_rng([SKIMAGE_SEED, region.photo, list(PATCHES_PER_CLASS).index(split), scale])
    chosen = rng.choice(rows * cols, size=region.count, replace=False)
    return np.stack([chosen // cols, chosen % cols], axis=1)


def _order(split: str, n: int) -> np.ndarray:
    """The split's fixed shuffle, so that any slice mixes the classes."""
    return np.random.default_rng([SKIMAGE_SEED, 1000 + list(PATCHES_PER_CLASS).index(split)]).permutation(n)


def _photo_sizes(directory: Path) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for name, _ in SKIMAGE_PHOTOS:
        with Image.open(directory / name) as image:  # the header only
            sizes.append(image.size)
    return sizes


@functools.lru_cache(maxsize=2)
def skimage_labels(split: str) -> np.ndarray:
    """The labels of a skimage-patches split, from the sampling plan alone (no pixels decoded)."""
    labels = np.repeat(np.arange(len(SKIMAGE_PHOTOS), dtype=np.int64), PATCHES_PER_CLASS[split])
    return labels[_order(split, labels.size)]


@functools.lru_cache(maxsize=2)
def build_skimage_patches(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``skimage-patches`` split: uint8 ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    Label ``k`` means "cut from photograph ``SKIMAGE_PHOTOS[k]``" (astronaut, cat, coffee cup, ...):
    the task is to tell which photo a patch comes from. Each photo is cut at 70% of its width
    *before* resizing: train patches come only from the left 70%, test patches only from the right
    30%, so no test patch shares a single source pixel with a train patch. Each part is resized
    (Lanczos) so that the photo's shorter side is 160 and 224 pixels, and 32x32 patches are cut at
    distinct positions drawn with a fixed seed, half at each scale: 600 train and 150 test patches
    per photo, no augmentation. Deterministic for a given Pillow version; built on first use from
    the installed wheel (nothing is downloaded) and kept in memory.
    """
    from PIL import Image

    if split not in PATCHES_PER_CLASS:
        raise InvalidReferenceError(f"expected skimage-patches:train or skimage-patches:test, got split "
                                    f"{split!r}")
    directory = skimage_data_dir()
    sizes = _photo_sizes(directory)
    patches: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    regions = _regions(split, sizes)
    for photo, (name, _) in enumerate(SKIMAGE_PHOTOS):
        with Image.open(directory / name) as opened:
            image = opened.convert("RGB")
        for scale, region in enumerate(r for r in regions if r.photo == photo):
            part = image.crop((region.left, 0, region.right, image.height))
            pixels = np.asarray(part.resize(region.size, Image.Resampling.LANCZOS), dtype=np.uint8)
            windows = np.lib.stride_tricks.sliding_window_view(pixels, (PATCH, PATCH), axis=(0, 1))
            corners = _positions(region, split, scale)
            patches.append(windows[corners[:, 0], corners[:, 1]])  # (count, 3, 32, 32)
            labels.append(np.full(region.count, photo, dtype=np.int64))
    x = np.ascontiguousarray(np.concatenate(patches))
    y = np.concatenate(labels)
    order = _order(split, y.size)
    x, y = x[order], y[order]
    assert np.array_equal(y, skimage_labels(split))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# --- hosted sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostedSet:
    """A data set every team sees; its splits are named ``<name>:<split>``."""

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    splits: dict[str, int]
    description: str

    def listing(self) -> dict[str, object]:
        return {"name": self.name, "hosted": True, "input_shape": list(self.input_shape),
                "classes": list(self.classes), "splits": dict(self.splits),
                "references": [f"{self.name}:{s}" for s in self.splits], "description": self.description}


HOSTED_SETS = {
    "fashion-mnist": HostedSet(
        "fashion-mnist", (1, 28, 28), FASHION_MNIST_CLASSES, {"train": 60_000, "test": 10_000},
        "Fashion-MNIST (Zalando): 28x28 grayscale clothing, 10 classes, from Debian's "
        "dataset-fashion-mnist package."),
    "skimage-patches": HostedSet(
        "skimage-patches", (3, PATCH, PATCH), SKIMAGE_CLASSES,
        {s: n * len(SKIMAGE_PHOTOS) for s, n in PATCHES_PER_CLASS.items()},
        "32x32 RGB patches of the 8 colour photographs bundled with scikit-image, labelled by "
        "source photo; train from the left 70% of each photo, test from the right 30% (disjoint). "
        "A small hosted RGB substitute, not CIFAR-10."),
}


# --- team data sets: cards, index, blobs ---------------------------------------------------------


class DatasetCard(RegistryCard):
    """One version of a team's data set. ``splits``: samples per split; ``class_counts``: samples
    per class of each split; ``sha256`` and ``bytes``: of the blob (``datasets/<sha256>.npz``,
    arrays ``x_<split>`` (``dtype``, NCHW; uint8 means value / 255) and ``y_<split>`` (int64))."""

    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    splits: dict[str, int]
    class_counts: dict[str, list[int]] = Field(description="split -> samples per class")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: Literal["uint8", "float32"]
    bytes: int = Field(ge=0)
    format: Literal["npz", "image-folder"]
    created: str
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> DatasetCard:
        if any(d < 1 for d in self.input_shape):
            raise ValueError(f"expected a positive input shape, got {self.input_shape}")
        if len(self.classes) < 2:
            raise ValueError("expected at least two classes")
        if not self.splits or any(not SPLIT_RE.match(s) or n < 1 for s, n in self.splits.items()):
            raise ValueError(f"expected kebab-case splits with at least one sample, got {self.splits}")
        for split, n in self.splits.items():
            counts = self.class_counts.get(split)
            if counts is None or len(counts) != len(self.classes) or sum(counts) != n:
                raise ValueError(f"expected {len(self.classes)} class counts summing to {n} for {split}")
        return self

    @property
    def blob_key(self) -> str:
        return blob_key(self.sha256)

    def references(self) -> list[str]:
        return [f"{self.ref}:{split}" for split in self.splits]

    def max_label(self, split: str) -> int:
        counts = self.class_counts[split]
        return max(i for i, c in enumerate(counts) if c > 0)


class DatasetIndex(VersionedIndex[DatasetCard]):
    """The teams' data sets (``<var>/datasets``): cards only, the arrays are in the blob store."""

    card_type = DatasetCard


def blob_key(sha256: str) -> str:
    return f"datasets/{sha256}.npz"


_EPOCH = (1980, 1, 1, 0, 0, 0)


def pack(split: str, x: np.ndarray, y: np.ndarray) -> bytes:
    """The blob of one split: an ``.npz`` (stored, not compressed) with ``x_<split>`` and
    ``y_<split>``. Byte-for-byte the same for the same arrays (fixed member dates), so that the same
    content uploaded twice has one digest and is stored once."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, array in ((f"x_{split}", x), (f"y_{split}", y)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def unpack(blob: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (x, y) of a blob written by ``pack`` (no pickles)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    splits = {key[2:] for key in arrays if key.startswith("x_")}
    return {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in splits}


def to_bounds(x: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Data in [0, 1] mapped into a model's input bounds: ``lo + x * (hi - lo)``."""
    lo, hi = bounds
    if (lo, hi) == (0.0, 1.0):
        return x
    return (lo + x * (hi - lo)).astype(np.float32)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- references and the catalog ------------------------------------------------------------------


@dataclass(frozen=True)
class DataRef:
    """A parsed reference: ``name[@version]:split``."""

    name: str
    version: int | None
    split: str

    def __str__(self) -> str:
        version = "" if self.version is None else f"@{self.version}"
        return f"{self.name}{version}:{self.split}"


def parse_data_ref(text: str) -> DataRef:
    """``my-eval@2:all`` -> DataRef("my-eval", 2, "all"); hosted sets have no version."""
    expected = ("expected fashion-mnist:train|test, skimage-patches:train|test or one of your sets "
                "as name[@version]:split")
    head, sep, split = text.partition(":")
    if not sep or not SPLIT_RE.match(split):
        raise InvalidReferenceError(f"{expected}, got {text!r}")
    try:
        name, version = parse_ref(head)
    except ValueError:
        raise InvalidReferenceError(f"{expected}, got {text!r}") from None
    if not NAME_RE.match(name):
        raise InvalidReferenceError(f"{expected}, got {text!r}")
    if name in HOSTED_SETS:
        hosted = HOSTED_SETS[name]
        if version is not None:
            raise InvalidReferenceError(f"expected {name}:{'|'.join(hosted.splits)} (hosted sets have no "
                                        f"versions), got {text!r}")
        if split not in hosted.splits:
            raise InvalidReferenceError(f"expected one of {', '.join(f'{name}:{s}' for s in hosted.splits)}, "
                                        f"got {text!r}")
    return DataRef(name, version, split)


@dataclass(frozen=True)
class DataInfo:
    """What the gateway checks a slice against, without loading it. ``ref`` is resolved (a team
    set's version pinned: ``my-eval@2:all``); ``team`` is None for hosted sets; ``max_label`` is the
    largest label present in the split."""

    ref: str
    name: str
    version: int | None
    split: str
    size: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    team: str | None
    max_label: int
    dtype: str = "uint8"

    @property
    def hosted(self) -> bool:
        return self.team is None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class DataCatalog:
    """Every data set a job can name, for one process: hosted ones from ``data_dir`` and the
    installed scikit-image, teams' ones from ``root`` (cards) and ``store`` (arrays).

    Loaded arrays of team sets are kept in a small LRU keyed by their digest (content-addressed,
    so an entry never goes stale); the digest is checked once when a blob is read.
    """

    def __init__(self, data_dir: str | None, root: Path, store: BlobStore, cache_size: int = 4,
                 index: DatasetIndex | None = None) -> None:
        self.data_dir = data_dir
        self.root = root
        self.store = store
        self.index = DatasetIndex([root]) if index is None else index
        self.cache_size = cache_size
        self._arrays: OrderedDict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    # --- cards ---

    def card(self, name: str, version: int | None, team: str | None) -> DatasetCard:
        """A team set's card (latest without version), or UnknownDatasetError: another team's set
        is as unknown as one that does not exist."""
        card = self.index.card(name if version is None else f"{name}@{version}")
        if card is None or card.team is None or card.team != team:
            what = name if version is None else f"{name}@{version}"
            raise UnknownDatasetError(f"expected a hosted data set ({', '.join(HOSTED_SETS)}) or one of "
                                      f"your sets (GET /v1/datasets), got {what!r}")
        return card

    def cards(self, team: str) -> Iterator[DatasetCard]:
        """The latest card of each of this team's sets."""
        for name in self.index.names():
            card = self.index.card(name)
            if card is not None and card.team is not None and card.team == team:
                yield card

    def versions(self, team: str) -> Iterator[DatasetCard]:
        """Every live version this team holds (its quota)."""
        for name in self.index.names():
            for version in self.index.versions(name):
                card = self.index.card(f"{name}@{version}")
                if card is not None and card.team == team:
                    yield card

    # --- references ---

    def describe(self, ref: str, team: str | None) -> DataInfo:
        """Resolve ``ref`` for ``team`` and say what it holds, without loading the data."""
        parsed = parse_data_ref(ref)
        if parsed.name in HOSTED_SETS:
            hosted = HOSTED_SETS[parsed.name]
            size = self._hosted_size(parsed)
            return DataInfo(str(parsed), parsed.name, None, parsed.split, size, hosted.input_shape,
                            hosted.classes, None, len(hosted.classes) - 1)
        card = self.card(parsed.name, parsed.version, team)
        if parsed.split not in card.splits:
            raise InvalidReferenceError(f"expected a split of {card.ref} ({', '.join(card.splits)}), "
                                        f"got {parsed.split!r}")
        return DataInfo(f"{card.ref}:{parsed.split}", card.name, card.version, parsed.split,
                        card.splits[parsed.split], card.input_shape, card.classes, card.team,
                        card.max_label(parsed.split), card.dtype)

    def _hosted_size(self, ref: DataRef) -> int:
        if ref.name == "fashion-mnist":
            return split_size(str(ref), self.data_dir)  # reads a header: the files are there
        skimage_data_dir()
        return HOSTED_SETS[ref.name].splits[ref.split]

    def labels(self, ref: str, offset: int = 0, limit: int | None = None,
               team: str | None = None) -> np.ndarray:
        """The labels of a slice (hosted sets: without decoding any image)."""
        parsed = parse_data_ref(ref)
        stop = None if limit is None else offset + limit
        if parsed.name == "fashion-mnist":
            self._hosted_size(parsed)
            return _fashion_labels(parsed.split, self.data_dir)[offset:stop].copy()
        if parsed.name == "skimage-patches":
            return skimage_labels(parsed.split)[offset:stop].copy()
        return self._team_split(parsed, team)[1][offset:stop].copy()

    def load(self, ref: str, offset: int = 0, limit: int | None = None,
             team: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A slice ``[offset, offset + limit)``: x float32 NCHW in [0, 1], y int64."""
        parsed = parse_data_ref(ref)
        stop = None if limit is None else offset + limit
        if parsed.name == "fashion-mnist":
            split = load_split(str(parsed), self.data_dir)
            count = split.labels.size - offset if limit is None else limit
            return split.slice(offset, count)
        if parsed.name == "skimage-patches":
            x, y = build_skimage_patches(parsed.split)
        else:
            x, y = self._team_split(parsed, team)
        part = x[offset:stop]
        if part.dtype == np.uint8:
            return part.astype(np.float32) / np.float32(255.0), y[offset:stop].astype(np.int64)
        return part.astype(np.float32, copy=True), y[offset:stop].astype(np.int64)

    def _team_split(self, ref: DataRef, team: str | None) -> tuple[np.ndarray, np.ndarray]:
        card = self.card(ref.name, ref.version, team)
        if ref.split not in card.splits:
            raise InvalidReferenceError(f"expected a split of {card.ref} ({', '.join(card.splits)}), "
                                        f"got {ref.split!r}")
        return self._arrays_of(card)[ref.split]

    def _arrays_of(self, card: DatasetCard) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            if card.sha256 in self._arrays:
                self._arrays.move_to_end(card.sha256)
                return self._arrays[card.sha256]
        try:
            blob = self.store.get(card.blob_key)
        except BlobNotFoundError:
            raise DatasetMissingError(f"{card.ref}: its data ({card.blob_key}) is not in the blob "
                                      f"store") from None
        if hashlib.sha256(blob).hexdigest() != card.sha256:
            raise DatasetMissingError(f"{card.ref}: expected data with sha256 {card.sha256}, got other bytes "
                                      f"in {card.blob_key}")
        arrays = unpack(blob)
        for split, n in card.splits.items():
            x, y = arrays.get(split, (np.empty(0), np.empty(0)))
            if x.shape != (n, *card.input_shape) or y.shape != (n,):
                raise DatasetMissingError(f"{card.ref}: expected {n} samples of {card.input_shape} in split "
                                          f"{split}, got x {x.shape} and y {y.shape}")
            x.setflags(write=False)
            y.setflags(write=False)
        with self._lock:
            self._arrays[card.sha256] = arrays
            while len(self._arrays) > self.cache_size:
                self._arrays.popitem(last=False)
        return arrays

    # --- writing (the gateway) ---

    def publish(self, draft: DatasetCard, blob: bytes) -> DatasetCard:
        """Store ``blob`` once under its digest, then publish ``draft`` as the next version of its
        name (``DatasetIndex.publish``: a card-only directory renamed into place, or the card put
        in the store). When publishing fails the blob is removed again unless some card uses it."""
        if draft.name in HOSTED_SETS:
            raise InvalidReferenceError(f"expected a name other than the hosted {draft.name!r}")
        if hashlib.sha256(blob).hexdigest() != draft.sha256 or len(blob) != draft.bytes:
            raise ValueError(f"{draft.name}: the blob does not match the card's sha256 and bytes")
        key = draft.blob_key
        fresh = not self.store.exists(key)
        if fresh:
            self.store.put(key, blob)
        try:
            card = self.index.publish(draft, {})
        except BaseException:
            if fresh and not self._referenced(draft.sha256):
                self.store.delete(key)
            raise
        if not self.store.exists(key):  # a concurrent delete collected it before the card appeared
            self.store.put(key, blob)
        return card

    def delete(self, name: str, version: int) -> bool:
        """Delete one version (``DatasetIndex.unpublish``: its number is never reused) and its
        blob when no other version uses it. False when there is no such version."""
        card = self.index.card(f"{name}@{version}")
        if card is None or not self.index.unpublish(name, version):
            return False
        if not self._referenced(card.sha256):
            self.store.delete(card.blob_key)
        with self._lock:
            self._arrays.pop(card.sha256, None)
        return True

    def _referenced(self, sha256: str) -> bool:
        for name in self.index.names():
            for version in self.index.versions(name):
                card = self.index.card(f"{name}@{version}")
                if card is not None and card.sha256 == sha256:
                    return True
        return False


def class_counts(y: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(y, minlength=num_classes)[:num_classes]]
