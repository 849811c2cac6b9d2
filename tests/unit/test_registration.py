"""The registration job's body on tiny models (no Redis): what it checks, measures and publishes,
and that a failed check publishes nothing and leaves no staged file."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from models.architectures import build
from models.manifest import CardIndex, ModelUpload, RegistrationJob
from models.registry import load_module
from workers.errors import JobFailure
from workers.jobs import Context, install_context, make_context
from workers.registration import _register
from workers.settings import WorkerSettings

SHAPE = (3, 8, 8)
CLASSES = ("a", "b", "c")


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    context = make_context(WorkerSettings(var_dir=tmp_path / "var", device="cpu"))
    install_context(context)
    yield context
    install_context(make_context(WorkerSettings(var_dir=tmp_path / "other", device="cpu")))


def _onnx(module: nn.Module, dynamic: bool = True, batch: int = 2) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.rand(batch, *SHAPE),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}} if dynamic else None)
    return buffer.getvalue()


def _job(ctx: Context, fmt: str, data: bytes, architecture: str | None = None,
         classes: tuple[str, ...] = CLASSES,
         static_batch: int | None = None) -> RegistrationJob:
    job_id = hashlib.sha256(data).hexdigest()[:12]
    key = f"uploads/{job_id}/{'model.onnx' if fmt == 'onnx' else 'weights.safetensors'}"
    ctx.store.put(key, data)
    upload = ModelUpload(name="team-net", input_shape=SHAPE, classes=classes, architecture=architecture,
                         normalization={"mean": (0.5,) * 3, "std": (0.25,) * 3})  # type: ignore[arg-type]
    return RegistrationJob(job_id=job_id, team="t", upload=upload, format=fmt, file=key,  # type: ignore[arg-type]
                           sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), parameters=0,
                           opset=17 if fmt == "onnx" else None, static_batch=static_batch)


def _published(ctx: Context) -> list[int]:
    return CardIndex([ctx.settings.models_root]).versions("team-net")


def _staged(ctx: Context) -> list[str]:
    return ctx.store.list("uploads")


def test_an_onnx_model_is_probed_measured_and_published(ctx: Context) -> None:
    torch.manual_seed(0)
    body = build("mlp", SHAPE, 3)
    result = _register(_job(ctx, "onnx", _onnx(body)), None)
    assert result["model"] == "team-net@1" and _published(ctx) == [1] and _staged(ctx) == []
    card = CardIndex([ctx.settings.models_root]).card("team-net")
    assert card is not None and card.team == "t" and card.architecture == "onnx" and card.gradients
    assert card.registration is not None and card.registration.parameters == sum(
        p.numel() for p in body.parameters())
    assert card.batch_size["cpu"] in {row.batch_size for row in card.registration.throughput}
    checks = set(card.registration.checks)
    assert {"output_shape", "finite", "deterministic", "gradients", "throughput"} <= checks
    # What was published loads like any registry model, normalisation folded in.
    directory = CardIndex([ctx.settings.models_root]).directory("team-net")
    assert directory is not None
    _, module = load_module(directory)
    x = torch.rand(5, *SHAPE)
    assert torch.allclose(module(x), body((x - 0.5) / 0.25), atol=1e-5)


def test_a_graph_with_a_fixed_batch_runs_on_any_batch(ctx: Context) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    _register(_job(ctx, "onnx", _onnx(body, dynamic=False, batch=4), static_batch=4), None)
    directory = CardIndex([ctx.settings.models_root]).directory("team-net")
    assert directory is not None
    card, module = load_module(directory)
    assert card.static_batch == 4 and card.batch_size["cpu"] == 4
    x = torch.rand(7, *SHAPE)
    assert torch.allclose(module(x), body((x - 0.5) / 0.25), atol=1e-5)


def test_safetensors_weights_of_a_catalog_architecture(ctx: Context) -> None:
    body = build("small-cnn", SHAPE, 3)
    weights = save_safetensors({k: v.contiguous() for k, v in body.state_dict().items()})
    _register(_job(ctx, "safetensors", weights, architecture="small-cnn"), None)
    card = CardIndex([ctx.settings.models_root]).card("team-net@1")
    assert card is not None and card.architecture == "small-cnn" and card.registration is not None
    assert card.registration.format == "safetensors"


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] * torch.log(x.mean() - 2.0)


class _Rounded(nn.Module):
    """Quantises its input: the gradient is zero almost everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(192, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(x * 4).flatten(1))


@pytest.mark.parametrize(("make", "code", "fragment"), [
    (lambda ctx: _job(ctx, "safetensors", save_safetensors(
        {k: v.contiguous() for k, v in build("mlp", SHAPE, 3).state_dict().items()}), architecture="small-cnn"),
     "invalid-weights", "missing"),
    (lambda ctx: _job(ctx, "onnx", _onnx(_NaN())), "non-finite-logits", "NaN"),
    (lambda ctx: _job(ctx, "onnx", _onnx(build("mlp", SHAPE, 3)), classes=("a", "b", "c", "d")),
     "output-shape", "expected (3, 4)"),
])
def test_a_failed_check_publishes_nothing(ctx: Context, make, code: str, fragment: str) -> None:  # type: ignore[no-untyped-def]
    spec = make(ctx)
    with pytest.raises(JobFailure) as failure:
        _register(spec, None)
    assert failure.value.code == code and fragment in failure.value.message, failure.value.message
    assert _published(ctx) == [] and _staged(ctx) == []


def test_zero_gradients_publish_a_model_marked_for_black_box_attacks(ctx: Context) -> None:
    _register(_job(ctx, "onnx", _onnx(_Rounded())), None)
    card = CardIndex([ctx.settings.models_root]).card("team-net")
    assert card is not None and not card.gradients and not card.differentiable
    assert card.registration is not None and "black-box" in card.registration.checks["gradients"]
