"""8-bit quantization of adversarial examples: rounding stays inside the attack's eps ball (plain
rounding can leave it: FGSM at Linf 0.1 lands on 25.5 levels, which round to 26/255 = 0.10196),
and an image already on the levels comes back unchanged. Also the attack job's quantized scores."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.attacks.base import flat_norm
from workers.jobs import Context, _run_attack, attack_ball, install_context, make_context
from workers.scores import outside_ball, quantize, quantize_in_ball
from workers.settings import WorkerSettings
from workers.specs import AttackJob, DeepFoolParams, FGSMParams, InputRef, PGDParams

from .support import fmnist_test

BOUNDS = [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)]
# float32 noise of a difference of two values in the bounds, relative to their range
NOISE = 1e-6


def _on_levels(n: int, bounds: tuple[float, float], seed: int = 0) -> torch.Tensor:
    """Clean images whose values are 8-bit levels, as decoded from a PNG."""
    lo, hi = bounds
    g = torch.Generator().manual_seed(seed)
    return quantize(lo + (hi - lo) * torch.rand(n, 1, 8, 8, generator=g), bounds)


def _levels(v: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return (v.double() - lo) / (hi - lo) * 255


def _assert_one_of_the_two_nearest_levels(x_q: torch.Tensor, x_adv: torch.Tensor,
                                          bounds: tuple[float, float]) -> None:
    k, t = _levels(x_q, bounds), _levels(x_adv, bounds)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert ((k.round() - t).abs() < 1 + 1e-3).all()


@pytest.mark.parametrize("bounds", BOUNDS)
def test_linf_rounding_stays_inside_the_ball_where_plain_rounding_leaves_it(
    bounds: tuple[float, float],
) -> None:
    lo, hi = bounds
    eps = 0.1 * (hi - lo)  # 25.5 levels: the edge of the ball lies half-way between two levels
    x = _on_levels(16, bounds).clamp(lo + eps, hi - eps)
    x = quantize(x, bounds)
    signs = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    x_adv = x + eps * signs  # what FGSM returns
    plain = flat_norm(quantize(x_adv, bounds) - x, "linf")
    assert (plain > eps * 1.01).all()  # the case of the issue: 26/255 at eps 25.5/255
    x_q = quantize_in_ball(x_adv, x, bounds, eps, "linf")
    assert (flat_norm(x_q - x, "linf") <= eps + NOISE * (hi - lo)).all()
    assert not outside_ball(x_q, x, eps, "linf", bounds).any()
    _assert_one_of_the_two_nearest_levels(x_q, x_adv, bounds)
    # Rounded toward the clean image: 25 levels away from it, the sign kept.
    assert torch.allclose((_levels(x_q, bounds) - _levels(x, bounds)).abs(), torch.full(x.shape, 25.0,
                                                                                          dtype=torch.float64),
                          atol=1e-3)
    assert torch.equal((x_q - x).sign(), signs)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_linf_rounding_is_plain_rounding_where_that_stays_inside(bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    x = _on_levels(8, bounds)
    g = torch.Generator().manual_seed(2)
    eps = 8 / 255 * (hi - lo)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps * 0.9).clamp(lo, hi)
    assert torch.equal(quantize_in_ball(x_adv, x, bounds, eps, "linf"), quantize(x_adv, bounds))
    # eps a whole number of levels: the level on the ball's edge is inside it.
    edge = (x + eps).clamp(lo, hi)
    x_q = quantize_in_ball(edge, x, bounds, eps, "linf")
    assert torch.equal(x_q, quantize(edge, bounds))


@pytest.mark.parametrize("bounds", BOUNDS)
def test_l2_rounding_stays_inside_the_ball_where_plain_rounding_leaves_it(
    bounds: tuple[float, float],
) -> None:
    lo, hi = bounds
    x = _on_levels(32, bounds, seed=3)
    g = torch.Generator().manual_seed(4)
    eps = 0.5 * (hi - lo)
    # Small changes spread over every value, projected onto the sphere, as PGD L2 returns them
    # (inside the box: values near its edges move inward).
    direction = torch.randn(x.shape, generator=g)
    direction = torch.where(x < (lo + hi) / 2, direction.abs(), -direction.abs())
    delta = direction / flat_norm(direction, "l2").view(-1, 1, 1, 1) * eps
    x_adv = (x + delta).clamp(lo, hi)
    assert torch.allclose(flat_norm(x_adv - x, "l2"), torch.full((32,), eps), rtol=1e-5)
    plain = flat_norm(quantize(x_adv, bounds) - x, "l2")
    assert (plain > eps * (1 + 1e-4)).sum() >= 8  # rounding noise adds to the norm
    x_q = quantize_in_ball(x_adv, x, bounds, eps, "l2")
    assert (flat_norm(x_q - x, "l2") <= eps * (1 + NOISE)).all()
    assert not outside_ball(x_q, x, eps, "l2", bounds).any()
    _assert_one_of_the_two_nearest_levels(x_q, x_adv, bounds)
    # Only values that rounded away from the clean image changed, and only in the examples that left
    # the ball; examples that stayed inside are plainly rounded.
    inside = plain <= eps * (1 + 1e-7)
    assert torch.equal(x_q[inside], quantize(x_adv, bounds)[inside])
    moved = x_q != quantize(x_adv, bounds)
    assert ((x_q - x).abs()[moved] < (quantize(x_adv, bounds) - x).abs()[moved]).all()


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_clean_image_on_the_levels_is_unchanged(bounds: tuple[float, float], norm: str) -> None:
    x = _on_levels(8, bounds, seed=5)
    assert torch.equal(quantize(x, bounds), x)
    assert torch.equal(quantize_in_ball(x, x, bounds, 0.01 * (bounds[1] - bounds[0]), norm), x)  # type: ignore[arg-type]


def test_a_ball_thinner_than_a_level_off_the_levels_is_reported() -> None:
    x = torch.full((1, 1, 2, 2), 0.3 / 255)  # 0.3 levels: no level within 0.1 levels of it
    x_adv = x + 0.1 / 255
    x_q = quantize_in_ball(x_adv, x, (0.0, 1.0), 0.1 / 255, "linf")
    assert torch.equal(x_q, torch.zeros_like(x))  # the level nearer the clean image
    assert outside_ball(x_q, x, 0.1 / 255, "linf", (0.0, 1.0)).all()


def test_the_ball_of_an_attack() -> None:
    assert attack_ball(FGSMParams(name="fgsm", eps=0.1)) == (0.1, "linf")
    assert attack_ball(PGDParams(name="pgd", norm="l2", eps=1.5)) == (1.5, "l2")
    assert attack_ball(DeepFoolParams(name="deepfool")) is None  # minimal attacks have no ball


# --- the attack job --------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    context = make_context(WorkerSettings(var_dir=tmp_path / "var", device="cpu"))
    install_context(context)
    yield context
    install_context(make_context(WorkerSettings(var_dir=tmp_path / "other", device="cpu")))


def test_the_attack_jobs_quantized_examples_stay_inside_the_ball(ctx: Context) -> None:
    x, y = fmnist_test(16)
    buffer = io.BytesIO()
    np.savez(buffer, x=x.numpy(), y=y.numpy())
    ctx.store.put("inputs/q.npz", buffer.getvalue())
    job = AttackJob(job_id="q", team="t", model="fmnist-cnn", attack=FGSMParams(name="fgsm", eps=0.1),
                    inputs=InputRef(kind="blob", n=16, key="inputs/q.npz"), seed=0, batch_size=16)
    scores = _run_attack(job, None)["scores"]
    quantized = scores["quantized"]
    assert quantized["successes"] > 0
    assert quantized["ball"] == {"norm": "linf", "eps": 0.1, "outside": 0}
    # Plain rounding put every changed value at 26/255 = 0.10196.
    assert quantized["perturbation"]["linf"]["mean"] <= 0.1 + 1e-6
    assert quantized["perturbation"]["linf"]["median"] <= 0.1 + 1e-6
    assert scores["perturbation"]["linf"]["mean"] <= 0.1 + 1e-6
