"""ONNX graph -> differentiable ``nn.Module`` with onnx2torch, so white-box attacks work on
uploaded models.

onnx2torch 1.5.15 cannot read what ``torch.onnx.export`` writes today without help; the passes
here fix what was measured (torch 2.14.1), each without changing the graph's function:

- The legacy exporter (``dynamo=False``) deduplicates equal initializers through ``Identity``
  nodes whose input is an initializer. onnx2torch's Conv/Gemm converters read weights from the
  initializer table only and fail with ``KeyError: 'onnx::Conv_197'``. Such an Identity (and a
  ``Constant`` node holding a tensor) becomes an initializer under its output name.
- The dynamo exporter (the default) writes opset 20, whose ``ReduceMean`` (v18) onnx2torch does
  not convert: the graph is converted by ``onnx.version_converter`` to the nearest opset where
  every operator has a converter (``models.onnx_check.target_opset``, usually 17).
- It also writes ``Reshape`` with ``allowzero=1``, which onnx2torch refuses. When the shape is a
  constant without zeros, ``allowzero`` has no effect, so it is set to 0.
- It writes every GELU as a ``Gelu`` node (opset 20), which onnx2torch lacks and the version
  converter cannot take below opset 20: it is expanded into its ONNX function body first
  (``x/2 * (1 + erf(x/sqrt 2))``, or the tanh form), as the legacy exporter writes it anyway.

Anything still unconvertible raises ``OnnxConversionError`` naming the operator and opset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter
from onnx2torch import convert
from onnx2torch.node_converters import get_converter
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY
from onnx2torch.onnx_graph import OnnxGraph
from torch import nn

from models.onnx_check import (
    DEFAULT_DOMAINS,
    OPS_FILE,
    OnnxFormatError,
    missing_versions,
    opset_of,
    parse_onnx,
    supported_table,
    target_opset,
)
from models.registry import ModelLoadError


class OnnxConversionError(ModelLoadError):
    """An ONNX graph that onnx2torch cannot turn into a module (the message names the operator)."""


def supported_ops() -> dict[str, list[int]]:
    """Op type -> sorted operator versions that the installed onnx2torch has converters for
    (default ONNX domain only: other domains are refused before conversion). Read from the
    registry that importing ``onnx2torch.node_converters`` fills, which is what ``convert`` uses."""
    table: dict[str, set[int]] = {}
    for description in _CONVERTER_REGISTRY:
        if description.domain in DEFAULT_DOMAINS:
            table.setdefault(description.operation_type, set()).add(int(description.version))
    return {op: sorted(versions) for op, versions in sorted(table.items())}


def write_supported_ops(path: Path = OPS_FILE) -> None:
    """Regenerate ``models/onnx_ops.json`` from the installed onnx2torch (after upgrading it)."""
    from importlib.metadata import version

    # one op per line, so that an onnx2torch upgrade reads as a short diff
    ops = ",\n".join(f"  {json.dumps(op)}: {json.dumps(versions)}" for op, versions in supported_ops().items())
    path.write_text(f'{{\n "generator": "models.onnx_import.write_supported_ops",\n'
                    f' "onnx2torch": {json.dumps(version("onnx2torch"))},\n "ops": {{\n{ops}\n }}\n}}\n')


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
        return None
    return node.attribute[0].t


def inline_constants(model: onnx.ModelProto) -> int:
    """Replace each ``Identity`` of an initializer and each tensor ``Constant`` by an initializer
    named after its output (graph outputs excepted: onnx2torch needs a node behind each).
    Returns how many nodes were replaced. Nodes are topologically sorted, so chains of
    Identities resolve in one pass."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    kept = []
    replaced = 0
    for node in graph.node:
        tensor: onnx.TensorProto | None = None
        if node.domain in DEFAULT_DOMAINS and len(node.output) == 1 and node.output[0] not in outputs:
            if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in initializers:
                tensor = initializers[node.input[0]]
            else:
                tensor = _constant_value(node)
        if tensor is None:
            kept.append(node)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = node.output[0]
        graph.initializer.append(copy)
        initializers[copy.name] = copy
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(kept)
    return replaced


def clear_allowzero(model: onnx.ModelProto) -> int:
    """Set ``allowzero`` to 0 on each Reshape whose shape is an initializer without zeros (the
    attribute only changes how a 0 in the shape is read). Returns how many were rewritten."""
    initializers = {t.name: t for t in model.graph.initializer}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        for attribute in node.attribute:
            if attribute.name == "allowzero" and attribute.i == 1:
                shape = numpy_helper.to_array(initializers[node.input[1]])
                if not np.any(shape == 0):
                    attribute.i = 0
                    rewritten += 1
    return rewritten


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Value name -> element type, from shape inference (empty when inference fails)."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort here: float32 is then assumed
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def _gelu_nodes(x: str, y: str, name: str, approximate: str, temps: list[str],
                const: Callable[[float], str]) -> list[onnx.NodeProto]:
    """The function body of ``Gelu`` from ``x`` to ``y`` through the 8 value names ``temps``."""
    make = onnx.helper.make_node
    t = temps
    if approximate == "tanh":
        head = [make("Mul", [x, x], [t[0]]), make("Mul", [t[0], x], [t[1]]),
                make("Mul", [t[1], const(0.044715)], [t[2]]), make("Add", [x, t[2]], [t[3]]),
                make("Mul", [t[3], const(math.sqrt(2 / math.pi))], [t[4]]), make("Tanh", [t[4]], [t[5]])]
    else:
        head = [make("Div", [x, const(math.sqrt(2))], [t[4]]), make("Erf", [t[4]], [t[5]])]
    return [*head, make("Add", [t[5], const(1.0)], [t[6]]), make("Mul", [x, t[6]], [t[7]]),
            make("Mul", [t[7], const(0.5)], [y], name=name)]


def expand_gelu(model: onnx.ModelProto) -> int:
    """Replace each ``Gelu`` node by the arithmetic of its ONNX function body; returns how many.

    ``approximate="none"``: ``y = x * (1 + erf(x / sqrt(2))) * 0.5``; ``"tanh"``:
    ``y = x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))) * 0.5``.
    """
    graph = model.graph
    expanded = sum(1 for node in graph.node if node.op_type == "Gelu" and node.domain in DEFAULT_DOMAINS)
    if not expanded:
        return 0
    elem_types = _elem_types(model)
    taken = {t.name for t in graph.initializer} | {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {v.name for v in graph.input}
    constants: dict[tuple[int, float], str] = {}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def constant(value: float, elem_type: int) -> str:
        if (elem_type, value) not in constants:
            name = fresh(f"gelu_const_{len(constants)}")
            array = np.array(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))
            graph.initializer.append(numpy_helper.from_array(array, name))
            constants[elem_type, value] = name
        return constants[elem_type, value]

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        elem_type = elem_types.get(x) or onnx.TensorProto.FLOAT
        approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        temps = [fresh(f"{y}__gelu_{i}") for i in range(8)]
        nodes += _gelu_nodes(x, y, node.name, approximate, temps, partial(constant, elem_type=elem_type))
    del graph.node[:]
    graph.node.extend(nodes)
    return expanded


def _default_domain(model: onnx.ModelProto) -> None:
    """Spell the default domain ``""`` everywhere: onnx2torch looks opsets up by node domain."""
    for node in model.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
    for opset in model.opset_import:
        if opset.domain == "ai.onnx":
            opset.domain = ""


def _op_types(model: onnx.ModelProto) -> list[str]:
    return sorted({node.op_type for node in model.graph.node})


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``model`` into what onnx2torch converts (see the module docstring); raise
    ``OnnxConversionError`` when no opset has a converter for every operator."""
    _default_domain(model)
    inline_constants(model)
    expand_gelu(model)
    opset = opset_of(model)
    assert opset is not None  # parse_onnx refuses models without a default-domain opset
    op_types = _op_types(model)
    unsupported = [op for op in op_types if op not in supported_table()]
    if unsupported:
        raise OnnxConversionError(f"expected operators that onnx2torch can convert, got "
                                  f"{', '.join(unsupported)} (opset {opset}), which it cannot convert "
                                  "at any version")
    target = target_opset(op_types, opset)
    if target is None:
        raise OnnxConversionError(f"expected operator versions that onnx2torch can convert, got opset "
                                  f"{opset} with {', '.join(missing_versions(op_types, opset))}, and no "
                                  "other opset has a converter for every operator")
    if target != opset:
        try:
            model = version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises C++ errors of several types
            raise OnnxConversionError(f"expected a graph that converts from opset {opset} to {target} "
                                      f"(whose operator versions onnx2torch converts), got: "
                                      f"{_first_line(exc)}") from exc
        _default_domain(model)
        inline_constants(model)
    clear_allowzero(model)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _failing_node(model: onnx.ModelProto) -> tuple[str, str, str] | None:
    """(op type, node name, error) of the first node whose converter fails, found by running the
    converters one by one; None when each converts on its own."""
    opset = opset_of(model) or 0
    try:
        graph = OnnxGraph(shape_inference.infer_shapes(model).graph)
    except Exception:  # the graph defeats even the diagnosis: the caller reports convert's error
        return None
    for name, node in graph.nodes.items():
        try:
            converter = get_converter(operation_type=node.operation_type, version=opset, domain=node.domain)
            converter(node, graph)
        except Exception as exc:  # converters raise whatever their code hits on an odd node
            return node.operation_type, name, _first_line(exc)
    return None


def load_onnx(data: bytes) -> nn.Module:
    """Convert the ONNX graph in ``data`` into an ``nn.Module`` in eval mode whose forward and
    input gradient follow the graph (normalisation is not folded in and nothing is frozen: the
    registry does both).

    When the graph's batch axis is dynamic the module accepts any batch size. When it is static
    (exported without ``dynamic_axes``/``dynamic_shapes``: ``OnnxInfo.static_batch`` from
    ``models.onnx_check.inspect_onnx``) the batch axis is fixed: the graph was traced at that batch
    size and may carry it as a constant (a Reshape to ``(3, 576)``, say), so only that many inputs
    are sure to work; the caller pads or splits batches to it (``models.registry.FixedBatch``).

    Raises ``OnnxConversionError`` (a ``ModelLoadError``) with one sentence naming the operator and
    opset when the bytes are not a self-contained ONNX model or onnx2torch cannot convert it.
    """
    try:
        model = parse_onnx(data)
    except OnnxFormatError as exc:
        raise OnnxConversionError(str(exc)) from exc
    model = normalise(model)
    opset = opset_of(model)
    try:
        module: nn.Module = convert(model)
    except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError, ValueError, ...
        failing = _failing_node(model)
        if failing is None:
            raise OnnxConversionError(f"expected a graph that onnx2torch converts, got opset {opset} "
                                      f"failing with {_first_line(exc)}") from exc
        op_type, name, error = failing
        raise OnnxConversionError(f"expected operators that onnx2torch converts, got operator "
                                  f"{op_type} (node {name!r}, opset {opset}) failing with {error}") from exc
    return module.eval()

