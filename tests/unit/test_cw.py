"""Carlini & Wagner L2: the kernel contract, the analytic distance on a linear model, strength on fmnist-cnn."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from models.datasets import load_split
from tests.unit.support import hosted
from workers.attacks.base import flat_norm, goal_reached
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.classifier import Classifier

SHAPE = (1, 6, 6)
CLASSES = 4
BOUNDS = (-1.0, 2.0)  # not [0, 1]: the tanh change of variables must follow the model's bounds
FAST = CarliniWagnerL2Spec(binary_search_steps=4, max_iter=30, learning_rate=0.05, initial_const=0.1)


def tiny_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    module = module.double().eval()
    module.requires_grad_(False)
    return Classifier(module, CLASSES, SHAPE, BOUNDS, "tiny")


def batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) * torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, tiny_model().logits(x).argmax(1)


@pytest.mark.parametrize("targeted", [False, True])
def test_in_bounds_successful_and_consistent(targeted: bool) -> None:
    x, y = batch()
    model = tiny_model()
    targets = (y + 1) % CLASSES if targeted else None
    spec = CarliniWagnerL2Spec(binary_search_steps=4, max_iter=30, learning_rate=0.05, initial_const=0.1,
                               targeted=targeted)
    out = carlini_wagner_l2(model, x, y, spec, targets=targets)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    assert out.success.dtype == torch.bool and out.success.shape == y.shape
    assert torch.equal(out.success, goal_reached(model.logits(out.x_adv), y, targets, targeted))
    assert out.success.float().mean() >= 0.9
    # Failures are returned unchanged.
    assert torch.equal(out.x_adv[~out.success], x[~out.success])
    assert out.queries.dtype == torch.int64 and out.gradients.dtype == torch.int64
    assert (out.gradients >= 1).all() and (out.queries == out.gradients + 2).all()
    assert (out.gradients <= spec.binary_search_steps * spec.max_iter).all()


def test_same_seed_same_bits() -> None:
    x, y = batch()
    first = carlini_wagner_l2(tiny_model(), x, y, FAST, generator=torch.Generator().manual_seed(7))
    second = carlini_wagner_l2(tiny_model(), x, y, FAST, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.success, second.success)
    assert torch.equal(first.gradients, second.gradients)


@pytest.mark.parametrize("abort_early", [True, False])
def test_sample_unaffected_by_the_others(abort_early: bool) -> None:
    spec = CarliniWagnerL2Spec(binary_search_steps=4, max_iter=30, learning_rate=0.05, initial_const=0.1,
                               abort_early=abort_early)
    x, y = batch(n=12)
    other_x, other_y = batch(n=12, seed=99)
    mixed_x, mixed_y = x.clone(), y.clone()
    mixed_x[4:], mixed_y[4:] = other_x[4:], other_y[4:]
    alone = carlini_wagner_l2(tiny_model(), x, y, spec)
    mixed = carlini_wagner_l2(tiny_model(), mixed_x, mixed_y, spec)
    assert torch.allclose(alone.x_adv[:4], mixed.x_adv[:4], atol=1e-9)
    assert torch.equal(alone.success[:4], mixed.success[:4])
    assert torch.equal(alone.gradients[:4], mixed.gradients[:4])
    # The others did abort at other times, so the test exercised a changing working set.
    if abort_early:
        assert len(set(mixed.gradients.tolist())) > 1


@pytest.mark.parametrize("targeted", [False, True])
def test_misclassified_inputs_are_returned_unchanged(targeted: bool) -> None:
    x, _ = batch()
    y = torch.arange(x.shape[0]) % CLASSES  # some inputs misclassified from the start
    model = tiny_model()
    wrong = model.logits(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    targets = (y + 1) % CLASSES if targeted else None
    out = carlini_wagner_l2(model, x, y, CarliniWagnerL2Spec(binary_search_steps=3, max_iter=20,
                                                              targeted=targeted), targets=targets)
    assert torch.equal(out.x_adv[wrong], x[wrong])
    assert torch.equal(out.success[wrong], goal_reached(model.logits(x[wrong]), y[wrong],
                                                        None if targets is None else targets[wrong], targeted))
    assert (out.gradients[wrong] == 0).all()


def test_confidence_is_a_logit_margin() -> None:
    x, y = batch()
    model = tiny_model()
    kappa = 0.5
    out = carlini_wagner_l2(model, x, y, CarliniWagnerL2Spec(binary_search_steps=6, max_iter=40,
                                                              learning_rate=0.05, confidence=kappa))
    assert out.success.float().mean() >= 0.9
    logits = model.logits(out.x_adv[out.success])
    own = logits.gather(1, y[out.success][:, None]).squeeze(1)
    others = logits.scatter(1, y[out.success][:, None], float("-inf")).amax(1)
    assert (others - own >= kappa - 1e-9).all()


def test_binary_search_lowers_the_distance() -> None:
    x, y = batch()
    model = tiny_model()
    # A large c: one step fools everything far from the boundary; bisection brings c down.
    once = carlini_wagner_l2(model, x, y, CarliniWagnerL2Spec(binary_search_steps=1, max_iter=60,
                                                               learning_rate=0.05, initial_const=100.0))
    searched = carlini_wagner_l2(model, x, y, CarliniWagnerL2Spec(binary_search_steps=8, max_iter=60,
                                                                   learning_rate=0.05, initial_const=100.0))
    both = once.success & searched.success
    assert both.float().mean() > 0.8
    d_once, d_searched = flat_norm(once.x_adv - x, "l2")[both], flat_norm(searched.x_adv - x, "l2")[both]
    assert (d_searched <= d_once + 1e-12).all()  # the best is kept across search steps
    assert d_searched.median() < 0.7 * d_once.median()


def test_finds_the_analytic_distance_on_a_linear_model() -> None:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Flatten(), nn.Linear(20, 5)).double().eval()
    module.requires_grad_(False)
    # Bounds far from the inputs: the minimal distance is the one to the nearest hyperplane.
    model = Classifier(module, 5, (1, 4, 5), (-6.0, 6.0), "linear")
    x = 0.3 * torch.randn(32, 1, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = model.logits(x).argmax(1)
    # c weighs the distance measured in units of the bounds' range (12 here): 1 / 144 is the c = 1
    # of a distance in input units.
    out = carlini_wagner_l2(model, x, y, CarliniWagnerL2Spec(binary_search_steps=9, max_iter=200,
                                                              learning_rate=0.005, initial_const=1.0 / 144))
    layer = module[1]
    logits = x.flatten(1) @ layer.weight.T + layer.bias
    gaps = logits.gather(1, y[:, None]) - logits
    dist = gaps / (layer.weight[y][:, None] - layer.weight[None]).norm(dim=2)
    dist[torch.arange(len(x)), y] = float("inf")
    expected = dist.min(1).values
    found = flat_norm(out.x_adv - x, "l2")
    assert out.success.all()
    assert (found >= expected * (1 - 1e-6)).all()  # nothing beats the closed form
    assert (found / expected).median() < 1.02 and (found / expected).max() < 1.25


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    x, y = load_split("fashion-mnist:test").slice(0, 48)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def test_breaks_the_cnn_with_small_l2(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    correct = model.logits(x).argmax(1) == y
    spec = CarliniWagnerL2Spec(binary_search_steps=6, max_iter=40, learning_rate=0.05, initial_const=0.1)
    out = carlini_wagner_l2(model, x, y, spec)
    pred = model.logits(out.x_adv).argmax(1)
    assert torch.equal(out.success, pred != y)
    assert out.success[correct].float().mean() >= 0.95
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    # DeepFool needs about 0.6 on this model; C&W is a minimal-perturbation attack too.
    assert flat_norm(out.x_adv - x, "l2")[out.success & correct].median() < 0.9


def test_a_failed_search_step_is_continued_not_restarted() -> None:
    # Class 1 needs every pixel above about 0.9, from 0.5: 1.1 in tanh space. Adam moves about
    # learning_rate per iteration, so one search step of 20 iterations gets no further than 0.6
    # from x, whatever c is; only search steps that go on from where the last one stopped get there.
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        module[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
        module[1].bias.copy_(torch.tensor([0.0, -3.6]))
    module.requires_grad_(False)
    model = Classifier(module, 2, (1, 2, 2), (0.0, 1.0), "far")
    x = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.int64)
    spec = CarliniWagnerL2Spec(binary_search_steps=9, max_iter=20, learning_rate=0.01, initial_const=100.0,
                               abort_early=False)
    restarted = carlini_wagner_l2(model, x, y, replace(spec, warm_start=False))
    continued = carlini_wagner_l2(model, x, y, spec)
    assert not restarted.success.any()
    assert torch.equal(restarted.x_adv, x)
    assert continued.success.all()
    assert (continued.x_adv.flatten(1).sum(dim=1) > 3.6).all()
    assert ((continued.x_adv >= 0) & (continued.x_adv <= 1)).all()
