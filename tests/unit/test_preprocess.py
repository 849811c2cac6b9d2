"""Input-transformation steps: their values, shapes, gradients with and without BPDA, bad dicts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from workers.defenses.preprocess import DIFFERENTIABLE, Preprocess, Preprocessed, bpda, build_step

BOUNDS = (0.0, 1.0)
WIDE = (-1.0, 2.0)  # not [0, 1]: steps must map the model's bounds, not assume them


def uniform(shape: tuple[int, ...], bounds: tuple[float, float] = BOUNDS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape, generator=g, dtype=torch.float64)


def step(params: dict[str, Any], bounds: tuple[float, float] = BOUNDS) -> nn.Module:
    return build_step(params, bounds)


@pytest.mark.parametrize("bits", [1, 3, 5])
@pytest.mark.parametrize("bounds", [BOUNDS, WIDE])
def test_bit_depth_lands_on_the_grid_and_is_idempotent(bits: int, bounds: tuple[float, float]) -> None:
    x = uniform((4, 3, 5, 5), bounds)
    out = step({"name": "bit-depth", "bits": bits}, bounds)(x)
    levels = 2**bits - 1
    grid = (out - bounds[0]) / (bounds[1] - bounds[0]) * levels
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-9)
    assert grid.min() >= 0 and grid.max() <= levels
    assert len(torch.unique(grid.round())) > 1
    torch.testing.assert_close(step({"name": "bit-depth", "bits": bits}, bounds)(out), out)
    assert (out - x).abs().max() <= (bounds[1] - bounds[0]) / levels / 2 + 1e-12


def test_bit_depth_8_is_the_identity_on_8_bit_data() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 6, 6), generator=g).double() / 255
    assert torch.equal(step({"name": "bit-depth", "bits": 8})(x), x)
    assert not torch.equal(step({"name": "bit-depth", "bits": 7})(x), x)


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_median_keeps_the_shape_and_constant_images(size: int) -> None:
    median = step({"name": "median", "size": size})
    x = uniform((2, 3, 7, 6))
    assert median(x).shape == x.shape
    constant = torch.full((2, 3, 7, 6), 0.37, dtype=torch.float64)
    assert torch.equal(median(constant), constant)


@pytest.mark.parametrize("where", [(3, 3), (0, 0), (5, 5)])
def test_median_3x3_removes_a_salt_pixel(where: tuple[int, int]) -> None:
    x = torch.full((1, 1, 6, 6), 0.2, dtype=torch.float64)
    x[0, 0, where[0], where[1]] = 1.0
    assert torch.equal(step({"name": "median", "size": 3})(x), torch.full_like(x, 0.2))


def test_median_matches_a_direct_window_median() -> None:
    """Reference by explicit windows: 2x2 reaches down-right, the even median is the upper middle."""
    x = uniform((1, 2, 5, 5))
    out = step({"name": "median", "size": 2})(x)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="reflect")
    for i in range(5):
        for j in range(5):
            window = padded[0, :, i : i + 2, j : j + 2].reshape(2, 4)
            torch.testing.assert_close(out[0, :, i, j], window.sort(dim=1).values[:, 2])


def test_median_gradient_flows_to_the_selected_element() -> None:
    x = uniform((1, 1, 5, 5)).requires_grad_(True)
    out = step({"name": "median", "size": 3})(x)
    (grad,) = torch.autograd.grad(out[0, 0, 2, 2], x)
    assert grad.sum() == 1 and (grad != 0).sum() == 1
    assert x[grad != 0].item() == out[0, 0, 2, 2].item()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bounds", [BOUNDS, WIDE])
def test_jpeg_quality_100_is_close_and_quality_10_is_not(channels: int, bounds: tuple[float, float]) -> None:
    # A smooth image with an edge, in colour with smooth chroma (libjpeg halves the chroma
    # resolution, so even quality 100 blurs sharp colour detail): JPEG keeps it at 100, blocks it at 10.
    rows = torch.linspace(0, 1, 16, dtype=torch.float64)
    luma = rows.view(-1, 1) * rows.view(1, -1)
    luma[4:9, 5:12] = 1.0 - luma[4:9, 5:12]
    image = torch.stack([luma, 0.8 * luma + 0.2 * rows.view(1, -1), 0.7 * luma + 0.3 * rows.view(-1, 1)])
    x = bounds[0] + (bounds[1] - bounds[0]) * image[:channels].unsqueeze(0).repeat(2, 1, 1, 1)
    span = bounds[1] - bounds[0]
    high = step({"name": "jpeg", "quality": 100}, bounds)(x)
    low = step({"name": "jpeg", "quality": 10}, bounds)(x)
    assert high.shape == low.shape == x.shape and high.dtype == x.dtype
    assert (high - x).abs().mean() <= 0.01 * span and (high - x).abs().max() <= 0.1 * span
    assert (low - x).abs().mean() > 5 * (high - x).abs().mean()
    assert (low - x).abs().max() > 0.2 * span
    assert low.min() >= bounds[0] and low.max() <= bounds[1]
    grid = (high - bounds[0]) / span * 255
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-9)  # decoded 8-bit pixels


def test_jpeg_rejects_two_channels() -> None:
    with pytest.raises(ValueError, match="expected 1 or 3 channels"):
        step({"name": "jpeg", "quality": 50})(uniform((1, 2, 8, 8)))


def test_blur_preserves_constants_and_mass() -> None:
    blur = step({"name": "gaussian-blur", "sigma": 1.0, "kernel_size": None})
    constant = torch.full((2, 3, 9, 9), -0.4, dtype=torch.float64)
    torch.testing.assert_close(blur(constant), constant)
    impulse = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    impulse[0, 0, 7, 7] = 1.0
    spread = blur(impulse)
    torch.testing.assert_close(spread.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert spread[0, 0, 7, 7] < 0.5 and spread[0, 0, 7, 7] == spread.max()
    torch.testing.assert_close(spread, spread.transpose(2, 3))
    x = uniform((2, 3, 9, 9))
    out = blur(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.mean(), x.mean(), rtol=0, atol=0.02)
    assert out.var() < x.var() / 2


def test_blur_default_kernel_is_capped_by_the_image() -> None:
    x = uniform((1, 1, 4, 6))
    out = step({"name": "gaussian-blur", "sigma": 5.0, "kernel_size": None})(x)  # 31 wide, capped to 3
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="expected kernel_size"):
        step({"name": "gaussian-blur", "sigma": 1.0, "kernel_size": 9})(x)


NON_DIFFERENTIABLE = [{"name": "bit-depth", "bits": 3}, {"name": "jpeg", "quality": 30}]


@pytest.mark.parametrize("params", NON_DIFFERENTIABLE, ids=lambda p: p["name"])
def test_gradient_is_zero_without_bpda_and_identity_with_it(params: dict[str, Any]) -> None:
    pipeline = Preprocess([params], BOUNDS)
    assert not pipeline.differentiable and not DIFFERENTIABLE[params["name"]]
    x = uniform((2, 3, 8, 8)).requires_grad_(True)
    upstream = uniform((2, 3, 8, 8), seed=1) - 0.5
    (grad,) = torch.autograd.grad((pipeline(x) * upstream).sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    pipeline.bpda = True
    out = pipeline(x)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    torch.testing.assert_close(grad, upstream)
    pipeline.bpda = False
    torch.testing.assert_close(out, pipeline(x))  # BPDA changes the gradient, never the value


def test_bpda_keeps_the_true_gradient_of_differentiable_steps() -> None:
    pipeline = Preprocess([{"name": "bit-depth", "bits": 4}, {"name": "median", "size": 3}], BOUNDS)
    assert not pipeline.differentiable
    x = uniform((1, 1, 6, 6)).requires_grad_(True)
    with bpda(pipeline):
        (grad,) = torch.autograd.grad(pipeline(x)[0, 0, 2, 2], x)
    assert grad.sum() == 1 and (grad != 0).sum() == 1  # the median's selection, not the identity


def test_bpda_context_restores_the_flags() -> None:
    flat = Preprocess([{"name": "bit-depth", "bits": 2}], BOUNDS)
    already = Preprocess([{"name": "jpeg", "quality": 50}], BOUNDS)
    already.bpda = True
    defended = nn.Sequential(Preprocessed(flat, nn.Flatten()), Preprocessed(already, nn.Identity()))
    with bpda(defended):
        assert flat.bpda and already.bpda
    assert not flat.bpda and already.bpda
    with pytest.raises(RuntimeError), bpda(defended):
        raise RuntimeError("inside")
    assert not flat.bpda and already.bpda


def test_preprocessed_runs_the_model_on_the_preprocessed_input() -> None:
    pipeline = Preprocess([{"name": "bit-depth", "bits": 1}], BOUNDS)
    model = nn.Flatten()
    x = uniform((3, 1, 4, 4))
    defended = Preprocessed(pipeline, model)
    assert torch.equal(defended(x), model((x > 0.5).double()))
    assert not defended.differentiable
    assert Preprocess([{"name": "median", "size": 2}], BOUNDS).differentiable
    assert Preprocess([], BOUNDS).differentiable


def test_every_step_takes_an_empty_batch() -> None:
    steps = [
        {"name": "bit-depth", "bits": 3},
        {"name": "median", "size": 2},
        {"name": "jpeg", "quality": 50},
        {"name": "gaussian-blur", "sigma": 0.5, "kernel_size": None},
    ]
    x = torch.zeros(0, 3, 6, 6, dtype=torch.float64)
    out = Preprocess(steps, BOUNDS)(x)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_pipeline_applies_steps_in_order() -> None:
    x = uniform((2, 1, 6, 6))
    pipeline = Preprocess([{"name": "median", "size": 3}, {"name": "bit-depth", "bits": 1}], BOUNDS)
    expected = step({"name": "bit-depth", "bits": 1})(step({"name": "median", "size": 3})(x))
    assert torch.equal(pipeline(x), expected)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"bits": 3}, KeyError, r"expected a step with a 'name'"),
        ({"name": "sharpen"}, ValueError, r"expected a step name in .*got 'sharpen'"),
        ({"name": "bit-depth"}, KeyError, r"expected bit-depth keys .*got no \['bits'\]"),
        ({"name": "bit-depth", "bits": 9}, ValueError, r"bit-depth bits an integer in \[1, 8\], got 9"),
        ({"name": "bit-depth", "bits": 2.0}, ValueError, r"got 2.0"),
        ({"name": "bit-depth", "bits": True}, ValueError, r"got True"),
        ({"name": "median", "size": 1}, ValueError, r"expected median size an integer in \[2, 5\], got 1"),
        ({"name": "median", "size": 3, "mode": "x"}, ValueError, r"got unknown \['mode'\]"),
        ({"name": "jpeg", "quality": 0}, ValueError, r"expected jpeg quality an integer in \[1, 100\], got 0"),
        ({"name": "gaussian-blur"}, KeyError, r"got no \['sigma'\]"),
        ({"name": "gaussian-blur", "sigma": 0.0}, ValueError, r"expected gaussian-blur sigma .*got 0.0"),
        ({"name": "gaussian-blur", "sigma": 1, "kernel_size": 4}, ValueError, r"kernel_size an odd .*got 4"),
    ],
)
def test_bad_step_dicts_raise_clearly(params: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_step(params, BOUNDS)
    with pytest.raises(error, match=message):
        Preprocess([{"name": "median", "size": 2}, params], BOUNDS)


def test_bad_bounds_raise() -> None:
    with pytest.raises(ValueError, match="expected bounds lo < hi"):
        build_step({"name": "bit-depth", "bits": 2}, (1.0, 1.0))
