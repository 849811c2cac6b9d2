"""JSMA: the kernel contract, the pair search against brute force, strength on fmnist-cnn."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import pytest
import torch
from torch import nn

import workers.attacks.jsma as jsma_module
from models.datasets import load_split
from tests.unit.support import hosted
from workers.attacks.base import goal_reached
from workers.attacks.jsma import JSMASpec, jsma
from workers.classifier import Classifier

SHAPE = (1, 6, 6)
CLASSES = 4
BOUNDS = (-1.0, 2.0)  # not [0, 1]: theta is a fraction of this range
Space = Literal["probabilities", "logits"]
SPACES: list[Space] = ["probabilities", "logits"]


class Scaled(nn.Module):
    """Multiplies the logits: a large factor saturates the softmax, as defensive distillation does."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


def tiny_model(seed: int = 0, scale: float = 1.0) -> Classifier:
    torch.manual_seed(seed)
    module: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    module = Scaled(module, scale).double().eval()
    module.requires_grad_(False)
    return Classifier(module, CLASSES, SHAPE, BOUNDS, "tiny")


def batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = BOUNDS[0] + (BOUNDS[1] - BOUNDS[0]) * torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    return x, tiny_model().logits(x).argmax(1)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("theta", [1.0, -1.0, 0.3])
def test_bounds_budget_direction_and_success(space: Space, targeted: bool, theta: float) -> None:
    x, y = batch()
    model = tiny_model()
    targets = (y + 1) % CLASSES if targeted else None
    spec = JSMASpec(theta=theta, gamma=0.5, space=space, targeted=targeted)
    out = jsma(model, x, y, spec, targets=targets)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    delta = (out.x_adv - x).flatten(1)
    l0 = (delta != 0).sum(1)
    assert (l0 <= math.floor(0.5 * 36)).all()
    assert (delta * theta >= 0).all()  # features only move in theta's direction
    assert torch.equal(out.success, goal_reached(model.logits(out.x_adv), y, targets, targeted))
    assert out.success.float().mean() >= (0.6 if targeted else 0.9)
    per_iter = 1 if space == "probabilities" else 2
    assert (out.gradients % per_iter == 0).all() and (out.gradients >= per_iter).all()
    if abs(theta) == 1.0:
        # Each pair saturates two new features: L0 is twice the number of VJP rounds, less one
        # round when the goal was seen in the loop (that round chose no pair).
        rounds = out.gradients // per_iter
        assert ((l0 == 2 * rounds) | (l0 == 2 * rounds - 2)).all()


def test_same_seed_same_bits() -> None:
    x, y = batch()
    spec = JSMASpec(gamma=0.5, space="logits")
    first = jsma(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(7))
    second = jsma(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.success, second.success)


@pytest.mark.parametrize("space", SPACES)
def test_sample_unaffected_by_the_others(space: Space) -> None:
    spec = JSMASpec(theta=0.5, gamma=0.5, space=space)
    x, y = batch(n=12)
    other_x, other_y = batch(n=12, seed=99)
    mixed_x, mixed_y = x.clone(), y.clone()
    mixed_x[4:], mixed_y[4:] = other_x[4:], other_y[4:]
    alone, mixed = jsma(tiny_model(), x, y, spec), jsma(tiny_model(), mixed_x, mixed_y, spec)
    assert torch.allclose(alone.x_adv[:4], mixed.x_adv[:4], atol=1e-9)
    assert torch.equal(alone.success[:4], mixed.success[:4])
    assert torch.equal(alone.gradients[:4], mixed.gradients[:4])


@pytest.mark.parametrize("targeted", [False, True])
def test_misclassified_inputs_are_returned_unchanged(targeted: bool) -> None:
    x, _ = batch()
    y = torch.arange(x.shape[0]) % CLASSES
    model = tiny_model()
    wrong = model.logits(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    targets = (y + 1) % CLASSES if targeted else None
    out = jsma(model, x, y, JSMASpec(gamma=0.5, targeted=targeted), targets=targets)
    assert torch.equal(out.x_adv[wrong], x[wrong])
    assert (out.gradients[wrong] == 0).all()
    assert torch.equal(out.success, goal_reached(model.logits(out.x_adv), y, targets, targeted))
    assert (out.x_adv[~wrong] != x[~wrong]).any()


def brute_force_pair(a: torch.Tensor, b: torch.Tensor, domain: torch.Tensor) -> tuple[int, int] | None:
    """The paper's saliency of a pair, by enumeration: max (a_p+a_q)*|b_p+b_q| with a > 0, b < 0."""
    best, pair = 0.0, None
    for p, q in itertools.permutations(domain.nonzero().squeeze(1).tolist(), 2):
        alpha, beta = float(a[p] + a[q]), float(b[p] + b[q])
        if alpha > 0 and beta < 0 and alpha * -beta > best:
            best, pair = alpha * -beta, (p, q)
    return pair


@pytest.mark.parametrize("opposite", [False, True])
def test_pair_search_matches_brute_force_in_chunks(monkeypatch: pytest.MonkeyPatch, opposite: bool) -> None:
    g = torch.Generator().manual_seed(5)
    n, d = 7, 12
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = -a if opposite else torch.randn(n, d, generator=g, dtype=torch.float64)
    domain = torch.rand(n, d, generator=g) > 0.3
    a[0] = -a[0].abs()  # row 0: no pair has a > 0
    b[1] *= 1e-30  # tiny derivatives (a saturated softmax) must not underflow to "no pair"
    a[1] *= 1e-30
    # Force chunks of 2 rows in the full pair search (and, with 4 candidates, prune for real).
    monkeypatch.setattr(jsma_module, "PAIR_MEMORY_BYTES", 2 * d * d * 8 * 2)
    monkeypatch.setattr(jsma_module, "CANDIDATES", 2)
    p, q, found = jsma_module._pair_choice(a, b, domain, opposite=opposite)
    for row in range(n):
        expected = brute_force_pair(a[row], b[row], domain[row])
        assert bool(found[row]) == (expected is not None)
        if expected is not None:
            assert {int(p[row]), int(q[row])} == set(expected)
    assert not found[0] and found[1] and found[2:].any()


def test_pruned_pair_search_equals_the_full_search() -> None:
    """On 784 features with heavy-tailed derivatives (as a CNN's), against all D^2 pairs."""
    g = torch.Generator().manual_seed(2)
    n, d = 6, 784
    a = torch.randn(n, d, generator=g) ** 3
    b = torch.randn(n, d, generator=g) ** 3 - 0.5 * a
    domain = torch.rand(n, d, generator=g) > 0.1
    alpha, beta = a[:, :, None] + a[:, None, :], b[:, :, None] + b[:, None, :]
    ok = (alpha > 0) & (beta < 0) & domain[:, :, None] & domain[:, None, :]
    ok &= ~torch.eye(d, dtype=torch.bool)
    flat = torch.where(ok, alpha * -beta, torch.zeros(())).flatten(1).argmax(dim=1)
    p, q, found = jsma_module._pair_choice(a, b, domain)
    assert found.all()
    for row in range(n):
        assert {int(p[row]), int(q[row])} == {int(flat[row]) // d, int(flat[row]) % d}


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("targeted", [False, True])
def test_one_iteration_moves_the_most_salient_pair(space: Space, targeted: bool) -> None:
    """gamma = 2 / D allows one pair: it must be the brute-force best pair of the full Jacobian."""
    x, y = batch(n=6)
    model = tiny_model()
    targets = (y + 2) % CLASSES if targeted else None
    out = jsma(model, x, y, JSMASpec(theta=0.5, gamma=2 / 36, space=space, targeted=targeted), targets=targets)
    raised = targets if targets is not None else y
    for i in range(x.shape[0]):
        def outputs(v: torch.Tensor) -> torch.Tensor:
            logits = model.module(v[None])[0]
            return logits.softmax(0) if space == "probabilities" else logits

        jac = torch.autograd.functional.jacobian(outputs, x[i]).flatten(1)  # (K, D)
        up = torch.zeros(CLASSES, dtype=torch.bool)
        up[int(raised[i])] = True
        if not targeted:
            up = ~up  # untargeted: raise every class but the true one
        a, b = jac[up].sum(0), jac[~up].sum(0)
        expected = brute_force_pair(a, b, x[i].flatten() < BOUNDS[1])
        moved = (out.x_adv[i] != x[i]).flatten().nonzero().squeeze(1).tolist()
        assert expected is not None and set(moved) == set(expected)


def test_saturated_softmax_defeats_the_probability_version_only() -> None:
    x, _ = batch()
    # Logit gaps above 745 / 1e6 give softmax outputs of exactly 0 or 1 in float64: zero derivatives.
    model = tiny_model(scale=1e6)
    y = model.logits(x).argmax(1)
    on_probabilities = jsma(model, x, y, JSMASpec(gamma=0.5, space="probabilities"))
    on_logits = jsma(model, x, y, JSMASpec(gamma=0.5, space="logits"))
    failed = ~on_probabilities.success
    assert failed.float().mean() >= 0.9
    # No admissible pair: the sample stops at once, unchanged, after one gradient call.
    assert torch.equal(on_probabilities.x_adv[failed], x[failed])
    assert (on_probabilities.gradients[failed] == 1).all()
    assert on_logits.success.float().mean() >= 0.9


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    x, y = load_split("fashion-mnist:test").slice(0, 96)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def test_untargeted_breaks_the_cnn_with_few_pixels(
        fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    correct = model.logits(x).argmax(1) == y
    out = jsma(model, x, y, JSMASpec())
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
    assert out.success[correct].float().mean() >= 0.95
    l0 = (out.x_adv != x).flatten(1).sum(1)
    assert (l0 <= 78).all()
    assert l0[out.success & correct].float().median() <= 20


def test_targeted_reaches_its_targets(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    x, y = x[:32], y[:32]
    correct = model.logits(x).argmax(1) == y
    targets = (y + 1) % 10
    out = jsma(model, x, y, JSMASpec(targeted=True), targets=targets)
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) == targets)
    assert out.success[correct].float().mean() >= 0.6
