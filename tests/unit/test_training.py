"""The training kernels of the defenses, on tiny seeded float64 models and synthetic 6x6 data (CPU)."""

from __future__ import annotations

import math
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.unit.support import BOUNDS, SHAPE
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.classifier import Classifier
from workers.defenses.training import Objective, Progress, TrainSpec, accuracy, soft_labels, train

FEATURES = SHAPE[0] * SHAPE[1] * SHAPE[2]
M = TypeVar("M", bound=nn.Module)


def prototypes(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one fixed random prototype per class, in ``BOUNDS``: separable, not trivially."""
    centres = torch.rand(classes, FEATURES, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    noise = (torch.rand(n, FEATURES, generator=g, dtype=torch.float64) - 0.5) * 0.6
    x = (0.2 + 0.6 * centres[y] + noise).clamp(*BOUNDS)
    return x.view(n, *SHAPE), y


def robust_and_fragile(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: pixel 0 carries the label with margin 0.3 (robust at eps 0.15); the other 35 carry
    it with margin 0.05 each (together predictive, each flipped by eps 0.15), as in Tsipras et al. 2019.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).double()[:, None]
    x = 0.5 + 0.05 * s + (torch.rand(n, FEATURES, generator=g, dtype=torch.float64) - 0.5) * 0.05
    x[:, :1] = 0.5 + 0.3 * s + (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5) * 0.1
    return x.view(n, *SHAPE), y


def mlp(seed: int = 0, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, classes)).double()


def linear(seed: int = 0, classes: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, classes)).double()


def fit(module: M, x: torch.Tensor, targets: torch.Tensor, spec: TrainSpec, seed: int = 0) -> M:
    train(module, x, targets, spec, bounds=BOUNDS, generator=torch.Generator().manual_seed(seed))
    return module


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


SMALL = TrainSpec(epochs=4, batch_size=32, lr=1e-2)


def test_standard_training_learns_a_separable_problem() -> None:
    x, y = prototypes(256, seed=0)
    x_test, y_test = prototypes(256, seed=1)
    module = mlp()
    before = accuracy(module, x_test, y_test)
    report = train(module, x, y, TrainSpec(epochs=10, batch_size=32, lr=1e-2), bounds=BOUNDS,
                   generator=torch.Generator().manual_seed(0))
    assert before < 0.5
    assert accuracy(module, x_test, y_test) >= 0.95
    assert report.final_train_accuracy >= 0.95
    assert report.final_loss < 0.5 * math.log(4)  # well below the loss of a uniform guess
    assert (report.epochs, report.steps) == (10, 10 * (256 // 32))
    assert report.seconds > 0


@pytest.mark.parametrize("objective", ["standard", "fgsm", "pgd"])
def test_same_seed_same_bits_other_seed_other_weights(objective: Objective) -> None:
    x, y = prototypes(96, seed=0)
    spec = TrainSpec(epochs=2, batch_size=32, lr=1e-2, objective=objective, eps=0.1, pgd_steps=3)
    first, again, other = (fit(mlp(), x, y, spec, seed=s) for s in (0, 0, 1))
    assert same_weights(first, again)
    assert not same_weights(first, other)
    assert not same_weights(first, mlp())  # it trained at all


def test_fgsm_objective_with_alpha_one_is_standard_training() -> None:
    x, y = prototypes(96, seed=0)
    standard = fit(mlp(), x, y, SMALL)
    clean_only = fit(mlp(), x, y, TrainSpec(epochs=4, batch_size=32, lr=1e-2, objective="fgsm", alpha=1.0))
    mixed = fit(mlp(), x, y, TrainSpec(epochs=4, batch_size=32, lr=1e-2, objective="fgsm", alpha=0.5))
    assert same_weights(standard, clean_only)
    assert not same_weights(standard, mixed)


def fgsm_accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    model = Classifier(module, 2, SHAPE, BOUNDS)
    x_adv = fgsm(model, x, y, FGSMSpec(eps=eps)).x_adv
    return accuracy(module, x_adv, y)


@pytest.mark.parametrize("objective", ["fgsm", "pgd"])
def test_adversarial_training_ignores_the_fragile_features(objective: Objective) -> None:
    # A linear model trained normally leans on the 35 weak pixels and FGSM at eps 0.15 flips them
    # all; trained against the adversary it must rely on the one pixel whose margin exceeds eps.
    eps = 0.15
    x, y = robust_and_fragile(512, seed=0)
    x_test, y_test = robust_and_fragile(512, seed=1)
    spec = TrainSpec(epochs=10, batch_size=64, lr=5e-2, eps=eps, pgd_steps=5)
    standard = fit(linear(), x, y, spec)
    robust = fit(linear(), x, y, TrainSpec(epochs=10, batch_size=64, lr=5e-2, eps=eps, pgd_steps=5,
                                           objective=objective))
    assert accuracy(standard, x_test, y_test) >= 0.95
    assert accuracy(robust, x_test, y_test) >= 0.95
    assert fgsm_accuracy(standard, x_test, y_test, eps) < 0.6
    assert fgsm_accuracy(robust, x_test, y_test, eps) >= 0.95
    layer = robust[1]
    assert isinstance(layer, nn.Linear)
    weights = layer.weight
    margin = (weights[1] - weights[0]).abs()
    assert margin[0] > margin[1:].sum()


class Spy(nn.Module):
    """A linear classifier that records, for each forward: train mode, input requires grad, input."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, classes)).double()
        self.calls: list[tuple[bool, bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.requires_grad, x.detach().clone()))
        return self.body(x)


def test_fgsm_objective_crafts_in_eval_mode_and_trains_on_clean_and_fgsm_points() -> None:
    x, y = prototypes(64, seed=0)
    eps = 0.05
    spy = Spy()
    fit(spy, x, y, TrainSpec(epochs=1, batch_size=32, lr=1e-2, objective="fgsm", eps=eps))
    # Per step: the crafting forward (eval, gradient w.r.t. the input), then clean and FGSM in train mode.
    assert [(training, grad) for training, grad, _ in spy.calls] == [(False, True), (True, False),
                                                                    (True, False)] * 2
    for step in range(2):
        crafted_on, clean, adv = (inputs for _, _, inputs in spy.calls[3 * step : 3 * step + 3])
        assert torch.equal(crafted_on, clean)
        moved = (adv - clean).abs()
        inside = (adv > BOUNDS[0]) & (adv < BOUNDS[1])
        assert torch.allclose(moved[inside], torch.full_like(moved[inside], eps))
        assert (moved <= eps + 1e-12).all() and adv.min() >= BOUNDS[0] and adv.max() <= BOUNDS[1]
        assert inside.float().mean() > 0.5
        assert (clean.flatten(1)[:, None] == x.flatten(1)[None]).all(dim=2).any(dim=1).all()


def test_pgd_objective_trains_on_points_in_the_ball_and_the_box_only() -> None:
    x, y = prototypes(64, seed=0)
    eps, steps = 0.1, 4
    spy = Spy()
    fit(spy, x, y, TrainSpec(epochs=1, batch_size=32, lr=1e-2, objective="pgd", eps=eps, pgd_steps=steps))
    modes = [(training, grad) for training, grad, _ in spy.calls]
    # Per step: `steps` crafting forwards (eval), one clean forward for the accuracy (eval, no
    # grad), one training forward (train) on the PGD points.
    assert modes == ([(False, True)] * steps + [(False, False), (True, False)]) * 2
    trained_on = torch.cat([inputs for training, _, inputs in spy.calls if training]).flatten(1)
    distance = (trained_on[:, None] - x.flatten(1)[None]).abs().amax(dim=2).min(dim=1).values
    assert (distance <= eps + 1e-12).all()
    assert (distance > eps / 2).all()  # not the clean points
    assert trained_on.min() >= BOUNDS[0] and trained_on.max() <= BOUNDS[1]


@pytest.mark.parametrize("objective", ["standard", "fgsm", "pgd"])
def test_one_hot_soft_labels_train_like_hard_labels(objective: Objective) -> None:
    x, y = prototypes(96, seed=0)
    spec = TrainSpec(epochs=3, batch_size=32, lr=1e-2, objective=objective, eps=0.05, pgd_steps=2,
                     temperature=3.0)
    hard = fit(mlp(), x, y, spec)
    soft = fit(mlp(), x, F.one_hot(y, 4).double(), spec)
    for p, q in zip(hard.parameters(), soft.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_soft_labels_are_the_tempered_softmax_of_the_teacher() -> None:
    x, _ = prototypes(50, seed=0)
    teacher = mlp().train()
    cold, warm = soft_labels(teacher, x, 1.0, batch_size=16), soft_labels(teacher, x, 10.0, batch_size=16)
    assert teacher.training
    assert torch.allclose(cold, F.softmax(teacher(x), dim=1))
    assert torch.allclose(warm.sum(dim=1), torch.ones(50, dtype=torch.float64))

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum(dim=1)

    assert (entropy(warm) > entropy(cold)).all()


def test_a_student_learns_the_teachers_soft_labels() -> None:
    x, y = prototypes(256, seed=0)
    x_test, _ = prototypes(256, seed=1)
    teacher = fit(mlp(), x, y, TrainSpec(epochs=10, batch_size=32, lr=1e-2, temperature=20.0))
    student = fit(mlp(seed=1), x, soft_labels(teacher, x, 20.0),
                  TrainSpec(epochs=10, batch_size=32, lr=1e-2, temperature=20.0))
    with torch.no_grad():
        assert accuracy(student, x_test, teacher(x_test).argmax(dim=1)) >= 0.95


def test_training_at_high_temperature_saturates_the_softmax_at_temperature_one() -> None:
    # Papernot et al. 2016: logits scale with the training temperature, so at test time (T = 1) the
    # softmax is close to one-hot and its input gradients vanish.
    x, y = prototypes(256, seed=0)
    cold = fit(mlp(), x, y, TrainSpec(epochs=10, batch_size=32, lr=1e-2, temperature=1.0))
    hot = fit(mlp(), x, y, TrainSpec(epochs=10, batch_size=32, lr=1e-2, temperature=20.0))
    with torch.no_grad():
        assert hot(x).abs().mean() > 1.5 * cold(x).abs().mean()
    assert soft_labels(hot, x, 1.0).amax(dim=1).mean() > soft_labels(cold, x, 1.0).amax(dim=1).mean()


def test_progress_reports_running_means_every_few_batches_and_at_epoch_end() -> None:
    x, y = prototypes(256, seed=0)
    seen: list[Progress] = []
    report = train(mlp(), x, y, TrainSpec(epochs=2, batch_size=32, lr=1e-2), bounds=BOUNDS,
                   generator=torch.Generator().manual_seed(0), on_progress=seen.append, every=3)
    assert [(p.epoch, p.batch) for p in seen] == [(1, 3), (1, 6), (1, 8), (2, 3), (2, 6), (2, 8)]
    assert all((p.epochs, p.batches) == (2, 8) for p in seen)
    assert all(0 < p.loss < 10 and 0 <= p.accuracy <= 1 for p in seen)
    assert all(p.accuracy * p.batch * 32 == round(p.accuracy * p.batch * 32) for p in seen)
    assert seen[-1].loss == report.final_loss
    assert seen[-1].accuracy == report.final_train_accuracy
    assert seen[-1].loss < seen[0].loss


class Canceled(Exception):
    pass


@pytest.mark.parametrize("was_training", [True, False])
def test_an_exception_from_on_progress_stops_training_and_propagates(was_training: bool) -> None:
    x, y = prototypes(256, seed=0)
    module = mlp().train(was_training)
    initial = [p.detach().clone() for p in module.parameters()]
    calls: list[Progress] = []

    def cancel(progress: Progress) -> None:
        calls.append(progress)
        if len(calls) == 2:
            raise Canceled

    with pytest.raises(Canceled):
        train(module, x, y, TrainSpec(epochs=3, batch_size=32, lr=1e-2), bounds=BOUNDS,
              generator=torch.Generator().manual_seed(0), on_progress=cancel, every=2)
    assert [(p.epoch, p.batch) for p in calls] == [(1, 2), (1, 4)]
    assert all(m.training is was_training for m in module.modules())
    assert any(not torch.equal(p, q) for p, q in zip(initial, module.parameters(), strict=True))


@pytest.mark.parametrize("objective", ["standard", "fgsm", "pgd"])
def test_every_submodules_mode_is_restored(objective: Objective) -> None:
    x, y = prototypes(64, seed=0)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.Tanh(),
                           nn.Dropout(0.1), nn.Linear(8, 4)).double()
    module.train()
    module[2].eval()  # the caller froze the BatchNorm statistics
    before = [m.training for m in module.modules()]
    spec = TrainSpec(epochs=1, batch_size=32, lr=1e-2, objective=objective, eps=0.05, pgd_steps=2)
    fit(module, x, y, spec)
    assert [m.training for m in module.modules()] == before
    accuracy(module, x, y)
    soft_labels(module, x, 2.0)
    assert [m.training for m in module.modules()] == before


def test_accuracy_counts_correct_predictions_over_chunks() -> None:
    x, y = prototypes(30, seed=0)
    module = mlp().train()
    with torch.no_grad():
        predicted = module.eval()(x).argmax(dim=1)
    module.train()
    labels = torch.where(torch.arange(30) < 17, predicted, (predicted + 1) % 4)
    assert accuracy(module, x, labels, batch_size=7) == 17 / 30
    assert module.training


def test_frozen_modules_small_data_and_bad_specs_are_refused() -> None:
    x, y = prototypes(16, seed=0)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="at least batch_size=32"):
        train(mlp(), x, y, TrainSpec(batch_size=32), bounds=BOUNDS, generator=generator)
    with pytest.raises(ValueError, match="require grad"):
        train(mlp().requires_grad_(False), x, y, TrainSpec(batch_size=8), bounds=BOUNDS, generator=generator)
    with pytest.raises(ValueError, match="alpha"):
        TrainSpec(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        TrainSpec(temperature=0.0)
    assert TrainSpec(eps=0.2, pgd_steps=10).step_size == pytest.approx(0.05)
    assert TrainSpec(eps=0.2, pgd_step_size=0.01).step_size == 0.01
