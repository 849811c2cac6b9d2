"""Torch-free inspection of an uploaded ONNX graph, so the gateway can refuse a bad upload (not
ONNX, external data, custom operators, operators onnx2torch cannot convert) before anything is
stored or queued.

Which operators can be converted comes from ``models/onnx_ops.json``: op type -> the operator
versions (``since_version``) that onnx2torch registers a converter for. It is generated from the
installed onnx2torch by ``models.onnx_import.write_supported_ops`` and a unit test keeps it equal
to what onnx2torch reports, so the gateway's answer and the worker's conversion cannot drift.

Only ``onnx``, numpy and the standard library are imported here: the gateway never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx
from onnx import defs

OPS_FILE = Path(__file__).resolve().parent / "onnx_ops.json"
# The default ONNX domain is spelled either way in ``opset_import`` and ``NodeProto.domain``.
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
# A serialised protobuf message cannot exceed 2 GiB; bigger graphs need external data (refused).
MAX_PROTOBUF_BYTES = 2**31 - 1
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})
# The lowest opset tried when the graph's own opset has an operator version onnx2torch lacks:
# onnx2torch's converters start at opset 9 for most ops, and older graphs are rare.
LOWEST_TARGET_OPSET = 7

# Ops that ``models.onnx_import`` rewrites into others before conversion (their ONNX function
# bodies), with the ops they become: the dynamo exporter writes Gelu (opset 20) for every GELU.
EXPANSIONS: dict[str, tuple[str, ...]] = {"Gelu": ("Add", "Div", "Erf", "Mul", "Tanh")}

Dim = int | str | None


class OnnxFormatError(ValueError):
    """The bytes are not a self-contained ONNX model of one input that onnx2torch could read."""


@dataclass(frozen=True)
class OnnxInfo:
    """What an ONNX graph declares, read without running or converting it.

    ``inputs``/``outputs`` are ``(name, dims)`` with an ``int`` for a fixed dimension, the symbol
    (``str``) or ``None`` for a dynamic one. ``dynamic_batch`` is false when the graph fixes its
    input's first dimension (the exporter was given no dynamic batch axis); ``static_batch`` is
    then that size, the only one the converted module is sure to accept, and callers pad or split
    batches to it (``models.registry.FixedBatch``).

    ``parameters`` counts the elements of floating-point initializers (weights, biases,
    normalisation statistics). ``unsupported`` lists op types onnx2torch has no converter for at
    any version (an op the loader expands first, see ``EXPANSIONS``, counts as the ops it becomes).
    ``target_opset`` is the opset ``models.onnx_import.load_onnx`` converts the graph to: ``opset``
    itself when no conversion is needed, ``None`` when no opset has a converter for every op.
    """

    opset: int
    ir_version: int
    op_types: tuple[str, ...]
    inputs: tuple[tuple[str, tuple[Dim, ...]], ...]
    outputs: tuple[tuple[str, tuple[Dim, ...]], ...]
    initializers: int
    parameters: int
    dynamic_batch: bool
    static_batch: int | None
    unsupported: tuple[str, ...]
    target_opset: int | None

    @property
    def problem(self) -> str | None:
        """Why onnx2torch cannot convert this graph, in one sentence (None when it can)."""
        if self.unsupported:
            return (f"expected operators that onnx2torch can convert, got {', '.join(self.unsupported)} "
                    f"(opset {self.opset}), which it cannot convert at any version")
        if self.target_opset is None:
            return (f"expected operator versions that onnx2torch can convert, got opset {self.opset} and "
                    f"no opset from {LOWEST_TARGET_OPSET} to {max_supported_opset()} at which every "
                    f"operator of {', '.join(converted_op_types(self.op_types))} has a converter")
        return None


@lru_cache(maxsize=1)
def supported_table() -> Mapping[str, frozenset[int]]:
    """Op type (default domain) -> the operator versions onnx2torch converts, from the committed
    ``onnx_ops.json``."""
    raw = json.loads(OPS_FILE.read_text())
    return {op: frozenset(versions) for op, versions in raw["ops"].items()}


def max_supported_opset() -> int:
    """The highest operator version onnx2torch registers for any op."""
    return max(max(versions) for versions in supported_table().values())


def resolved_version(op_type: str, opset: int) -> int:
    """The operator version (``since_version``) that ``op_type`` has in ``opset``, which is what
    onnx2torch looks its converter up by. An op unknown to ``onnx.defs`` at that opset keeps the
    opset number itself, as onnx2torch does."""
    try:
        return int(defs.get_schema(op_type, max_inclusive_version=opset, domain="").since_version)
    except defs.SchemaError:
        return opset


def converted_op_types(op_types: tuple[str, ...] | list[str]) -> list[str]:
    """The op types onnx2torch sees once ``EXPANSIONS`` are applied, sorted."""
    return sorted({new for op in op_types for new in EXPANSIONS.get(op, (op,))})


def missing_versions(op_types: tuple[str, ...] | list[str], opset: int) -> list[str]:
    """``op_type vN`` for each op whose version at ``opset`` has no converter (ops without any
    converter included)."""
    table = supported_table()
    missing = []
    for op in op_types:
        version = resolved_version(op, opset)
        if version not in table.get(op, frozenset()):
            missing.append(f"{op} v{version}")
    return missing


def target_opset(op_types: tuple[str, ...] | list[str], opset: int) -> int | None:
    """The opset to convert a graph to before onnx2torch: ``opset`` when every op already has a
    converter, else the nearest lower opset where all do, else the nearest higher one; None when
    there is none (or an op has no converter at all)."""
    table = supported_table()
    if any(op not in table for op in op_types):
        return None
    highest = max(max_supported_opset(), opset)
    candidates = [opset, *range(opset - 1, LOWEST_TARGET_OPSET - 1, -1), *range(opset + 1, highest + 1)]
    for candidate in candidates:
        if all(_defined(op, candidate) for op in op_types) and not missing_versions(op_types, candidate):
            return candidate
    return None


def _defined(op_type: str, opset: int) -> bool:
    try:
        defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except defs.SchemaError:
        return False
    return True


def _not_onnx(data: bytes) -> str | None:
    """What ``data`` is when its first bytes show another format (None when they do not)."""
    if not data:
        return "an empty file"
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return f"a pickle (protocol {data[1]})"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save and TorchScript files are zips of pickles)"
    if data[:6] == b"\x93NUMPY":
        return "a NumPy .npy file"
    if data[8:9] == b"{":
        # safetensors: an 8-byte little-endian header length, then a JSON header
        header_len = int.from_bytes(data[:8], "little")
        if 0 < header_len <= len(data) - 8:
            return "a safetensors file (weights only; upload it with a catalog architecture instead)"
    return None


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph of its control-flow nodes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    if not value.type.HasField("tensor_type"):
        raise OnnxFormatError(f"expected tensor inputs and outputs, got {value.name!r} of type "
                              f"{value.type.WhichOneof('value')}")
    dims: list[Dim] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def parse_onnx(data: bytes, max_bytes: int | None = None) -> onnx.ModelProto:
    """Parse and check ``data`` as a self-contained ONNX model; raise ``OnnxFormatError`` saying
    what is wrong. Shared by ``inspect_onnx`` and the worker's loader."""
    limit = MAX_PROTOBUF_BYTES if max_bytes is None else min(max_bytes, MAX_PROTOBUF_BYTES)
    if len(data) > limit:
        raise OnnxFormatError(f"expected an ONNX file of at most {limit} bytes, got {len(data)}")
    other = _not_onnx(data)
    if other is not None:
        raise OnnxFormatError(f"expected an ONNX model (export it with torch.onnx.export), got {other}")
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:  # protobuf's decode errors differ by backend; hostile bytes are expected here
        raise OnnxFormatError("expected an ONNX model (a serialised onnx.ModelProto), got bytes that do "
                              "not parse as one (truncated, or another format)") from None
    # Protobuf skips unknown fields, so arbitrary bytes can parse as an empty-looking ModelProto.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise OnnxFormatError("expected an ONNX model with an IR version and a graph of nodes, got "
                              f"{'none' if model.ir_version <= 0 else 'IR version ' + str(model.ir_version)}"
                              f" and {len(model.graph.node)} nodes (truncated, or another format)")
    for graph in _graphs(model.graph):
        tensors = [*graph.initializer, *(a.t for n in graph.node for a in n.attribute
                                         if a.type == onnx.AttributeProto.TENSOR)]
        external = [t.name or "(a constant)" for t in tensors if _external(t)]
        if external:
            raise OnnxFormatError(f"expected a self-contained .onnx file (all weights inside it), got "
                                  f"{len(external)} tensors stored as external data, e.g. {external[0]!r}: "
                                  "export without external data (a graph under 2 GiB)")
        if graph.sparse_initializer:
            raise OnnxFormatError(f"expected dense initializers, got {len(graph.sparse_initializer)} "
                                  "sparse ones")
        custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in DEFAULT_DOMAINS})
        if custom:
            raise OnnxFormatError(f"expected operators of the default ONNX domain only, got "
                                  f"{', '.join(custom[:5])}")
    if opset_of(model) is None:
        domains = [o.domain for o in model.opset_import]
        raise OnnxFormatError(f"expected an opset import of the default ONNX domain, got {domains}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, or a C++ error surfaced as another type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxFormatError(f"expected a valid ONNX model, got one the ONNX checker rejects: {first}"
                              ) from None
    return model


def opset_of(model: onnx.ModelProto) -> int | None:
    """The opset version of the default ONNX domain (None when the model imports none)."""
    versions = [int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def inspect_onnx(data: bytes, max_bytes: int | None = None) -> OnnxInfo:
    """Check that ``data`` is a self-contained ONNX model with exactly one (image) input and
    report what it declares; raise ``OnnxFormatError`` when it is not (a pickle, zip or
    TorchScript file renamed ``.onnx``, truncated bytes, external data, custom domains, several
    inputs, more than ``max_bytes``).

    Unsupported operators are reported in ``OnnxInfo.unsupported``, not raised: whether to
    refuse is the caller's decision (``OnnxInfo.problem`` says why in one sentence).
    """
    model = parse_onnx(data, max_bytes)
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializer_names]
    if len(inputs) != 1:
        names = ", ".join(repr(v.name) for v in inputs) or "none"
        raise OnnxFormatError(f"expected exactly one graph input (the image batch), got {len(inputs)}: {names}")
    opset = opset_of(model)
    assert opset is not None  # parse_onnx refuses models without a default-domain opset
    input_dims = _dims(inputs[0])
    first = input_dims[0] if input_dims else None
    op_types = tuple(sorted({n.op_type for g in _graphs(graph) for n in g.node}))
    converted = converted_op_types(op_types)
    table = supported_table()
    parameters = sum(math.prod(t.dims) for t in graph.initializer if t.data_type in FLOAT_TYPES)
    return OnnxInfo(
        opset=opset,
        ir_version=int(model.ir_version),
        op_types=op_types,
        inputs=((inputs[0].name, input_dims),),
        outputs=tuple((v.name, _dims(v)) for v in graph.output),
        initializers=len(graph.initializer),
        parameters=int(parameters),
        dynamic_batch=not isinstance(first, int),
        static_batch=first if isinstance(first, int) else None,
        unsupported=tuple(op for op in converted if op not in table),
        target_opset=target_opset(converted, opset),
    )


def static_batch(data: bytes) -> int | None:
    """The batch size an ONNX graph is fixed to (None when its batch axis is dynamic)."""
    return inspect_onnx(data).static_batch
