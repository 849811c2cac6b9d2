"""Mathematical and strength checks of the kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.unit.support import fmnist_test, hosted
from workers.attacks.base import flat_norm, random_start
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.classifier import Classifier


def linear_model(classes: int = 5, features: int = 20) -> Classifier:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Flatten(), nn.Linear(features, classes)).double().eval()
    module.requires_grad_(False)
    # Wide bounds: the analytic distance assumes no clipping.
    return Classifier(module, classes, (1, 4, 5), (-1e3, 1e3), "linear")


def analytic_l2_distance(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    layer = model.module[1]
    w, b = layer.weight, layer.bias
    logits = x.flatten(1) @ w.T + b
    pred = logits.argmax(1)
    gaps = (logits - logits.gather(1, pred[:, None])).abs()
    dist = gaps / (w[None] - w[pred][:, None]).norm(dim=2).clamp_min(1e-30)
    dist[torch.arange(len(x)), pred] = float("inf")
    return dist.min(1).values


@pytest.mark.parametrize("overshoot", [0.0, 0.02])
def test_deepfool_finds_the_analytic_distance_on_a_linear_model(overshoot: float) -> None:
    model = linear_model()
    x = torch.randn(64, 1, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = model.logits(x).argmax(1)
    spec = DeepFoolSpec(norm="l2", overshoot=overshoot, candidates=5, first_step_scale=1.0)
    out = deepfool(model, x, y, spec)
    found = flat_norm(out.x_adv - x, "l2") / (1 + overshoot)
    expected = analytic_l2_distance(model, x)
    assert torch.allclose(found, expected, rtol=0.01)
    if overshoot > 0:
        assert out.success.all()
        assert (model.logits(out.x_adv).argmax(1) != y).all()
    # A linear model is solved in one step: one gradient per candidate, then the check.
    assert int(out.gradients.max()) <= 2 * 4


def test_damped_deepfool_converges_to_the_analytic_distance() -> None:
    # A damped first step (0.6) and full steps after it: on a linear model the second step lands on
    # the boundary, so the perturbation is at least the minimal distance and at most 2% above it.
    model = linear_model()
    x = torch.randn(64, 1, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = model.logits(x).argmax(1)
    out = deepfool(model, x, y, DeepFoolSpec(norm="l2", overshoot=0.02, candidates=5))
    found, expected = flat_norm(out.x_adv - x, "l2"), analytic_l2_distance(model, x)
    assert out.success.all()
    assert (found >= expected * (1 - 1e-9)).all()
    assert (found <= expected * 1.02 + 1e-9).all()
    # Two iterations: every candidate's gradient at the first, the nearest one's at the second.
    assert int(out.gradients.max()) <= 4 + 1


def test_deepfool_linf_finds_the_analytic_distance_on_a_linear_model() -> None:
    model = linear_model()
    x = torch.randn(32, 1, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = model.logits(x).argmax(1)
    out = deepfool(model, x, y, DeepFoolSpec(norm="linf", overshoot=0.0, candidates=5, first_step_scale=1.0))
    layer = model.module[1]
    logits = x.flatten(1) @ layer.weight.T + layer.bias
    gaps = (logits - logits.gather(1, y[:, None])).abs()
    dist = gaps / (layer.weight[None] - layer.weight[y][:, None]).abs().sum(dim=2)
    dist[torch.arange(len(x)), y] = float("inf")
    assert torch.allclose(flat_norm(out.x_adv - x, "linf"), dist.min(1).values, rtol=0.01)


def test_deepfool_refuses_targets() -> None:
    model = linear_model()
    x = torch.zeros(2, 1, 4, 5, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="untargeted"):
        deepfool(model, x, y, DeepFoolSpec(), targets=y)


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    return (hosted(), *fmnist_test(96))


def test_pgd_at_least_as_strong_as_fgsm(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]
                                        ) -> None:
    model, x, y = fmnist
    for eps in (0.02, 0.05):
        adv_fgsm = fgsm(model, x, y, FGSMSpec(eps=eps)).x_adv
        adv_pgd = pgd(model, x, y, PGDSpec(eps=eps, steps=10),
                      generator=torch.Generator().manual_seed(0)).x_adv
        acc_fgsm = (model.logits(adv_fgsm).argmax(1) == y).float().mean()
        acc_pgd = (model.logits(adv_pgd).argmax(1) == y).float().mean()
        assert acc_pgd <= acc_fgsm
    clean = (model.logits(x).argmax(1) == y).float().mean()
    assert clean > 0.85
    assert acc_pgd < 0.5  # eps 0.05 already breaks most of an undefended CNN


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 4.0)])
def test_targeted_pgd_hits_its_targets(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor],
                                       norm: str, eps: float) -> None:
    model, x, y = fmnist
    correct = model.logits(x).argmax(1) == y
    x, y = x[correct][:48], y[correct][:48]
    targets = (y + 3) % 10
    out = pgd(model, x, y, PGDSpec(eps=eps, norm=norm, steps=40, targeted=True),  # type: ignore[arg-type]
              targets=targets, generator=torch.Generator().manual_seed(0))
    hit = model.logits(out.x_adv).argmax(1) == targets
    assert hit.float().mean() >= 0.95
    assert torch.equal(hit, out.success)


def test_targeted_fgsm_moves_towards_the_target(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    targets = (y + 3) % 10
    out = fgsm(model, x, y, FGSMSpec(eps=0.1, targeted=True), targets=targets)
    before = model.logits(x).log_softmax(1).gather(1, targets[:, None])
    after = model.logits(out.x_adv).log_softmax(1).gather(1, targets[:, None])
    assert (after > before).float().mean() > 0.9


def test_deepfool_breaks_the_cnn_with_small_perturbations(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    out = deepfool(model, x, y, DeepFoolSpec())
    pred = model.logits(out.x_adv).argmax(1)
    correct = model.logits(x).argmax(1) == y
    assert ((pred != y) | ~correct).all()
    assert torch.equal(out.success, pred != y)
    assert flat_norm(out.x_adv - x, "l2")[correct].median() < 1.5


def test_l2_random_start_spreads_its_radius_over_the_ball() -> None:
    # A radius uniform in the ball's volume sits at eps * u ** (1 / 784), above 0.99 eps for almost
    # every draw, and that noise then takes part of the budget; the start's radius is uniform in
    # [0, eps] instead, in a uniformly random direction.
    x = torch.zeros(4000, 1, 28, 28)
    noise = random_start(x, 1.5, "l2", torch.Generator().manual_seed(0))
    radius = flat_norm(noise, "l2")
    assert (radius <= 1.5 + 1e-5).all()
    assert abs(float(radius.median()) - 0.75) < 0.05
    assert float((radius < 0.75).float().mean()) == pytest.approx(0.5, abs=0.03)
    directions = noise.flatten(1) / radius[:, None]
    assert float(directions.mean(dim=0).norm()) < 0.05  # no preferred direction
    linf = random_start(x, 0.1, "linf", torch.Generator().manual_seed(0))
    assert float(linf.abs().max()) <= 0.1 and float(linf.abs().mean()) == pytest.approx(0.05, abs=0.002)
