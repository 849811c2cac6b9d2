"""Checks of uploaded model files that need no torch, so the gateway can refuse a bad upload
before anything is stored or queued.

Only two formats are accepted, both free of pickle: ONNX graphs (checked by
``models.onnx_check``) and safetensors weights, whose layout is simple enough to check here
without parsing a tensor: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. Pickles, ``torch.save`` archives and
TorchScript (a zip with ``code/`` and ``data.pkl``) are recognised by their first bytes so the
answer can say what was sent and what to send instead.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

# bytes per element of each safetensors dtype
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 * 1024 * 1024


class UploadFormatError(ValueError):
    """The bytes are not what their field says they are."""


class PickleUploadError(UploadFormatError):
    """A pickle, a ``torch.save`` archive or TorchScript: refused, never loaded."""


def sniff_pickle(data: bytes, filename: str = "") -> str | None:
    """Why ``data`` looks like a pickle-based PyTorch file (None when it does not)."""
    name = filename.lower()
    if name.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".jit", ".torchscript")):
        return f"a file named {filename!r} (PyTorch's .pt/.pth/.bin files are pickles or TorchScript)"
    if data[:1] == b"\x80" and len(data) > 1 and data[1] in range(2, 6):
        return f"a pickle (protocol {data[1]})"
    if data[:4] == b"PK\x03\x04":
        head = data[:65536]
        if b"constants.pkl" in head or b"/code/" in head:
            return "a TorchScript archive (a zip of pickles and Python code)"
        if b"data.pkl" in head:
            return "a torch.save archive (a zip holding data.pkl)"
    return None


@dataclass(frozen=True)
class SafetensorsInfo:
    """What the header of a safetensors file says: tensor name -> (dtype, shape)."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    parameters: int
    metadata: dict[str, str]


def inspect_safetensors(data: bytes) -> SafetensorsInfo:
    """Check that ``data`` is a complete, well-formed safetensors file; raise
    ``UploadFormatError`` saying what is wrong (truncated, not safetensors, overlapping or
    out-of-range tensors, an unknown dtype)."""
    if len(data) < 8:
        raise UploadFormatError(f"expected a safetensors file, got {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise UploadFormatError(f"expected a safetensors header of at most {len(data) - 8} bytes, the "
                                f"file declares {header_len} (truncated, or not safetensors)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UploadFormatError("expected a JSON safetensors header (truncated, or not safetensors)") from None
    if not isinstance(header, dict):
        raise UploadFormatError("expected a JSON object as the safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UploadFormatError("expected __metadata__ to be an object of strings")
    body = len(data) - 8 - header_len
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    parameters = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UploadFormatError(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise UploadFormatError(f"tensor {name!r}: expected a dtype in {sorted(DTYPE_SIZES)}, "
                                    f"got {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UploadFormatError(f"tensor {name!r}: expected a shape of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= body):
            raise UploadFormatError(f"tensor {name!r}: expected data offsets inside the {body} data bytes, "
                                    f"got {offsets} (truncated file?)")
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * DTYPE_SIZES[dtype]:
            raise UploadFormatError(f"tensor {name!r}: expected {count * DTYPE_SIZES[dtype]} bytes for "
                                    f"{dtype} {shape}, got {offsets[1] - offsets[0]}")
        tensors[str(name)] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], str(name)))
        if dtype in FLOAT_DTYPES:
            parameters += count
    position = 0
    for start, stop, name in sorted(spans):
        if start != position:
            raise UploadFormatError(f"tensor {name!r}: expected tensors to tile the data without gaps "
                                    f"or overlaps, got one starting at {start} after {position}")
        position = stop
    if position != body:
        raise UploadFormatError(f"expected {body} data bytes to be covered by tensors, got {position} "
                                "(truncated or padded file)")
    if not tensors:
        raise UploadFormatError("expected at least one tensor in the safetensors file")
    return SafetensorsInfo(tensors, parameters, {str(k): str(v) for k, v in metadata.items()})
