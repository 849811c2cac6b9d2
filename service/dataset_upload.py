"""Parse an uploaded data set (``POST /v1/datasets``) with NumPy, Pillow, zipfile and tarfile only.

Everything here is hostile input. An ``.npz`` is opened as the zip it is, its member headers are
read and checked (dtype, shape, bytes against the limits; object arrays, i.e. pickles, refused)
before any array is allocated, and it is loaded with ``allow_pickle=False``. An image-folder
archive (``.zip``, ``.tar``, ``.tar.gz``) is walked without ever touching the filesystem: every
member name is checked for traversal (``..``, absolute paths), links and devices are refused,
declared sizes are summed against the byte limit and the bytes actually read are counted again
(a header can lie), compression ratios are bounded (zip bombs), nested archives are refused, and
each image's size is read from its header before it is decoded (a 40000x40000 PNG is refused
without allocating it). Every refusal is a ``Problem`` naming the field: 413 for a limit, 415 for
a format that is not accepted, 422 for content that is wrong.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from models.datasets import SPLIT_RE
from models.manifest import RegistryName
from service.errors import Problem, invalid

FIELD = "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ARCHIVE_MAGICS = (
    (b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!", "rar"),
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".npz")
GRAY_MODES = frozenset({"1", "L", "LA"})
COLOUR_MODES = frozenset({"RGB", "RGBA", "P", "CMYK"})
MAX_CLASSES = 1000
RATIO_FLOOR = 1 << 20  # below a MiB expanded, no ratio check (a small tar.gz is mostly padding)
CENTRAL_ENTRY_BYTES = 46 + 466  # a central directory entry: fixed part, name, extra field, comment


class DatasetUploadSpec(BaseModel):
    """The ``spec`` form field of ``POST /v1/datasets``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RegistryName = Field(description="kebab-case name; a new version when it is already yours")
    classes: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] | None = Field(
        default=None, min_length=2, max_length=MAX_CLASSES,
        description="class names, label i = classes[i]; default: the sorted folder names of an "
                    "image folder, '0'..'k-1' for an .npz")
    description: str = Field(default="", max_length=2000)
    split: str = Field(default="all", description="the split name in references: name@version:split")
    layout: Literal["NCHW", "NHWC"] | None = Field(
        default=None, description=".npz only: the layout of x when its shape does not say it")

    @field_validator("split")
    @classmethod
    def _split(cls, value: str) -> str:
        if not SPLIT_RE.match(value):
            raise ValueError(f"expected a lowercase kebab-case split of at most 32 characters, got {value!r}")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("expected distinct class names")
        return value


@dataclass(frozen=True)
class UploadLimits:
    """``max_bytes``: of the decoded arrays and of everything an archive expands to;
    ``max_files``: archive members; ``max_samples``: N; ``max_image_pixels``: H x W of one sample;
    ``max_ratio``: expanded / compressed size of a member (or of a compressed tar)."""

    max_bytes: int
    max_files: int
    max_samples: int
    max_image_pixels: int = 1024 * 1024
    max_ratio: float = 200.0


@dataclass(frozen=True)
class ParsedDataset:
    """``x`` uint8 or float32 NCHW (float32 in [0, 1]), ``y`` int64 in [0, len(classes))."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    format: Literal["npz", "image-folder"]


def parse_upload(filename: str, data: bytes, spec: DatasetUploadSpec, limits: UploadLimits) -> ParsedDataset:
    """An ``.npz`` or an image-folder archive -> arrays, or a ``Problem`` naming the field."""
    if not data:
        raise invalid(FIELD, "expected a non-empty .npz, .zip, .tar or .tar.gz file")
    lower = filename.lower()
    if data.startswith(b"PK"):
        archive = _open_zip(data, limits)
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        if lower.endswith(".npz") or (names and all(n.endswith(".npy") for n in names)):
            return _parse_npz(archive, spec, limits)
        if spec.layout is not None:
            raise invalid("spec.layout", "expected a layout only for an .npz upload")
        return _image_folder(_zip_members(archive, limits), spec, limits)
    if lower.endswith(".npz"):
        raise invalid(FIELD, f"expected an .npz file (a zip archive of .npy arrays), got {_kind(data)}")
    if spec.layout is not None:
        raise invalid("spec.layout", "expected a layout only for an .npz upload")
    if _is_tar(data) or data.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return _image_folder(_tar_members(data, limits), spec, limits)
    raise Problem(415, f"{FIELD}: expected an .npz, .zip, .tar or .tar.gz file, got {_kind(data)}",
                  field=FIELD, code="unsupported-format")


def _kind(data: bytes) -> str:
    for magic, kind in ARCHIVE_MAGICS:
        if data.startswith(magic):
            return f"a {kind} file"
    if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
        return "a single image"
    if data.startswith(b"\x93NUMPY"):
        return "a single .npy array (put x and y in an .npz)"
    return "unrecognised bytes"


def _is_tar(data: bytes) -> bool:
    return len(data) >= 512 and data[257:262] == b"ustar"


# --- .npz ----------------------------------------------------------------------------------------


def _central_directory(data: bytes) -> tuple[int, int] | None:
    """(entries, bytes) of the zip's central directory from its end record, or None when there is
    no readable end record (``zipfile`` then says what is wrong)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if end < 0 or len(data) < end + 22:
        return None
    entries, size = struct.unpack("<HI", data[end + 10 : end + 16])
    locator = end - 20
    zip64 = locator >= 0 and data[locator : locator + 4] == b"PK\x06\x07"
    if (entries == 0xFFFF or size == 0xFFFFFFFF) and zip64:
        (offset,) = struct.unpack("<Q", data[locator + 8 : locator + 16])
        if data[offset : offset + 4] == b"PK\x06\x06" and len(data) >= offset + 56:
            entries, size = struct.unpack("<QQ", data[offset + 32 : offset + 48])
    return entries, size


def _open_zip(data: bytes, limits: UploadLimits) -> zipfile.ZipFile:
    # zipfile builds an object per entry before anything can be checked: bound the entries first,
    # by the end record's count and by the directory's size (a count can lie; zipfile reads bytes).
    directory = _central_directory(data)
    if directory is not None:
        entries, size = directory
        if entries > limits.max_files or size > limits.max_files * CENTRAL_ENTRY_BYTES:
            raise invalid(FIELD, f"expected at most {limits.max_files} files in the archive, got a central "
                                 f"directory of {entries} entries in {size} bytes", status=413)
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise invalid(FIELD, f"expected a readable zip archive: {exc}") from None


def _check_zip_info(info: zipfile.ZipInfo, limits: UploadLimits) -> None:
    _check_name(info.filename)
    mode = info.external_attr >> 16
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
        raise invalid(FIELD, f"{info.filename!r}: expected regular files, got {what}")
    if info.flag_bits & 0x1:
        raise invalid(FIELD, f"{info.filename!r}: expected an unencrypted archive")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise invalid(FIELD, f"{info.filename!r}: expected stored or deflated members, got compression "
                             f"method {info.compress_type}")
    if info.file_size > limits.max_bytes:
        raise invalid(FIELD, f"expected at most {limits.max_bytes} bytes expanded, got {info.file_size} "
                             f"declared for {info.filename!r}", status=413)
    if info.file_size > RATIO_FLOOR and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise invalid(FIELD, f"{info.filename!r}: expected a compression ratio of at most "
                             f"{limits.max_ratio:g}, got {info.file_size} bytes from {info.compress_size} "
                             f"(a zip bomb?)")


def _zip_infos(archive: zipfile.ZipFile, limits: UploadLimits) -> list[zipfile.ZipInfo]:
    """The members, every header checked, before any of them is read."""
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise invalid(FIELD, f"expected at most {limits.max_files} files in the archive, got {len(infos)}",
                      status=413)
    seen: set[str] = set()
    declared = 0
    for info in infos:
        _check_zip_info(info, limits)
        if info.filename in seen:
            raise invalid(FIELD, f"{info.filename!r}: expected each member once, got it twice")
        seen.add(info.filename)
        declared += info.file_size
    if declared > limits.max_bytes:
        raise invalid(FIELD, f"expected at most {limits.max_bytes} bytes expanded, got {declared} declared",
                      status=413)
    return infos


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    """The member's bytes, counted while reading: never more than its declared size or ``budget``."""
    cap = min(info.file_size, budget)
    try:
        with archive.open(info) as handle:
            data = handle.read(cap + 1)
            if len(data) <= cap:
                handle.read(1)  # reaching the end checks the CRC
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
        raise invalid(FIELD, f"{info.filename!r}: expected an intact member: {exc}") from None
    if len(data) > cap:
        raise invalid(FIELD, f"{info.filename!r}: expected at most {cap} bytes, got more than declared",
                      status=413 if cap == budget else 422)
    if len(data) != info.file_size:
        raise invalid(FIELD, f"{info.filename!r}: expected {info.file_size} bytes as declared, got {len(data)}")
    return data


def _npy(name: str, member: bytes, limits: UploadLimits) -> np.ndarray:
    """One ``.npy`` member: header checked first (no pickles, sizes within limits), then loaded."""
    fp = io.BytesIO(member)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise invalid(FIELD, f"{name}: expected a .npy array: {exc}") from None
    if dtype.hasobject:
        raise invalid(FIELD, f"{name}: expected a numeric array, got dtype {dtype} (objects need pickle, "
                             f"which is refused)")
    if any(d < 0 for d in shape):
        raise invalid(FIELD, f"{name}: expected a valid shape, got {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if nbytes > limits.max_bytes:
        raise invalid(FIELD, f"{name}: expected at most {limits.max_bytes} bytes of data, got {shape} of "
                             f"{dtype} ({nbytes} bytes)", status=413)
    if len(member) - fp.tell() != nbytes:
        raise invalid(FIELD, f"{name}: expected {nbytes} bytes of data for {shape} of {dtype}, got "
                             f"{len(member) - fp.tell()}")
    try:
        array = np.load(io.BytesIO(member), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise invalid(FIELD, f"{name}: expected a .npy array: {exc}") from None
    assert isinstance(array, np.ndarray)
    return array


def _parse_npz(archive: zipfile.ZipFile, spec: DatasetUploadSpec, limits: UploadLimits) -> ParsedDataset:
    infos = [i for i in _zip_infos(archive, limits) if not i.is_dir()]
    names = sorted(i.filename for i in infos)
    if names != ["x.npy", "y.npy"]:
        raise invalid(FIELD, f"expected an .npz with arrays x and y, got members {names[:10]}")
    budget = limits.max_bytes
    arrays = {}
    for info in infos:
        member = _read_zip_member(archive, info, budget)
        budget -= len(member)
        arrays[info.filename[:-4]] = _npy(info.filename[:-4], member, limits)
    x = _layout(arrays["x"], spec, limits)
    y = _labels(arrays["y"], x.shape[0])
    classes = tuple(spec.classes) if spec.classes is not None else tuple(
        str(i) for i in range(max(int(y.max()) + 1, 2)))
    if int(y.max()) >= len(classes):
        bad = int(np.flatnonzero(y >= len(classes))[0])
        raise invalid(FIELD, f"y: expected labels in [0, {len(classes) - 1}] ({len(classes)} classes), got "
                             f"{int(y[bad])} at index {bad}")
    return ParsedDataset(x, y, classes, "npz")


def _layout(x: np.ndarray, spec: DatasetUploadSpec, limits: UploadLimits) -> np.ndarray:
    """x as NCHW: uint8 (as given) or float32 in [0, 1]; NHW is one channel."""
    if x.dtype.kind == "u" and x.dtype.itemsize == 1:
        x = x.astype(np.uint8, copy=False)
    elif x.dtype.kind == "f" and x.dtype.itemsize == 4:
        x = x.astype(np.float32, copy=False)  # native byte order
    else:
        raise invalid(FIELD, f"x: expected dtype uint8 (0-255) or float32 (in [0, 1]), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise invalid(FIELD, f"x: expected 4 dimensions (N, C, H, W) or (N, H, W, C), or 3 (N, H, W), "
                             f"got shape {x.shape}")
    if x.shape[0] > limits.max_samples:
        raise invalid(FIELD, f"x: expected at most {limits.max_samples} samples, got {x.shape[0]}", status=413)
    layout = spec.layout or _guess_layout(x.shape)
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    n, c, h, w = x.shape
    if n < 1 or c < 1 or h < 1 or w < 1:
        raise invalid(FIELD, f"x: expected at least one sample of at least 1x1, got shape (N, C, H, W) "
                             f"{(n, c, h, w)}")
    if n > limits.max_samples:
        raise invalid(FIELD, f"x: expected at most {limits.max_samples} samples, got {n}", status=413)
    if h * w > limits.max_image_pixels or c > 64:
        raise invalid(FIELD, f"x: expected at most {limits.max_image_pixels} pixels and 64 channels per "
                             f"sample, got {c}x{h}x{w}", status=413)
    if x.dtype == np.float32:
        if not np.isfinite(x).all():
            raise invalid(FIELD, "x: expected finite values, got NaN or infinity")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise invalid(FIELD, f"x: expected float32 values in [0, 1] (or uint8 0-255), got "
                                 f"[{lo:g}, {hi:g}]")
    return np.ascontiguousarray(x)


def _guess_layout(shape: tuple[int, ...]) -> Literal["NCHW", "NHWC"]:
    """The layout whose channel axis has 1 to 4 entries; when both could be, the one with 1 or 3
    channels, then the one with square images; else ask for ``spec.layout``."""
    candidates: dict[Literal["NCHW", "NHWC"], tuple[int, int, int]] = {
        "NCHW": (shape[1], shape[2], shape[3]), "NHWC": (shape[3], shape[1], shape[2])}
    if candidates["NCHW"] == candidates["NHWC"]:  # (N, 1, 1, 1), (N, 3, 3, 3): the same either way
        return "NCHW"
    plausible = [k for k, (c, _, _) in candidates.items() if c <= 4]
    for prefer in (lambda c, h, w: c in (1, 3), lambda c, h, w: h == w):
        if len(plausible) > 1:
            narrowed = [k for k in plausible if prefer(*candidates[k])]
            plausible = narrowed or plausible
    if len(plausible) != 1:
        raise invalid("spec.layout", f"expected NCHW or NHWC with 1 to 4 channels, got shape {shape}: give "
                                     f"spec.layout to say which")
    return plausible[0]


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise invalid(FIELD, f"y: expected integer labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise invalid(FIELD, f"y: expected shape ({n},), one label per sample of x, got {y.shape}")
    if n and int(y.min()) < 0:
        bad = int(np.flatnonzero(y < 0)[0])
        raise invalid(FIELD, f"y: expected labels >= 0, got {int(y[bad])} at index {bad}")
    return y.astype(np.int64)


# --- archives of image folders -------------------------------------------------------------------


def _check_name(name: str) -> None:
    """Refuse any member name that could leave the archive's own tree."""
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or ".." in parts
            or (len(name) > 1 and name[1] == ":")):
        raise invalid(FIELD, f"{name!r}: expected a relative path inside the archive (no '..', absolute "
                             f"paths or backslashes)")


def _junk(name: str) -> bool:
    """Hidden files and macOS resource forks that archivers add (``.DS_Store``, ``__MACOSX/``)."""
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/") if p)


def _zip_members(archive: zipfile.ZipFile, limits: UploadLimits) -> Iterator[tuple[str, bytes]]:
    infos = _zip_infos(archive, limits)
    budget = limits.max_bytes
    for info in infos:
        if info.is_dir() or _junk(info.filename):
            continue
        data = _read_zip_member(archive, info, budget)
        budget -= len(data)
        yield info.filename, data


class _Counted(io.RawIOBase):
    """A stream that refuses to yield more than ``limit`` bytes (what a compressed tar expands to)."""

    def __init__(self, inner: io.BufferedIOBase, limit: int, compressed: int, ratio: float) -> None:
        self.inner = inner
        self.limit = limit
        self.ratio_limit = max(RATIO_FLOOR, int(ratio * compressed))
        self.seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        self.seen += len(data)
        if self.seen > self.limit:
            raise invalid(FIELD, f"expected the archive to expand to at most {self.limit} bytes, got more",
                          status=413)
        if self.seen > self.ratio_limit:
            raise invalid(FIELD, f"expected a compressed archive to expand to at most {self.ratio_limit} "
                                 f"bytes (the compression-ratio limit), got more (a decompression bomb?)")
        buffer[: len(data)] = data
        return len(data)


def _decompressor(data: bytes, stack: contextlib.ExitStack) -> tuple[io.BufferedIOBase, bool]:
    """The tar stream inside ``data`` (gzip, bzip2 or xz, or none) and whether it is compressed."""
    raw = io.BytesIO(data)
    if data.startswith(b"\x1f\x8b"):
        return stack.enter_context(gzip.GzipFile(fileobj=raw)), True
    if data.startswith(b"BZh"):
        return stack.enter_context(bz2.BZ2File(raw)), True
    if data.startswith(b"\xfd7zXZ\x00"):
        return stack.enter_context(lzma.LZMAFile(raw)), True
    return raw, False


def _tar_members(data: bytes, limits: UploadLimits) -> Iterator[tuple[str, bytes]]:
    # Headers and padding: 512 bytes each, plus the 10 KiB record at the end.
    overhead = 1536 * (limits.max_files + 2) + 20480
    try:
        with contextlib.ExitStack() as stack:
            raw, compressed = _decompressor(data, stack)
            stream = _Counted(raw, limits.max_bytes + overhead, len(data) if compressed else 1 << 62,
                              limits.max_ratio)
            reader = io.BufferedReader(stream, buffer_size=64 * 1024)
            archive = stack.enter_context(tarfile.open(fileobj=reader, mode="r|"))
            yield from _tar_walk(archive, limits)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise invalid(FIELD, f"expected a readable tar archive: {exc}") from None


def _tar_walk(archive: tarfile.TarFile, limits: UploadLimits) -> Iterator[tuple[str, bytes]]:
    count = 0
    declared = 0
    for member in archive:
        count += 1
        if count > limits.max_files:
            raise invalid(FIELD, f"expected at most {limits.max_files} files in the archive, got more",
                          status=413)
        _check_name(member.name)
        if member.issym() or member.islnk():
            kind = "symbolic" if member.issym() else "hard"
            raise invalid(FIELD, f"{member.name!r}: expected regular files, got a {kind} link to "
                                 f"{member.linkname!r}")
        if member.isdir():
            continue
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise invalid(FIELD, f"{member.name!r}: expected regular files, got a device, fifo or other "
                                 f"special member")
        declared += member.size
        if declared > limits.max_bytes:
            raise invalid(FIELD, f"expected at most {limits.max_bytes} bytes expanded, got more declared "
                                 f"by {member.name!r}", status=413)
        if _junk(member.name):
            continue
        handle = archive.extractfile(member)
        assert handle is not None
        content = handle.read(member.size + 1)
        if len(content) != member.size:
            raise invalid(FIELD, f"{member.name!r}: expected {member.size} bytes, got {len(content)}")
        yield member.name, content


@dataclass(frozen=True)
class _Header:
    path: str
    folder: str
    size: tuple[int, int]
    gray: bool
    data: bytes


def _nested(name: str, data: bytes) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES) or any(data.startswith(m) for m, _ in ARCHIVE_MAGICS) or (
        _is_tar(data))


def _header(path: str, data: bytes, limits: UploadLimits) -> tuple[tuple[int, int], bool]:
    """Size and colour family from the image's header alone."""
    if _nested(path, data):
        raise invalid(FIELD, f"{path!r}: expected PNG or JPEG images, got a nested archive (refused)")
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise invalid(FIELD, f"{path!r}: expected a PNG or JPEG image, got {_kind(data)}")
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR" and len(data) >= 24:
        _check_pixels(path, struct.unpack(">II", data[16:24]), limits)  # before Pillow sees it
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:  # reads the header only
            size, mode = image.size, image.mode
    except Image.DecompressionBombError as exc:
        raise invalid(FIELD, f"{path!r}: expected at most {limits.max_image_pixels} pixels per image, got "
                             f"a decompression bomb ({exc})", status=413) from None
    except UnidentifiedImageError:
        raise invalid(FIELD, f"{path!r}: expected a readable PNG or JPEG header, got bytes Pillow cannot "
                             f"identify") from None
    except Exception as exc:  # Pillow raises many kinds on hostile bytes: each is the upload's fault
        raise invalid(FIELD, f"{path!r}: expected a readable PNG or JPEG header: {exc}") from None
    _check_pixels(path, size, limits)
    if mode not in GRAY_MODES | COLOUR_MODES:
        raise invalid(FIELD, f"{path!r}: expected a grayscale or colour image (modes "
                             f"{', '.join(sorted(GRAY_MODES | COLOUR_MODES))}), got mode {mode}")
    return size, mode in GRAY_MODES


def _check_pixels(path: str, size: tuple[int, int], limits: UploadLimits) -> None:
    if size[0] * size[1] > limits.max_image_pixels:
        raise invalid(FIELD, f"{path!r}: expected at most {limits.max_image_pixels} pixels per image, got "
                             f"{size[0]}x{size[1]}", status=413)
    if min(size) < 1:
        raise invalid(FIELD, f"{path!r}: expected an image of at least 1x1, got {size[0]}x{size[1]}")


def _image_folder(members: Iterator[tuple[str, bytes]], spec: DatasetUploadSpec,
                  limits: UploadLimits) -> ParsedDataset:
    headers: list[_Header] = []
    for path, data in members:
        size, gray = _header(path, data, limits)
        headers.append(_Header(path, "", size, gray, data))
        if len(headers) > limits.max_samples:
            raise invalid(FIELD, f"expected at most {limits.max_samples} images, got more", status=413)
    if not headers:
        raise invalid(FIELD, "expected PNG or JPEG images in one folder per class, got none")
    headers = _folders(headers)
    first = headers[0]
    for header in headers[1:]:
        if header.size != first.size:
            raise invalid(FIELD, f"{header.path!r}: expected every image {first.size[0]}x{first.size[1]} like "
                                 f"{first.path!r}, got {header.size[0]}x{header.size[1]}")
        if header.gray != first.gray:
            family = "grayscale" if first.gray else "colour"
            raise invalid(FIELD, f"{header.path!r}: expected every image {family} like {first.path!r}, got "
                                 f"{'grayscale' if header.gray else 'colour'}")
    folders = sorted({h.folder for h in headers})
    if spec.classes is not None:
        classes = tuple(spec.classes)
        stray = [f for f in folders if f not in classes]
        if stray:
            raise invalid("spec.classes", f"expected a class name for every folder, got folder {stray[0]!r} "
                                          f"not in classes")
    else:
        classes = tuple(folders)
        if len(classes) < 2:
            raise invalid(FIELD, f"expected at least two class folders (or spec.classes), got {folders}")
    width, height = first.size
    channels = 1 if first.gray else 3
    total = len(headers) * channels * height * width
    if total > limits.max_bytes:
        raise invalid(FIELD, f"expected at most {limits.max_bytes} bytes of pixels, got {len(headers)} images "
                             f"of {channels}x{height}x{width} ({total} bytes)", status=413)
    headers.sort(key=lambda h: (classes.index(h.folder), h.path))
    x = np.empty((len(headers), channels, height, width), dtype=np.uint8)
    for i, header in enumerate(headers):
        x[i] = _decode(header, "L" if first.gray else "RGB")
    y = np.asarray([classes.index(h.folder) for h in headers], dtype=np.int64)
    return ParsedDataset(x, y, classes, "image-folder")


def _folders(headers: list[_Header]) -> list[_Header]:
    """``class/image`` paths, below one optional top folder (what zipping a folder gives)."""
    parts = [h.path.strip("/").split("/") for h in headers]
    if all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    out = []
    for header, p in zip(headers, parts, strict=True):
        if len(p) != 2 or not p[0]:
            raise invalid(FIELD, f"{header.path!r}: expected <class folder>/<image>, one folder per class")
        out.append(_Header(header.path, p[0], header.size, header.gray, header.data))
    return out


def _decode(header: _Header, mode: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(header.data), formats=("PNG", "JPEG")) as image:
            if image.size != header.size:
                raise ValueError("the size changed between reads")
            converted = image.convert(mode)
            array = np.asarray(converted, dtype=np.uint8)
    except Exception as exc:  # Pillow raises many kinds on hostile bytes: each is the upload's fault
        raise invalid(FIELD, f"{header.path!r}: expected a decodable PNG or JPEG image: {exc}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
