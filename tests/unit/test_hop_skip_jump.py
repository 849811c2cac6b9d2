"""HopSkipJump: contract on a tiny float64 model, budgets, starts, a linear model, strength on fmnist-cnn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.datasets import load_split
from tests.unit.support import BOUNDS, CLASSES, batch, hosted, tiny_model
from workers.attacks.base import AttackOutput, flat_norm, goal_reached
from workers.attacks.hop_skip_jump import INIT_TRIES, HopSkipJumpSpec, hop_skip_jump
from workers.classifier import Classifier

SPECS = {
    "l2": HopSkipJumpSpec(norm="l2", max_queries=400, steps=10),
    "linf": HopSkipJumpSpec(norm="linf", max_queries=400, steps=10),
    "l2-targeted": HopSkipJumpSpec(norm="l2", max_queries=400, steps=10, targeted=True),
    "l2-many-steps": HopSkipJumpSpec(norm="l2", max_queries=300, steps=40, initial_num_evals=20),
}


def attack(spec: HopSkipJumpSpec, x: torch.Tensor, y: torch.Tensor, seed: int = 0,
           model: Classifier | None = None, targets: torch.Tensor | None = None
           ) -> tuple[AttackOutput, Classifier]:
    model = model or tiny_model()
    if spec.targeted and targets is None:
        targets = (y + 1) % CLASSES
    out = hop_skip_jump(model, x, y, spec, targets=targets, generator=torch.Generator().manual_seed(seed))
    return out, model


@pytest.mark.parametrize("name", SPECS)
def test_contract(name: str) -> None:
    spec = SPECS[name]
    x, y = batch()
    targets = (y + 1) % CLASSES if spec.targeted else None
    out, model = attack(spec, x, y, targets=targets)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    reached = goal_reached(model.logits(out.x_adv), y, targets, spec.targeted)
    assert torch.equal(out.success, reached)
    assert out.success.any()
    # Failed samples are untouched.
    assert torch.equal(out.x_adv[~out.success], x[~out.success])
    # Decision-based: forward queries only, counted exactly, never past the budget.
    assert (out.gradients == 0).all() and model.gradients == 0
    assert (out.queries >= 1).all() and (out.queries <= spec.max_queries).all()
    assert model.queries == int(out.queries.sum()) + x.shape[0]  # + the check above
    # A minimal-perturbation attack spends (nearly) all of its budget on the samples it runs.
    assert (out.queries[out.success] > spec.max_queries - 40).all()


@pytest.mark.parametrize("name", ["l2", "linf"])
def test_same_seed_same_bits_and_samples_independent(name: str) -> None:
    spec = SPECS[name]
    x, y = batch(n=12)
    first, second = attack(spec, x, y, seed=7)[0], attack(spec, x, y, seed=7)[0]
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.queries, second.queries)
    assert not torch.equal(first.x_adv, attack(spec, x, y, seed=8)[0].x_adv)
    other_x, other_y = batch(n=12, seed=99)
    mixed_x, mixed_y = x.clone(), y.clone()
    mixed_x[4:], mixed_y[4:] = other_x[4:], other_y[4:]
    mixed = attack(spec, mixed_x, mixed_y, seed=7)[0]
    assert torch.allclose(first.x_adv[:4], mixed.x_adv[:4], atol=1e-9)
    assert torch.equal(first.success[:4], mixed.success[:4])
    assert torch.equal(first.queries[:4], mixed.queries[:4])


def test_misclassified_inputs_are_returned_unchanged() -> None:
    x, _ = batch()
    y = torch.arange(x.shape[0]) % CLASSES
    for spec in (SPECS["l2"], SPECS["l2-targeted"]):
        targets = (y + 1) % CLASSES if spec.targeted else None
        out, model = attack(spec, x, y, targets=targets)
        wrong = model.logits(x).argmax(1) != y
        assert wrong.any() and (~wrong).any()
        assert torch.equal(out.x_adv[wrong], x[wrong])
        assert (out.queries[wrong] == 1).all()
        assert torch.equal(out.success[wrong], goal_reached(model.logits(x), y, targets, spec.targeted)[wrong])


def test_more_queries_give_smaller_perturbations() -> None:
    x, y = batch()
    for norm in ("l2", "linf"):
        short = attack(HopSkipJumpSpec(norm=norm, max_queries=60), x, y)[0]  # type: ignore[arg-type]
        long = attack(HopSkipJumpSpec(norm=norm, max_queries=1500), x, y)[0]  # type: ignore[arg-type]
        assert short.success.all() and long.success.all()
        assert flat_norm(long.x_adv - x, norm).median() < 0.8 * flat_norm(short.x_adv - x, norm).median()  # type: ignore[arg-type]


def test_targets_nobody_reaches_leave_samples_unchanged() -> None:
    # Class 3 can never win: no input of the batch and no noise draw gives a start.
    model = tiny_model()
    model.module[3].bias[3] = -1e6
    x, _ = batch()
    y = model.logits(x).argmax(1)
    targets = torch.full_like(y, 3)
    out = hop_skip_jump(model, x, y, SPECS["l2-targeted"], targets=targets,
                        generator=torch.Generator().manual_seed(0))
    assert not out.success.any()
    assert torch.equal(out.x_adv, x)
    assert (out.queries == 1 + INIT_TRIES).all()


def test_targeted_starts_from_a_batch_input_of_the_target_class() -> None:
    model = tiny_model()
    x, y = batch(n=32)
    targets = y.roll(1)  # every target is the clean prediction of another input
    keep = targets != y
    x, y, targets = x[keep], y[keep], targets[keep]
    out = hop_skip_jump(model, x, y, HopSkipJumpSpec(max_queries=1, targeted=True), targets=targets,
                        generator=torch.Generator().manual_seed(0))
    # No query beyond the clean one: the start is an input the model already classified.
    assert (out.queries == 1).all() and out.success.all()
    assert (model.logits(out.x_adv).argmax(1) == targets).all()
    out = hop_skip_jump(model, x, y, HopSkipJumpSpec(max_queries=600, targeted=True), targets=targets,
                        generator=torch.Generator().manual_seed(0))
    assert out.success.all()
    assert (model.logits(out.x_adv).argmax(1) == targets).all()


def test_l2_distance_close_to_the_analytic_one_on_a_linear_model() -> None:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Flatten(), nn.Linear(20, 2)).double().eval()
    module.requires_grad_(False)
    model = Classifier(module, 2, (1, 4, 5), (-10.0, 10.0), "linear")
    x = torch.randn(24, 1, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = model.logits(x).argmax(1)
    out = hop_skip_jump(model, x, y, HopSkipJumpSpec(norm="l2", max_queries=1500),
                        generator=torch.Generator().manual_seed(0))
    assert out.success.all()
    layer = module[1]
    w = layer.weight[1] - layer.weight[0]
    b = layer.bias[1] - layer.bias[0]
    exact = (x.flatten(1) @ w + b).abs() / w.norm()
    found = flat_norm(out.x_adv - x, "l2")
    assert (found >= exact * (1 - 1e-6)).all()  # nothing adversarial lies closer than the boundary
    assert (found / exact).median() < 1.05


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    images, labels = load_split("fashion-mnist:test").slice(0, 40)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    correct = model.logits(x).argmax(1) == y
    return model, x[correct][:32], y[correct][:32]


def test_hop_skip_jump_finds_small_perturbations_on_the_cnn(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    start = hop_skip_jump(model, x, y, HopSkipJumpSpec(max_queries=120),
                          generator=torch.Generator().manual_seed(0))
    out = hop_skip_jump(model, x, y, HopSkipJumpSpec(max_queries=700),
                        generator=torch.Generator().manual_seed(0))
    assert out.success.all() and start.success.all()
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    l2, l2_start = flat_norm(out.x_adv - x, "l2"), flat_norm(start.x_adv - x, "l2")
    # The iterations shrink the blended-noise start by a large factor.
    assert l2.median() < 0.5 * l2_start.median()
    assert l2.median() < 2.0


def test_returned_points_keep_their_verdict_one_image_at_a_time(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    # Points on the boundary can flip with the batch composition (float noise); the back-off keeps a
    # margin, so the verdict of a batch of 1 is the kernel's.
    model, x, y = fmnist
    x, y = x[:16], y[:16]
    for norm in ("linf", "l2"):
        out = hop_skip_jump(model, x, y, HopSkipJumpSpec(norm=norm, max_queries=400),  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(0))
        alone = torch.cat([model.logits(xi).argmax(1) for xi in out.x_adv.split(1)])
        assert out.success.all() and (alone != y).all()
        top2 = model.logits(out.x_adv).topk(2, dim=1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-5).all()
