"""Decode and validate inputs against a model card, with NumPy and Pillow only (no torch).

Everything is checked here, before a job is queued: a job that reaches a worker has inputs of the
right shape, dtype and range. Errors name the field and say what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from contracts.specs import ArrayInputs, DatasetInputs, ImageInputs
from models.datasets import (
    DataCatalog,
    DataError,
    DataInfo,
    DatasetMissingError,
    InvalidReferenceError,
    UnknownDatasetError,
)
from models.manifest import ModelCard
from service.errors import Problem, invalid

Image.MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Decoded:
    """Inputs ready for a worker: ``x`` float32 NCHW in the card's bounds, optional labels."""

    x: np.ndarray
    y: np.ndarray | None


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as .npy bytes, never pickled (what jobs carry and workers read)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def b64decode(field: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "expected base64-encoded bytes") from None


def _scale_uint8(array: np.ndarray, card: ModelCard) -> np.ndarray:
    lo, hi = card.bounds
    return (lo + array.astype(np.float32) / 255.0 * (hi - lo)).astype(np.float32)


def array_to_nchw(field: str, array: np.ndarray, card: ModelCard) -> np.ndarray:
    """Accept float32 NCHW in the card's bounds, or uint8 NHWC (NHW for one channel)."""
    c, h, w = card.input_shape
    if array.dtype == np.uint8:
        if array.ndim == 3 and c == 1:
            array = array[..., None]
        if array.ndim != 4 or array.shape[1:] != (h, w, c):
            raise invalid(field, f"expected uint8 of shape (N, {h}, {w}, {c}) (NHWC), "
                                 f"got {array.shape}")
        return np.ascontiguousarray(_scale_uint8(array, card).transpose(0, 3, 1, 2))
    if array.dtype == np.float32:
        if array.ndim != 4 or array.shape[1:] != (c, h, w):
            raise invalid(field, f"expected float32 of shape (N, {c}, {h}, {w}) (NCHW), "
                                 f"got {array.shape}")
        if not np.isfinite(array).all():
            raise invalid(field, "expected finite values, got NaN or infinity")
        lo, hi = card.bounds
        amin, amax = float(array.min(initial=lo)), float(array.max(initial=hi))
        if amin < lo or amax > hi:
            raise invalid(field, f"expected values in [{lo:g}, {hi:g}], got [{amin:g}, {amax:g}]")
        return np.ascontiguousarray(array)
    raise invalid(field, f"expected dtype float32 or uint8, got {array.dtype}")


NPY_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8))


def decode_npy(field: str, data: bytes, card: ModelCard, limit: int) -> np.ndarray:
    """A ``.npy`` file (never a pickle) of at most ``limit`` samples. The header is checked first
    (dtype, rank, sample count, and a byte count that matches what was sent, computed on Python
    integers) so that a header declaring 10^12 samples allocates nothing; the data is then read in
    place."""
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise invalid(field, f"expected a .npy file (no pickles): {exc}") from None
    if dtype not in NPY_DTYPES:
        raise invalid(field, f"expected dtype float32 or uint8, got {dtype}")
    if len(shape) not in (3, 4) or any(d < 0 for d in shape):
        raise invalid(field, f"expected an array of shape (N, C, H, W) or (N, H, W[, C]), got {shape}")
    if shape[0] == 0:
        raise invalid(field, "expected at least one sample, got an empty array")
    check_count(field, shape[0], limit)
    expected = math.prod(shape) * dtype.itemsize
    offset = stream.tell()
    if len(data) - offset != expected:
        raise invalid(field, f"expected {expected} bytes of data for shape {shape} and dtype {dtype}, "
                             f"got {len(data) - offset}")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return array_to_nchw(field, array.reshape(shape, order="F" if fortran_order else "C"), card)


def decode_image(field: str, data: bytes, card: ModelCard) -> np.ndarray:
    """One PNG/JPEG image -> float32 (C, H, W) in the card's bounds."""
    c, h, w = card.input_shape
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image: Image.Image = opened
            if opened.format not in ("PNG", "JPEG"):
                raise invalid(field, f"expected a PNG or JPEG image, got {opened.format}")
            if image.size != (w, h):
                raise invalid(field, f"expected a {w}x{h} image, got {image.width}x{image.height}")
            wanted = "L" if c == 1 else "RGB"
            if image.mode in ("1", "P", "LA", "L") and c == 1:
                image = image.convert("L")
            elif image.mode in ("RGB", "RGBA", "P") and c == 3:
                image = image.convert("RGB")
            if image.mode != wanted:
                raise invalid(field, f"expected a {'grayscale' if c == 1 else 'RGB'} image "
                                     f"(mode {wanted}), got mode {image.mode}")
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise invalid(field, "expected a decodable PNG or JPEG image") from None
    array = array.reshape(h, w, c)
    return _scale_uint8(array, card).transpose(2, 0, 1)


def check_labels(field: str, labels: list[int] | None, n: int, card: ModelCard) -> np.ndarray | None:
    if labels is None:
        return None
    if len(labels) != n:
        raise invalid(field, f"expected {n} labels, one per input, got {len(labels)}")
    bad = [v for v in labels if not 0 <= v < card.num_classes]
    if bad:
        raise invalid(field, f"expected classes in [0, {card.num_classes - 1}], got {bad[0]}")
    return np.asarray(labels, dtype=np.int64)


def check_count(field: str, n: int, limit: int) -> None:
    if n > limit:
        raise invalid(field, f"expected at most {limit} inputs per request, got {n}", status=413)


def decode_inline(inputs: ArrayInputs | ImageInputs, card: ModelCard, limit: int) -> Decoded:
    if isinstance(inputs, ArrayInputs):
        x = decode_npy("inputs.array", b64decode("inputs.array", inputs.array), card, limit)
    else:
        check_count("inputs.images", len(inputs.images), limit)
        x = np.stack([
            decode_image(f"inputs.images[{i}]", b64decode(f"inputs.images[{i}]", text), card)
            for i, text in enumerate(inputs.images)
        ])
    check_count("inputs", x.shape[0], limit)
    return Decoded(x, check_labels("inputs.labels", inputs.labels, x.shape[0], card))


def decode_files(files: list[tuple[str, bytes]], labels: list[int] | None, card: ModelCard,
                 limit: int) -> Decoded:
    """Multipart uploads: one ``.npy`` file, or one or more PNG/JPEG images."""
    if not files:
        raise invalid("files", "expected one .npy file or PNG/JPEG images")
    npys = [(name, data) for name, data in files if data[:6] == b"\x93NUMPY"]
    if npys:
        if len(files) != 1:
            raise invalid("files", f"expected one .npy file alone, got {len(files)} files")
        x = decode_npy(f"files[{npys[0][0]}]", npys[0][1], card, limit)
    else:
        check_count("files", len(files), limit)
        x = np.stack([decode_image(f"files[{name}]", data, card) for name, data in files])
    check_count("files", x.shape[0], limit)
    return Decoded(x, check_labels("labels", labels, x.shape[0], card))


def describe_dataset(catalog: DataCatalog, ref: str, team: str, field: str) -> DataInfo:
    """Resolve a data reference for ``team``; errors name ``field`` (422: malformed or unknown,
    503: known but its data is not here)."""
    try:
        return catalog.describe(ref, team)
    except DatasetMissingError as exc:
        raise Problem(503, f"{field}: {exc}", field=field, code="dataset-missing") from None
    except (InvalidReferenceError, UnknownDatasetError) as exc:
        raise invalid(field, str(exc)) from None


def dataset_labels(catalog: DataCatalog, inputs: DatasetInputs, team: str, field: str) -> np.ndarray:
    """The labels of a slice (already checked by ``check_dataset``)."""
    try:
        return catalog.labels(inputs.dataset, inputs.offset, inputs.limit, team)
    except DatasetMissingError as exc:
        raise Problem(503, f"{field}: {exc}", field=field, code="dataset-missing") from None
    except DataError as exc:
        raise invalid(field, str(exc)) from None


def check_dataset(inputs: DatasetInputs, card: ModelCard, limit: int, catalog: DataCatalog, team: str,
                  field: str = "inputs") -> DatasetInputs:
    """Validate a data-set slice against the model's card: the reference resolves for this team, the
    slice lies inside the split, the samples have the model's input shape and every label is one of
    its classes (a set with more classes passes when the slice's labels fit). Returns the slice with
    its reference pinned (``my-eval@2:all``), so that the job reads the version checked here."""
    info = describe_dataset(catalog, inputs.dataset, team, f"{field}.dataset")
    if inputs.offset >= info.size:
        raise invalid(f"{field}.offset", f"expected an offset below {info.size} (the size of {info.ref}), "
                                         f"got {inputs.offset}")
    if inputs.offset + inputs.limit > info.size:
        raise invalid(f"{field}.limit", f"expected offset + limit <= {info.size} (the size of {info.ref}), "
                                        f"got {inputs.offset + inputs.limit}")
    check_count(f"{field}.limit", inputs.limit, limit)
    if info.input_shape != card.input_shape:
        raise invalid(f"{field}.dataset", f"expected data of input shape {card.input_shape} for {card.ref}, "
                                          f"got {info.ref} with samples of shape {info.input_shape}")
    pinned = inputs.model_copy(update={"dataset": info.ref})
    if info.max_label >= card.num_classes:
        labels = dataset_labels(catalog, pinned, team, f"{field}.dataset")
        top = int(labels.max())
        if top >= card.num_classes:
            raise invalid(f"{field}.dataset", f"expected labels below {card.num_classes} (the classes of "
                                              f"{card.ref}), got label {top} in {info.ref} [{inputs.offset}, "
                                              f"{inputs.offset + inputs.limit}) ({info.num_classes} classes in "
                                              f"the set, {card.num_classes} in the model)")
    return pinned


def max_eps(card: ModelCard, norm: str) -> float:
    lo, hi = card.bounds
    dims = math.prod(card.input_shape)
    return (hi - lo) * (math.sqrt(dims) if norm == "l2" else 1.0)
