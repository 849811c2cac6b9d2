"""AdvGAN: the bound by construction, the networks, seeded training in both modes, and the attack kernel.

Training runs on a tiny seeded float32 perceptron over 1x8x8 inputs (the conv generator halves the
resolution twice), a few epochs on 256 images: a few seconds on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch
from torch import nn

from workers.attacks.advgan import AdvGANAttackSpec, advgan
from workers.attacks.base import goal_reached
from workers.classifier import Classifier
from workers.generators.advgan import (
    AdvGANResult,
    AdvGANSpec,
    Progress,
    build_discriminator,
    build_generator,
    margin_loss,
    perturb,
    train_advgan,
)

SHAPE = (1, 8, 8)
CLASSES = 4
BOUNDS = (0.0, 1.0)
EPS = 0.1
TRAIN: dict[str, Any] = {"epochs": 5, "batch_size": 32, "lr": 3e-3}


def perceptron(seed: int = 0) -> nn.Module:
    """A two-layer perceptron with weights drawn from ``seed``; the first bias centres the inputs so
    that the four classes are about equally frequent on uniform inputs."""
    g = torch.Generator().manual_seed(seed)
    hidden, out = nn.Linear(64, 32), nn.Linear(32, CLASSES)
    with torch.no_grad():
        for param in (hidden.weight, out.weight):
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        hidden.bias.copy_(-0.5 * hidden.weight.sum(dim=1))
        out.bias.zero_()
    return nn.Sequential(nn.Flatten(), hidden, nn.Tanh(), out)


def target_model() -> Classifier:
    module = perceptron().eval()
    module.requires_grad_(False)
    return Classifier(module, CLASSES, SHAPE, BOUNDS, "mlp")


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform inputs labelled with the target model's predictions (all correctly classified)."""
    x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return x, target_model().logits(x).argmax(1)


def surrogate(seed: int = 5) -> nn.Module:
    return perceptron(seed).train()


def untrained_generator(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_generator(SHAPE).eval()


def train(spec: AdvGANSpec, n: int = 256, seed: int = 0, model: Classifier | None = None,
          **kwargs: Any) -> tuple[AdvGANResult, Classifier]:
    model = model or target_model()
    x, y = data(n, seed=1)
    result = train_advgan(model, x, y, spec, generator=torch.Generator().manual_seed(seed), **kwargs)
    return result, model


def success_rate(gen: nn.Module, target: int | None = None) -> float:
    """The kernel's success on held-out inputs; targeted: over the inputs not already of the target."""
    model = target_model()
    x, y = data(256, seed=2)
    targets = torch.full_like(y, target) if target is not None else None
    out = advgan(model, x, y, AdvGANAttackSpec(gen, EPS, targeted=target is not None), targets=targets)
    assert out.success is not None
    keep = y != target if target is not None else torch.ones_like(y, dtype=torch.bool)
    return out.success[keep].float().mean().item()


@pytest.fixture(scope="module")
def semi_white_box() -> tuple[AdvGANResult, Classifier]:
    return train(AdvGANSpec(eps=EPS, **TRAIN))


class Huge(nn.Module):
    """A stand-in generator whose output is ``scale`` times fixed noise: tanh saturates at +-1."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        return self.scale * noise


@pytest.mark.parametrize("scale", [0.0, 1.0, 1e6, -1e6])
def test_perturb_stays_in_the_ball_and_the_box(scale: float) -> None:
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    x[:4] = 0.0  # on the box's faces: clipping must not push these outside the ball
    x[4:8] = 1.0
    gen = Huge(scale)
    x_adv = perturb(gen, x, EPS, BOUNDS)
    delta = (x_adv - x).abs()
    assert delta.max() <= EPS * (1 + 1e-6)
    assert x_adv.min() >= BOUNDS[0] and x_adv.max() <= BOUNDS[1]
    if abs(scale) > 1:
        # Saturated: interior coordinates move by the whole eps.
        assert torch.allclose(delta[8:][(x[8:] > EPS) & (x[8:] < 1 - EPS)], torch.tensor(EPS), atol=1e-6)
    # Differentiable in the generator's weights, and no graph without gradients.
    x_adv.sum().backward()
    assert gen.scale.grad is not None
    with torch.no_grad():
        assert perturb(gen, x, EPS, BOUNDS).grad_fn is None


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 6, 6), (3, 12, 20)])
def test_networks_keep_the_shape_and_samples_independent(shape: tuple[int, int, int]) -> None:
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    gen, disc = build_generator(shape).eval(), build_discriminator(shape).eval()
    with torch.no_grad():
        out, scores = gen(x), disc(x)
        assert out.shape == x.shape and scores.shape == (5,)
        # Instance norm: a sample's output does not depend on the rest of the batch.
        assert torch.allclose(gen(x[:2]), out[:2], atol=1e-6)
        assert torch.allclose(disc(x[:2]), scores[:2], atol=1e-6)


def test_margin_loss_matches_its_formula() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    labels = torch.tensor([0, 1])
    assert torch.equal(margin_loss(logits, labels, targeted=False, kappa=10.0), torch.tensor([2.0, -3.0]))
    assert torch.equal(margin_loss(logits, labels, targeted=True, kappa=10.0), torch.tensor([-2.0, 3.0]))
    assert torch.equal(margin_loss(logits, labels, targeted=False, kappa=1.0), torch.tensor([2.0, -1.0]))


@pytest.mark.parametrize("mode", ["semi-white-box", "black-box"])
def test_same_seed_same_bits_and_the_global_rng_untouched(mode: Literal["semi-white-box", "black-box"]) -> None:
    spec = AdvGANSpec(eps=EPS, epochs=1, batch_size=16, mode=mode)

    def weights(seed: int) -> dict[str, torch.Tensor]:
        model, (x, y) = target_model(), data(48, seed=1)
        student = surrogate() if mode == "black-box" else None
        state = torch.get_rng_state()
        result = train_advgan(model, x, y, spec, generator=torch.Generator().manual_seed(seed),
                              surrogate=student)
        assert torch.equal(torch.get_rng_state(), state)
        return result.generator.state_dict()

    first, second, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_semi_white_box_training_fools_the_target(semi_white_box: tuple[AdvGANResult, Classifier]) -> None:
    result, model = semi_white_box
    trained, untrained = success_rate(result.generator), success_rate(untrained_generator())
    assert untrained < 0.15 and trained > untrained + 0.25, (trained, untrained)
    # Every image forwarded through the target is counted, each with its gradient.
    assert result.steps == 5 * 8 and result.surrogate is None
    assert result.queries == model.queries == model.gradients == 5 * 256
    # The target is left as it was: eval mode, frozen, no gradient stored; the generator frozen.
    assert not model.module.training and not any(p.requires_grad for p in model.module.parameters())
    assert all(p.grad is None for p in model.module.parameters())
    assert not result.generator.training and not any(p.requires_grad for p in result.generator.parameters())


def test_targeted_training_hits_the_target() -> None:
    result, _ = train(AdvGANSpec(eps=EPS, targeted=True, target=1, **TRAIN))
    trained, untrained = success_rate(result.generator, target=1), success_rate(untrained_generator(), target=1)
    assert trained > untrained + 0.4, (trained, untrained)


class QueryOnly(Classifier):
    """A classifier that refuses gradients: black-box training may only call ``logits``."""

    def value_and_grad(self, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        raise AssertionError("black-box training asked for a gradient")

    def vjp_batch(self, x: torch.Tensor, cotangents: torch.Tensor) -> Any:
        raise AssertionError("black-box training asked for a vector-Jacobian product")


class NoGrad(nn.Module):
    """Wraps the target module and fails if it is ever run with gradients enabled."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "black-box training ran the target with gradients"
        return self.inner(x)


def test_black_box_training_only_queries_and_counts_them() -> None:
    model = QueryOnly(NoGrad(target_model().module), CLASSES, SHAPE, BOUNDS, "query-only")
    spec = AdvGANSpec(eps=EPS, mode="black-box", surrogate_lr=1e-2, distill_steps=3, **TRAIN)
    result, _ = train(spec, model=model, surrogate=surrogate())
    # One pass over the clean inputs, then the perturbed batch at every step.
    assert result.queries == model.queries == 256 * (1 + 5)
    assert model.gradients == 0
    assert result.surrogate is not None and not result.surrogate.training
    trained, untrained = success_rate(result.generator), success_rate(untrained_generator())
    assert trained > untrained + 0.2, (trained, untrained)


def test_progress_is_reported_and_its_exceptions_propagate() -> None:
    reports: list[Progress] = []
    spec = AdvGANSpec(eps=EPS, epochs=2, batch_size=16)
    result, model = train(spec, n=48, on_progress=reports.append, every=2)
    # Steps 2, 3 (end of epoch 1), 4, 6 (end of epoch 2).
    assert [(p.epoch, p.batch) for p in reports] == [(1, 2), (1, 3), (2, 1), (2, 3)]
    assert all(p.epochs == 2 and p.batches == 3 and 0 <= p.success <= 1 for p in reports)
    assert reports[-1].queries == result.queries == 96 and result.steps == 6

    class Canceled(Exception):
        pass

    calls: list[Progress] = []

    def cancel(progress: Progress) -> None:
        calls.append(progress)
        raise Canceled

    with pytest.raises(Canceled):
        train(spec, n=48, on_progress=cancel, every=1)
    assert len(calls) == 1


@pytest.mark.parametrize("targeted", [False, True])
def test_kernel_contract(semi_white_box: tuple[AdvGANResult, Classifier], targeted: bool) -> None:
    model = target_model()
    x, _ = data(32, seed=3)
    y = torch.arange(32) % CLASSES  # some inputs misclassified to start with
    targets = (y + 1) % CLASSES if targeted else None
    gen = semi_white_box[0].generator
    out = advgan(model, x, y, AdvGANAttackSpec(gen, EPS, targeted=targeted), targets=targets)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert (out.x_adv - x).abs().max() <= EPS * (1 + 1e-6)
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    wrong = model.logits(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    assert torch.equal(out.x_adv[wrong], x[wrong])
    assert not torch.equal(out.x_adv[~wrong], x[~wrong])
    assert out.success is not None
    assert torch.equal(out.success, goal_reached(model.logits(out.x_adv), y, targets, targeted))
    # The clean check for every input, one more query for the attacked ones, never a gradient.
    assert torch.equal(out.queries, torch.where(wrong, 1, 2))
    assert (out.gradients == 0).all() and model.gradients == 0
    assert model.queries == int(out.queries.sum()) + 2 * 32  # + the two checks above


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targeted": True}, "target class exactly when targeted"),
        ({"target": 1}, "target class exactly when targeted"),
        ({"mode": "black-box"}, "surrogate module exactly in black-box mode"),
        ({"targeted": True, "target": CLASSES}, "target class in"),
        ({"eps": 0.0}, "eps > 0"),
    ],
)
def test_invalid_arguments_say_what_was_expected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(AdvGANSpec(**{"eps": EPS, "epochs": 1, **kwargs}), n=8)
