"""Square Attack: the contract on a tiny float64 model, the schedule and proposals, strength on fmnist-cnn."""

from __future__ import annotations

import pytest
import torch

from models.datasets import load_split
from tests.unit.support import BOUNDS, CLASSES, SHAPE, batch, hosted, tiny_model
from workers.attacks.base import AttackOutput, flat_norm, goal_reached
from workers.attacks.square import SquareSpec, _linf_proposal, p_schedule, square
from workers.classifier import Classifier

SPECS = {
    "linf": SquareSpec(eps=0.05, max_queries=200),
    "l2": SquareSpec(eps=0.3, norm="l2", max_queries=200),
    "linf-targeted": SquareSpec(eps=0.1, max_queries=200, targeted=True),
    "l2-targeted": SquareSpec(eps=0.5, norm="l2", max_queries=200, targeted=True),
    "linf-no-early-stop": SquareSpec(eps=0.05, max_queries=60, early_stop=False),
    "l2-no-early-stop": SquareSpec(eps=0.3, norm="l2", max_queries=60, early_stop=False),
}


def attack(spec: SquareSpec, x: torch.Tensor, y: torch.Tensor, seed: int = 0,
           model: Classifier | None = None) -> tuple[AttackOutput, torch.Tensor | None, Classifier]:
    model = model or tiny_model()
    targets = (y + 1) % CLASSES if spec.targeted else None
    out = square(model, x, y, spec, targets=targets, generator=torch.Generator().manual_seed(seed))
    return out, targets, model


@pytest.mark.parametrize("name", SPECS)
def test_contract(name: str) -> None:
    spec = SPECS[name]
    x, y = batch()
    out, targets, model = attack(spec, x, y)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    assert flat_norm(out.x_adv - x, spec.norm).max() <= spec.eps * (1 + 1e-9)
    # The kernel's success is the model's verdict on the returned tensor, and it did something.
    assert torch.equal(out.success, goal_reached(model.logits(out.x_adv), y, targets, spec.targeted))
    assert out.success.any()
    # Exact per-sample accounting: forward queries only, never past the budget.
    assert out.queries.dtype == torch.int64 and out.gradients.dtype == torch.int64
    assert (out.gradients == 0).all() and model.gradients == 0
    assert (out.queries >= 2).all() and (out.queries <= spec.max_queries).all()
    assert model.queries == int(out.queries.sum()) + x.shape[0]  # + the check above
    if spec.early_stop:
        # Successful samples stopped early; the others spent the whole budget.
        assert (out.queries[~out.success] == spec.max_queries).all()
        assert (out.queries[out.success] < spec.max_queries).all()
    else:
        assert (out.queries == spec.max_queries).all()


@pytest.mark.parametrize("name", SPECS)
def test_same_seed_same_bits_and_samples_independent(name: str) -> None:
    spec = SPECS[name]
    x, y = batch(n=12)
    first, second = attack(spec, x, y, seed=7)[0], attack(spec, x, y, seed=7)[0]
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.queries, second.queries)
    other = attack(spec, x, y, seed=8)[0]
    assert not torch.equal(first.x_adv, other.x_adv)
    other_x, other_y = batch(n=12, seed=99)
    mixed_x, mixed_y = x.clone(), y.clone()
    mixed_x[4:], mixed_y[4:] = other_x[4:], other_y[4:]
    mixed = attack(spec, mixed_x, mixed_y, seed=7)[0]
    assert torch.equal(first.x_adv[:4], mixed.x_adv[:4])
    assert torch.equal(first.success[:4], mixed.success[:4])
    assert torch.equal(first.queries[:4], mixed.queries[:4])


@pytest.mark.parametrize("name", ["linf", "l2-targeted"])
def test_misclassified_inputs_are_returned_unchanged(name: str) -> None:
    spec = SPECS[name]
    x, _ = batch()
    y = torch.arange(x.shape[0]) % CLASSES
    out, targets, model = attack(spec, x, y)
    wrong = model.logits(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    assert torch.equal(out.x_adv[wrong], x[wrong])
    assert (out.queries[wrong] == 1).all()
    assert torch.equal(out.success[wrong], goal_reached(model.logits(x), y, targets, spec.targeted)[wrong])


def test_l2_perturbation_uses_the_whole_budget_without_clipping() -> None:
    # With bounds far away nothing is clipped: every point the L2 attack proposes has norm eps.
    module = tiny_model().module
    model = Classifier(module, CLASSES, SHAPE, (-1e3, 1e3), "wide")
    x, y = batch()
    out = square(model, x, y, SquareSpec(eps=0.4, norm="l2", max_queries=30, early_stop=False),
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flat_norm(out.x_adv - x, "l2"), torch.full((x.shape[0],), 0.4, dtype=x.dtype))


def test_linf_start_and_moves_are_at_the_corners_of_the_ball() -> None:
    module = tiny_model().module
    model = Classifier(module, CLASSES, SHAPE, (-1e3, 1e3), "wide")
    x, y = batch()
    out = square(model, x, y, SquareSpec(eps=0.05, max_queries=40, early_stop=False),
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose((out.x_adv - x).abs(), torch.full_like(x, 0.05))


def test_p_schedule_halves_at_the_papers_fractions() -> None:
    budget = 10000
    assert p_schedule(0.8, 0, budget) == 0.8 and p_schedule(0.8, 10, budget) == 0.8
    assert p_schedule(0.8, 11, budget) == 0.4
    assert p_schedule(0.8, 201, budget) == 0.8 / 8
    assert p_schedule(0.8, 9999, budget) == 0.8 / 512
    # Rescaled to the budget: the same fractions of 1000 queries.
    assert p_schedule(0.8, 101, 1000) == p_schedule(0.8, 1010, 10000) == 0.8 / 32


def test_linf_proposal_always_changes_the_image() -> None:
    # 1x1 squares on a one-channel image: half of the raw draws would be no-ops.
    model = tiny_model()
    x, _ = batch(n=64)
    eps = 0.05
    g = torch.Generator().manual_seed(0)
    signs = (torch.rand(x.shape, generator=g, dtype=x.dtype) > 0.5).to(x.dtype) * 2 - 1
    x_cur = (x + eps * signs).clamp(0, 1)
    idx = torch.arange(x.shape[0])
    for _ in range(20):
        new = _linf_proposal(model, x, x, x_cur, idx, eps, 1e-3, g)
        changed = (new != x_cur).flatten(1).sum(1)
        assert (changed == 1).all()


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    x, y = load_split("fashion-mnist:test").slice(0, 64)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    correct = model.logits(x).argmax(1) == y
    return model, x[correct], y[correct]


def test_square_breaks_the_cnn_where_random_corners_do_not(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    eps = 0.1
    out = square(model, x, y, SquareSpec(eps=eps, max_queries=300), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
    assert out.success.float().mean() >= 0.8
    assert flat_norm(out.x_adv - x, "linf").max() <= eps + 1e-6
    # Random search is doing the work: a random corner of the ball rarely fools the model.
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    noisy = (x + eps * signs).clamp(0, 1)
    assert (model.logits(noisy).argmax(1) != y).float().mean() < 0.5
    # Early stop: the successful samples took far fewer queries than the budget.
    assert out.queries[out.success].float().median() < 150


def test_square_l2_and_targeted_on_the_cnn(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    x, y = x[:24], y[:24]
    out = square(model, x, y, SquareSpec(eps=2.0, norm="l2", max_queries=200),
                 generator=torch.Generator().manual_seed(0))
    assert out.success.float().mean() >= 0.55
    assert flat_norm(out.x_adv - x, "l2").max() <= 2.0 * (1 + 1e-5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy = (x + 2.0 * noise / flat_norm(noise, "l2")[:, None, None, None]).clamp(0, 1)
    assert (model.logits(noisy).argmax(1) != y).float().mean() < 0.2
    targets = (y + 1) % 10
    out = square(model, x, y, SquareSpec(eps=0.2, max_queries=200, targeted=True), targets=targets,
                 generator=torch.Generator().manual_seed(0))
    hit = model.logits(out.x_adv).argmax(1) == targets
    assert torch.equal(hit, out.success)
    assert hit.float().mean() >= 0.5
