"""Ensembles: mean probabilities, majority vote with its tie-break, gradients, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.unit.support import batch, tiny_model
from workers.defenses.ensemble import Ensemble


class Fixed(nn.Module):
    """Returns the same logits ``(N, K)`` for any batch of ``N`` inputs."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.register_buffer("table", torch.tensor(logits, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.get_buffer("table")
        return table + 0 * x.flatten(1).sum(1, keepdim=True)


def test_identical_members_give_the_members_probabilities() -> None:
    member = tiny_model().module
    x, _ = batch(8)
    out = Ensemble([member, member, member], "mean-probabilities")(x)
    torch.testing.assert_close(out.softmax(1), member(x).softmax(1))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(8, dtype=torch.float64))


def test_mean_probabilities_average_the_members() -> None:
    a, b = tiny_model(0).module, tiny_model(1).module
    x, _ = batch(8)
    ensemble = Ensemble([a, b], "mean-probabilities")
    expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    torch.testing.assert_close(ensemble(x).exp(), expected)
    assert ensemble.differentiable
    assert len(list(ensemble.parameters())) == len(list(a.parameters())) * 2  # members are submodules


def test_mean_probabilities_stay_finite_under_saturation() -> None:
    members = [Fixed([[1000.0, 0.0, -1000.0]]), Fixed([[-1000.0, 1000.0, 0.0]])]
    out = Ensemble(members, "mean-probabilities")(torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))


def test_mean_probabilities_pass_the_gradient() -> None:
    a, b = tiny_model(0).module, tiny_model(1).module
    x, _ = batch(4)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(Ensemble([a, b], "mean-probabilities")(x)[:, 0].sum(), x)
    x_a = x.detach().requires_grad_(True)
    mean = (a(x_a).softmax(1) + b(x_a).softmax(1)) / 2
    (expected,) = torch.autograd.grad(mean[:, 0].log().sum(), x_a)
    torch.testing.assert_close(grad, expected)


def test_majority_vote_picks_the_majority() -> None:
    # Sample 0: two members vote class 2 with low confidence, one votes class 0 very confidently, so
    # mean probabilities pick 0 while the vote picks 2. Sample 1: all vote class 1.
    members = [
        Fixed([[0.0, 0.0, 0.1], [0.0, 5.0, 0.0]]),
        Fixed([[0.0, 0.0, 0.1], [0.0, 5.0, 0.0]]),
        Fixed([[20.0, 0.0, 0.0], [0.0, 5.0, 0.0]]),
    ]
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    vote = Ensemble(members, "majority-vote")
    out = vote(x)
    assert out.argmax(1).tolist() == [2, 1]
    assert Ensemble(members, "mean-probabilities")(x).argmax(1).tolist() == [0, 1]
    shares = torch.tensor([[0.0, 2 / 3], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.softmax(1)[:, 1:], shares, atol=1e-3, rtol=0)
    assert not vote.differentiable


def test_majority_vote_breaks_ties_by_mean_probability() -> None:
    # One vote each for classes 0 and 1; class 1's voter is more confident, class 2 gets no vote.
    members = [Fixed([[2.0, 1.0, 1.9]]), Fixed([[0.0, 6.0, 0.0]])]
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    out = Ensemble(members, "majority-vote")(x)
    assert out.argmax(1).tolist() == [1]
    assert out[0, 0] > out[0, 2]  # a vote always outweighs the tie-break
    swapped = Ensemble([Fixed([[6.0, 0.0, 0.0]]), Fixed([[1.0, 2.0, 1.9]])], "majority-vote")(x)
    assert swapped.argmax(1).tolist() == [0]


def test_majority_vote_gradient_is_zero_not_an_error() -> None:
    a, b, c = tiny_model(0).module, tiny_model(1).module, tiny_model(2).module
    x, _ = batch(4)
    x.requires_grad_(True)
    out = Ensemble([a, b, c], "majority-vote")(x)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="expected at least one ensemble member"):
        Ensemble([], "mean-probabilities")
    with pytest.raises(ValueError, match="expected combine in .*got 'median'"):
        Ensemble([nn.Identity()], "median")  # type: ignore[arg-type]
