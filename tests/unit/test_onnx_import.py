"""ONNX upload -> onnx2torch module: parity with the exported module (logits and input gradients),
the torch-free inspection, and refusal of everything that is not a convertible ONNX graph."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper
from onnx2torch import convert
from torch import nn
from torch.nn import functional as F

from models.onnx_check import OPS_FILE, OnnxFormatError, inspect_onnx, static_batch, supported_table
from models.onnx_import import OnnxConversionError, load_onnx, supported_ops
from models.registry import ModelLoadError

SHAPE = (3, 16, 16)
CLASSES = 10
# float32 through two graphs of the same function: measured up to 1.4e-6 of the largest logit or
# gradient entry over 30 batches per model; 1e-4 of it leaves room for other CPU kernels.
TOLERANCE = 1e-4


def legacy_export(module: nn.Module, batch: int, dynamic: bool) -> bytes:
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (torch.rand(batch, *SHAPE),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes=axes)
    return buffer.getvalue()


def dynamo_export(module: nn.Module, batch: int) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.rand(batch, *SHAPE),), buffer, dynamo=True, input_names=["x"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      verbose=False)
    return buffer.getvalue()


def logits_and_grad(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    logits = module(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


def assert_close(reference: torch.Tensor, converted: torch.Tensor) -> None:
    """Relative to the largest entry: randomly initialised nets have logits anywhere from 1e-10 to 10."""
    scale = float(reference.abs().max())
    assert scale > 0
    assert float((reference - converted).abs().max()) <= TOLERANCE * scale


def assert_parity(original: nn.Module, converted: nn.Module, n: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=generator)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    logits, grad = logits_and_grad(original, x, y)
    logits_c, grad_c = logits_and_grad(converted, x, y)
    assert logits_c.shape == (n, CLASSES)
    assert_close(logits, logits_c)
    assert_close(grad, grad_c)


def random_batch_norm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every batch-norm parameter and statistic, so that folding them into convs is
    really tested; non-zero shifts also keep pre-activations off exactly 0, where float noise
    would otherwise pick ReLU's subgradient differently in the two graphs."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            size = layer.num_features
            layer.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            layer.bias.data.copy_(0.1 * torch.randn(size, generator=generator))
            layer.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    return module.eval()


def batch_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Set batch-norm statistics from a random batch, as training would: without it MobileNet's
    depthwise layers shrink activations to ~1e-10 and any comparison passes. Variances are kept
    above 0.01: a channel that barely varies over random inputs gets a gain of 1/sqrt(eps) that
    turns the exporter's float32 folding of batch norm into convs into 1e-4 relative errors."""
    batch_norms = [layer for layer in module.modules() if isinstance(layer, nn.BatchNorm2d)]
    for layer in batch_norms:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: one batch sets the statistics
    module.train()
    with torch.no_grad():
        module(torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(seed)))
        for layer in batch_norms:
            layer.running_var.clamp_(min=0.01)
    return module.eval()


def test_resnet18_with_a_dynamic_batch_axis_matches_its_export() -> None:
    torch.manual_seed(0)
    original = random_batch_norm(torchvision.models.resnet18(weights=None, num_classes=CLASSES))
    data = legacy_export(original, batch=2, dynamic=True)
    info = inspect_onnx(data)
    assert info.opset == 17 and info.dynamic_batch and info.static_batch is None
    assert info.inputs == (("x", ("batch", *SHAPE)),) and info.outputs == (("logits", ("batch", CLASSES)),)
    assert info.unsupported == () and info.target_opset == 17 and info.problem is None
    converted = load_onnx(data)
    assert not converted.training
    assert_parity(original, converted, n=2, seed=1)
    assert_parity(original, converted, n=5, seed=2)  # another batch size than the export's


def test_initializers_deduplicated_through_identity_nodes_are_inlined() -> None:
    """The legacy exporter writes a second conv with the first one's weights as Identity nodes of
    its initializers; onnx2torch's Conv converter then fails with a KeyError on their names."""
    first, second = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    second.load_state_dict(first.state_dict())
    original = nn.Sequential(first, nn.ReLU(), second, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(3, CLASSES)).eval()
    data = legacy_export(original, batch=2, dynamic=True)
    identities = [n for n in onnx.load_from_string(data).graph.node if n.op_type == "Identity"]
    assert len(identities) == 2
    with pytest.raises(KeyError):
        convert(onnx.load_from_string(data))
    assert_parity(original, load_onnx(data), n=3, seed=6)


def test_mobilenet_v3_small_with_a_static_batch_matches_its_export() -> None:
    torch.manual_seed(0)
    original = batch_statistics(torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES))
    data = legacy_export(original, batch=3, dynamic=False)
    info = inspect_onnx(data)
    assert info.static_batch == 3 and not info.dynamic_batch and static_batch(data) == 3
    assert info.parameters > 1_000_000 and info.initializers > 0
    assert_parity(original, load_onnx(data), n=3, seed=3)


class TinyNet(nn.Module):
    """What the dynamo exporter writes in ways onnx2torch cannot read as such: opset 20, a global
    mean (ReduceMean v18), a flatten (Reshape with allowzero=1) and both GELUs (Gelu v20)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.GELU(approximate="tanh"))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)).view(x.shape[0], -1))


def test_a_dynamo_export_is_converted_down_to_a_supported_opset() -> None:
    torch.manual_seed(0)
    original = batch_statistics(TinyNet())
    data = dynamo_export(original, batch=2)
    model = onnx.load_from_string(data)
    assert any(a.name == "allowzero" and a.i == 1 for n in model.graph.node if n.op_type == "Reshape"
               for a in n.attribute)
    gelus = sorted(a.s for n in model.graph.node if n.op_type == "Gelu" for a in n.attribute)
    assert gelus == [b"none", b"tanh"]
    info = inspect_onnx(data)
    assert info.opset >= 20 and {"Gelu", "ReduceMean"} <= set(info.op_types)
    assert info.target_opset == 17 and info.unsupported == () and info.dynamic_batch
    converted = load_onnx(data)
    assert_parity(original, converted, n=2, seed=4)
    assert_parity(original, converted, n=7, seed=5)


def unsupported_graph() -> bytes:
    """Conv -> Shrink -> Mish -> global pooling -> Flatten: Shrink and Mish have no converter."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(size=108).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shrink", ["c"], ["s"], lambd=0.1),
        helper.make_node("Mish", ["s"], ["m"]),
        helper.make_node("GlobalAveragePool", ["m"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(nodes, "odd", [x], [logits], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_an_operator_without_a_converter_is_named() -> None:
    assert "Shrink" not in supported_ops() and "Mish" not in supported_ops()
    data = unsupported_graph()
    info = inspect_onnx(data)
    assert info.unsupported == ("Mish", "Shrink") and info.target_opset is None
    assert info.problem is not None and "Mish, Shrink" in info.problem
    with pytest.raises(OnnxConversionError, match=r"Mish, Shrink \(opset 18\)") as caught:
        load_onnx(data)
    assert isinstance(caught.value, ModelLoadError) and "operator" in str(caught.value)


def test_a_converter_failure_names_the_node_and_opset() -> None:
    """Reshape with allowzero=1 and a shape computed at run time cannot be rewritten safely."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["logits"], allowzero=1, name="odd_reshape"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    assert inspect_onnx(data).problem is None  # every op has a converter; this one refuses the node
    expected = r"operator Reshape \(node 'odd_reshape', opset 17\) failing with .*allowzero"
    with pytest.raises(OnnxConversionError, match=expected):
        load_onnx(data)


@pytest.fixture(scope="module")
def not_onnx() -> dict[str, bytes]:
    onnx_bytes = legacy_export(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, CLASSES)).eval(), 1, True)
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, saved)
    scripted = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    return {
        "pickle": pickle.dumps({"w": [1.0, 2.0]}),
        "torch.save": saved.getvalue(),
        "torchscript": scripted.getvalue(),
        "truncated": onnx_bytes[: len(onnx_bytes) // 2],
        "truncated-head": onnx_bytes[:40],
        "random": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "text": b"not an onnx graph",
    }


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "torchscript", "truncated", "truncated-head",
                                  "random", "empty", "text"])
def test_bytes_that_are_not_onnx_are_refused(not_onnx: dict[str, bytes], kind: str) -> None:
    with pytest.raises(OnnxFormatError, match="expected"):
        inspect_onnx(not_onnx[kind])
    with pytest.raises(OnnxConversionError, match="expected"):
        load_onnx(not_onnx[kind])


def small_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graphs_the_service_cannot_take_are_refused() -> None:
    two_inputs = small_model()
    two_inputs.graph.input.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]))
    with pytest.raises(OnnxFormatError, match="exactly one graph input.*got 2"):
        inspect_onnx(two_inputs.SerializeToString())

    external = small_model()
    weight = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    external.graph.initializer.append(weight)
    with pytest.raises(OnnxFormatError, match="self-contained"):
        inspect_onnx(external.SerializeToString())

    custom = small_model()
    custom.graph.node.append(helper.make_node("Magic", ["logits"], ["z"], domain="com.example"))
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OnnxFormatError, match="com.example::Magic"):
        inspect_onnx(custom.SerializeToString())

    data = small_model().SerializeToString()
    assert inspect_onnx(data).static_batch == 1
    with pytest.raises(OnnxFormatError, match=f"at most 10 bytes, got {len(data)}"):
        inspect_onnx(data, max_bytes=10)


def test_the_committed_operator_table_is_what_onnx2torch_reports() -> None:
    committed = json.loads(OPS_FILE.read_text())
    assert committed["ops"] == supported_ops(), (
        "models/onnx_ops.json is stale: run models.onnx_import.write_supported_ops()")
    assert {op: sorted(v) for op, v in supported_table().items()} == supported_ops()


def test_the_gateway_side_imports_no_torch() -> None:
    code = ("import sys, models.onnx_check, models.catalog_names; "
            "assert 'torch' not in sys.modules and 'onnx2torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
