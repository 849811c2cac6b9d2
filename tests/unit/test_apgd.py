"""APGD-CE / APGD-DLR / APGD-T: the kernel contract, the paper's schedule and loss, strength on fmnist-cnn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from models.datasets import load_split
from tests.unit.support import BOUNDS, CLASSES, SHAPE, batch, hosted, run, tiny_model
from workers.attacks import apgd as apgd_module
from workers.attacks.apgd import (
    APGDSpec,
    _check_step_size,
    _Walk,
    apgd,
    apgd_t,
    checkpoints,
    dlr_loss,
    sparse_compaction_points,
)
from workers.attacks.base import AttackOutput, flat_norm, goal_reached
from workers.attacks.pgd import PGDSpec, pgd
from workers.classifier import Classifier

Case = tuple[str, Callable[..., AttackOutput], Any, float, str]
CASES: list[Case] = [
    ("apgd-ce-linf", apgd, APGDSpec(eps=0.05, steps=10), 0.05, "linf"),
    ("apgd-dlr-l2", apgd, APGDSpec(eps=0.3, norm="l2", steps=10, loss="dlr"), 0.3, "l2"),
    ("apgd-ce-linf-restarts", apgd, APGDSpec(eps=0.03, steps=5, restarts=3), 0.03, "linf"),
    ("apgd-ce-linf-no-early-stop", apgd, APGDSpec(eps=0.05, steps=10, early_stop=False), 0.05, "linf"),
    ("apgd-ce-l2-targeted", apgd, APGDSpec(eps=0.5, norm="l2", steps=10, targeted=True), 0.5, "l2"),
    ("apgd-dlr-linf-targeted", apgd, APGDSpec(eps=0.1, steps=10, loss="dlr", targeted=True), 0.1, "linf"),
    ("apgd-t-linf", apgd_t, APGDSpec(eps=0.05, steps=10, n_target_classes=3), 0.05, "linf"),
    ("apgd-t-l2-no-early-stop", apgd_t, APGDSpec(eps=0.3, norm="l2", steps=8, early_stop=False), 0.3, "l2"),
    ("apgd-t-l2-targeted", apgd_t, APGDSpec(eps=0.5, norm="l2", steps=10, targeted=True), 0.5, "l2"),
]



@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_contract(case: Case) -> None:
    _, _, spec, eps, norm = case
    x, y = batch()
    out = run(case, x, y, seed=7)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-9)  # type: ignore[arg-type]
    assert out.success.dtype == torch.bool and out.success.shape == y.shape
    assert out.queries.dtype == torch.int64 and out.gradients.dtype == torch.int64
    assert (out.queries >= 2).all() and (out.gradients >= 1).all()
    # Never more than the budget: steps gradients per run (the last iterate is only evaluated).
    runs = spec.restarts * (1 if spec.targeted or case[1] is apgd else min(spec.n_target_classes, CLASSES - 1))
    assert out.gradients.max() <= spec.steps * runs
    # The kernel's success is what the returned tensor shows.
    targets = (y + 1) % CLASSES if spec.targeted else None
    assert torch.equal(out.success, goal_reached(tiny_model().logits(out.x_adv), y, targets, spec.targeted))
    again = run(case, x, y, seed=7)
    assert torch.equal(out.x_adv, again.x_adv) and torch.equal(out.success, again.success)
    assert torch.equal(out.gradients, again.gradients)
    if not spec.targeted:
        assert out.success.any()  # the attack does something on this model


def test_targeted_runs_hit_their_targets_on_the_tiny_model() -> None:
    x, y = batch(n=32)
    targets = (y + 1) % CLASSES
    for kernel in (apgd, apgd_t):
        out = kernel(tiny_model(), x, y, APGDSpec(eps=2.0, norm="l2", steps=20, loss="dlr", targeted=True),
                     targets=targets, generator=torch.Generator().manual_seed(0))
        assert out.success.float().mean() >= 0.9
        assert torch.equal(tiny_model().logits(out.x_adv).argmax(1) == targets, out.success)


def test_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 -> w_j = ceil(p_j * N_iter)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert checkpoints(1) == []


def test_dlr_loss_is_scale_and_shift_invariant_and_signs_the_margin() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    t = (y + 1 + torch.randint(0, 9, (64,), generator=g)) % 10
    for targets in (None, t):
        base = dlr_loss(logits, y, targets)
        assert torch.allclose(dlr_loss(3.7 * logits - 5.0, y, targets), base, rtol=1e-9)
    # Untargeted DLR > 0 exactly when the prediction is wrong.
    assert torch.equal(dlr_loss(logits, y) > 0, logits.argmax(1) != y)
    # By hand: z = (4, 3, 2, 1, 0), y = 1, t = 3.
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    one, three = torch.tensor([1]), torch.tensor([3])
    assert torch.allclose(dlr_loss(z, one), torch.tensor([-(3.0 - 4.0) / (4.0 - 2.0)], dtype=torch.float64))
    assert torch.allclose(dlr_loss(z, one, three),
                          torch.tensor([-(3.0 - 1.0) / (4.0 - 1.5)], dtype=torch.float64))


def test_step_size_is_halved_where_progress_stalls() -> None:
    n = 3
    x = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    x_max = torch.ones_like(x)
    f_max = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    w = _Walk(
        idx=torch.arange(n), x0=x, labels=torch.zeros(n, dtype=torch.int64), loss_targets=None,
        goal_targets=None, x=x, x_prev=x, grad=x, x_max=x_max, grad_max=2 * x_max, f_max=f_max,
        f_prev=torch.zeros(n, dtype=torch.float64), eta=torch.full((n,), 0.4, dtype=torch.float64),
        # sample 0: rose 8 of 10 steps and improved; 1: rose 3 of 10 (condition 1);
        # 2: rose 9 of 10 but the best loss is where it was at the last checkpoint (condition 2)
        rises=torch.tensor([8, 3, 9]), f_max_check=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        halved_check=torch.zeros(n, dtype=torch.bool), active=torch.ones(n, dtype=torch.bool),
        hit=torch.zeros(n, dtype=torch.bool), x_hit=x,
        f_hit=torch.zeros(n, dtype=torch.float64),
    )
    _check_step_size(w, rho=0.75, interval=10)
    assert torch.allclose(w.eta, torch.tensor([0.4, 0.2, 0.2], dtype=torch.float64))
    assert torch.equal(w.x[0], x[0]) and torch.equal(w.x[1], x_max[1]) and torch.equal(w.x[2], x_max[2])
    assert torch.equal(w.grad[1], 2 * x_max[1])  # the stored gradient of the best point: no new backward
    assert (w.rises == 0).all() and torch.equal(w.halved_check, torch.tensor([False, True, True]))
    # Condition 2 does not fire twice in a row: the step was just halved there.
    w.rises = torch.tensor([8, 8, 8])
    _check_step_size(w, rho=0.75, interval=10)
    assert torch.allclose(w.eta, torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64))


def test_step_size_schedule_follows_the_authors_code_where_the_paper_leaves_room() -> None:
    """fra31/auto-attack halves at ``rises <= rho * interval`` (the paper: ``<``) and keeps counting
    rises against the loss of the last iterate after moving back to the best point."""
    n = 2
    x = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    last_loss = torch.tensor([0.5, 0.5], dtype=torch.float64)
    w = _Walk(
        idx=torch.arange(n), x0=x, labels=torch.zeros(n, dtype=torch.int64), loss_targets=None,
        goal_targets=None, x=x, x_prev=x, grad=x, x_max=torch.ones_like(x), grad_max=x,
        f_max=torch.tensor([2.0, 2.0], dtype=torch.float64), f_prev=last_loss.clone(),
        eta=torch.full((n,), 0.4, dtype=torch.float64),
        # sample 0: rose in exactly rho of the 12 steps (9); sample 1: in 10 of them
        rises=torch.tensor([9, 10]), f_max_check=torch.tensor([1.0, 1.0], dtype=torch.float64),
        halved_check=torch.zeros(n, dtype=torch.bool), active=torch.ones(n, dtype=torch.bool),
        hit=torch.zeros(n, dtype=torch.bool), x_hit=x, f_hit=torch.zeros(n, dtype=torch.float64),
    )
    _check_step_size(w, rho=0.75, interval=12)
    assert torch.allclose(w.eta, torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert torch.equal(w.x[0], torch.ones_like(x[0])) and torch.equal(w.x[1], x[1])
    assert torch.equal(w.f_prev, last_loss)  # not the best loss the walk moved back to


def test_condition_2_waits_for_the_second_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the first checkpoint only condition 1 may halve the step (the authors' code)."""
    seen: list[torch.Tensor] = []
    real = apgd_module._check_step_size

    def spy(w: _Walk, rho: float, interval: int) -> None:
        seen.append(w.halved_check.clone())
        real(w, rho, interval)

    monkeypatch.setattr(apgd_module, "_check_step_size", spy)
    x, y = batch()
    apgd(tiny_model(), x, y, APGDSpec(eps=0.01, steps=30, early_stop=False),
         generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 2 and seen[0].all()


def test_the_first_rise_is_counted_against_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The authors' loss history starts as zeros: the first step counts as a rise only where its
    loss is positive (a targeted DLR loss is negative until the target wins)."""
    starts: list[torch.Tensor] = []

    class Spy(_Walk):
        def __init__(self, **fields: Any) -> None:
            super().__init__(**fields)
            starts.append(self.f_prev.clone())

    monkeypatch.setattr(apgd_module, "_Walk", Spy)
    x, y = batch()
    apgd_t(tiny_model(), x, y, APGDSpec(eps=0.01, steps=5, n_target_classes=2),
           generator=torch.Generator().manual_seed(0))
    assert starts and all((f == 0).all() for f in starts)


def test_early_stop_changes_the_cost_not_the_answer() -> None:
    x, y = batch(n=32)
    spec = APGDSpec(eps=0.05, steps=20, loss="dlr")
    model = tiny_model()
    stop = apgd(model, x, y, spec, generator=torch.Generator().manual_seed(3))
    full = apgd(model, x, y, APGDSpec(eps=0.05, steps=20, loss="dlr", early_stop=False),
                generator=torch.Generator().manual_seed(3))
    # Up to its first hit a sample's path is the same; a sample that never hits is the same.
    assert torch.equal(stop.success, full.success)
    assert 0 < int(stop.success.sum()) < len(y)
    assert torch.equal(stop.x_adv[~stop.success], full.x_adv[~full.success])
    assert (stop.gradients <= full.gradients).all()
    assert stop.gradients[stop.success].sum() < full.gradients[full.success].sum()


def test_sparse_compaction_points() -> None:
    assert sorted(sparse_compaction_points(100)) == [1, 2, 3, 4, 5, 6, 7, 9, 12, 15, 19, 23, 29, 37, 46, 58, 72,
                                                     90, 100]
    assert apgd_module.compaction_points(5, torch.zeros(1)) == {0, 1, 2, 3, 4, 5}  # CPU: every iterate


def test_dlr_needs_enough_classes() -> None:
    """Three classes are enough (the targeted DLR then takes z_pi3 for z_pi4); two are refused."""
    module = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).double().eval()
    model = Classifier(module, 3, SHAPE, BOUNDS, "three")
    x, _ = batch(n=4)
    y = model.logits(x).argmax(1)
    assert apgd_t(model, x, y, APGDSpec(eps=0.1, steps=2)).x_adv.shape == x.shape
    targeted = apgd(model, x, y, APGDSpec(eps=0.1, steps=2, loss="dlr", targeted=True), targets=(y + 1) % 3)
    assert targeted.x_adv.shape == x.shape
    assert apgd(model, x, y, APGDSpec(eps=0.1, steps=2, loss="dlr")).x_adv.shape == x.shape
    two = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(36, 2)).double().eval(), 2, SHAPE, BOUNDS, "two")
    y2 = two.logits(x).argmax(1)
    with pytest.raises(ValueError, match="at least 3 classes .* got 2"):
        apgd_t(two, x, y2, APGDSpec(eps=0.1, steps=2))
    with pytest.raises(ValueError, match="at least 3 classes .* got 2"):
        apgd(two, x, y2, APGDSpec(eps=0.1, steps=2, loss="dlr"))


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    x, y = load_split("fashion-mnist:test").slice(0, 96)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def robust_accuracy(model: Classifier, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.logits(x_adv).argmax(1) == y).float().mean())


def test_apgd_at_least_as_strong_as_pgd_on_the_cnn(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]
                                                   ) -> None:
    model, x, y = fmnist
    gen = torch.Generator
    acc_pgd = robust_accuracy(model, pgd(model, x, y, PGDSpec(eps=0.05, steps=20),
                                         generator=gen().manual_seed(0)).x_adv, y)
    out_ce = apgd(model, x, y, APGDSpec(eps=0.05, steps=20), generator=gen().manual_seed(0))
    acc_ce = robust_accuracy(model, out_ce.x_adv, y)
    out_t = apgd_t(model, x, y, APGDSpec(eps=0.05, steps=20, n_target_classes=3),
                   generator=gen().manual_seed(0))
    acc_t = robust_accuracy(model, out_t.x_adv, y)
    assert acc_ce <= acc_pgd and acc_t <= acc_pgd
    assert acc_ce < 0.4
    assert torch.equal(out_ce.success, model.logits(out_ce.x_adv).argmax(1) != y)
    # Early stop: the average sample spends well under the nominal budget.
    assert out_ce.gradients.float().mean() < 0.6 * 20


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 4.0)])
def test_apgd_t_hits_given_targets_on_the_cnn(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor],
                                              norm: str, eps: float) -> None:
    model, x, y = fmnist
    correct = model.logits(x).argmax(1) == y
    x, y = x[correct][:48], y[correct][:48]
    targets = (y + 3) % 10
    out = apgd_t(model, x, y, APGDSpec(eps=eps, norm=norm, steps=30, targeted=True),  # type: ignore[arg-type]
                 targets=targets, generator=torch.Generator().manual_seed(0))
    hit = model.logits(out.x_adv).argmax(1) == targets
    assert hit.float().mean() >= 0.95
    assert torch.equal(hit, out.success)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sparse_compaction_gives_the_same_answer(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    # On an accelerator finished samples ride along masked until the next compaction point.
    x, y = batch(n=32)
    every = run(case, x, y, seed=5)
    # The extreme schedule: compact only after the last step, every finished row masked until then.
    monkeypatch.setattr(apgd_module, "compaction_points", lambda steps, like: {steps})
    sparse = run(case, x, y, seed=5)
    # Equal up to float noise: a batch of another size may round the last bit differently.
    assert torch.allclose(every.x_adv, sparse.x_adv, atol=1e-9) and torch.equal(every.success, sparse.success)
    assert (sparse.gradients >= every.gradients).all()
    if case[2].early_stop:
        assert sparse.gradients.sum() > every.gradients.sum()  # the masked rows were still computed
