"""The contract every attack kernel keeps, checked on a tiny seeded model (float64, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.unit.support import BOUNDS, CLASSES, batch, run, tiny_model
from workers.attacks.apgd import APGDSpec, apgd, apgd_t
from workers.attacks.base import AttackOutput, flat_norm
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.hop_skip_jump import HopSkipJumpSpec, hop_skip_jump
from workers.attacks.jsma import JSMASpec, jsma
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.square import SquareSpec, square

BLACK_BOX = (square, hop_skip_jump)
# Targeted HopSkipJump starts from another input of the batch already classified as the target, so
# its samples depend on each other by design; it is tested in test_hop_skip_jump.py instead.
Case = tuple[str, Callable[..., AttackOutput], Any, float | None, str | None]
CASES: list[Case] = [
    ("fgsm-linf", fgsm, FGSMSpec(eps=0.05), 0.05, "linf"),
    ("fgsm-l2", fgsm, FGSMSpec(eps=0.3, norm="l2"), 0.3, "l2"),
    ("fgsm-linf-targeted", fgsm, FGSMSpec(eps=0.05, targeted=True), 0.05, "linf"),
    ("fgsm-linf-unchecked", fgsm, FGSMSpec(eps=0.05, check=False), 0.05, "linf"),
    ("pgd-linf", pgd, PGDSpec(eps=0.05, steps=10), 0.05, "linf"),
    ("pgd-l2", pgd, PGDSpec(eps=0.3, norm="l2", steps=10), 0.3, "l2"),
    ("pgd-linf-restarts", pgd, PGDSpec(eps=0.03, steps=5, restarts=3), 0.03, "linf"),
    ("pgd-linf-no-early-stop", pgd, PGDSpec(eps=0.05, steps=5, early_stop=False), 0.05, "linf"),
    ("pgd-l2-targeted", pgd, PGDSpec(eps=0.5, norm="l2", steps=10, targeted=True), 0.5, "l2"),
    ("apgd-ce-linf", apgd, APGDSpec(eps=0.05, steps=10), 0.05, "linf"),
    ("apgd-dlr-l2", apgd, APGDSpec(eps=0.3, norm="l2", steps=10, loss="dlr"), 0.3, "l2"),
    ("apgd-ce-linf-restarts-no-early-stop", apgd,
     APGDSpec(eps=0.03, steps=5, restarts=2, early_stop=False), 0.03, "linf"),
    ("apgd-dlr-linf-targeted", apgd, APGDSpec(eps=0.1, steps=10, loss="dlr", targeted=True), 0.1, "linf"),
    ("apgd-t-linf", apgd_t, APGDSpec(eps=0.05, steps=10, n_target_classes=3), 0.05, "linf"),
    ("apgd-t-l2-targeted", apgd_t, APGDSpec(eps=0.5, norm="l2", steps=10, targeted=True), 0.5, "l2"),
    ("mi-fgsm-linf", mi_fgsm, MIFGSMSpec(eps=0.05, steps=10), 0.05, "linf"),
    ("mi-fgsm-l2-random-start", mi_fgsm, MIFGSMSpec(eps=0.3, norm="l2", steps=10, random_start=True),
     0.3, "l2"),
    ("mi-fgsm-linf-targeted", mi_fgsm, MIFGSMSpec(eps=0.1, steps=10, targeted=True), 0.1, "linf"),
    ("cw-l2", carlini_wagner_l2, CarliniWagnerL2Spec(binary_search_steps=4, max_iter=30, learning_rate=0.05,
                                                      initial_const=0.1), None, None),
    ("cw-l2-targeted", carlini_wagner_l2,
     CarliniWagnerL2Spec(binary_search_steps=4, max_iter=30, learning_rate=0.05, initial_const=0.1,
                         targeted=True), None, None),
    ("jsma-probabilities", jsma, JSMASpec(gamma=0.5), None, None),
    ("jsma-logits-targeted", jsma, JSMASpec(theta=-0.5, gamma=0.5, space="logits", targeted=True), None, None),
    ("square-linf", square, SquareSpec(eps=0.05, max_queries=200), 0.05, "linf"),
    ("square-l2", square, SquareSpec(eps=0.3, norm="l2", max_queries=200), 0.3, "l2"),
    ("square-linf-targeted", square, SquareSpec(eps=0.1, max_queries=200, targeted=True), 0.1, "linf"),
    ("square-l2-no-early-stop", square, SquareSpec(eps=0.3, norm="l2", max_queries=50, early_stop=False),
     0.3, "l2"),
    ("hop-skip-jump-l2", hop_skip_jump, HopSkipJumpSpec(norm="l2", max_queries=300, steps=10), None, None),
    ("hop-skip-jump-linf", hop_skip_jump, HopSkipJumpSpec(norm="linf", max_queries=300, steps=10), None, None),
    ("deepfool-l2", deepfool, DeepFoolSpec(norm="l2", candidates=CLASSES), None, None),
    ("deepfool-l2-all-candidates", deepfool,
     DeepFoolSpec(norm="l2", candidates=CLASSES, refine_candidates=None), None, None),
    ("deepfool-linf", deepfool, DeepFoolSpec(norm="linf", candidates=3), None, None),
]



@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_in_bounds_and_inside_the_ball(case: Case) -> None:
    x, y = batch()
    out = run(case, x, y)
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    _, _, _, eps, norm = case
    if eps is not None and norm is not None:
        assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-9)
    if out.success is not None:
        assert out.success.dtype == torch.bool and out.success.shape == y.shape
    else:
        assert getattr(case[2], "check", True) is False
    assert (out.queries >= 1).all()
    if case[1] in BLACK_BOX:
        assert (out.gradients == 0).all()  # scores or labels only
    else:
        assert (out.gradients >= 1).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_seed_same_bits(case: Case) -> None:
    x, y = batch()
    first, second = run(case, x, y, seed=7), run(case, x, y, seed=7)
    assert torch.equal(first.x_adv, second.x_adv)
    assert first.success is None or second.success is not None
    if first.success is not None and second.success is not None:
        assert torch.equal(first.success, second.success)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_robust_accuracy_never_above_clean(case: Case) -> None:
    x, _ = batch()
    # Labels that make some inputs misclassified to start with.
    y = torch.arange(x.shape[0]) % CLASSES
    model = tiny_model()
    out = run(case, x, y)
    clean = (model.logits(x).argmax(1) == y).double().mean()
    robust = (model.logits(out.x_adv).argmax(1) == y).double().mean()
    assert robust <= clean
    if not getattr(case[2], "targeted", False):
        assert robust < clean  # and the attack does something on this model


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sample_unaffected_by_the_others(case: Case) -> None:
    x, y = batch(n=12)
    other_x, other_y = batch(n=12, seed=99)
    mixed_x, mixed_y = x.clone(), y.clone()
    mixed_x[4:], mixed_y[4:] = other_x[4:], other_y[4:]
    alone, mixed = run(case, x, y), run(case, mixed_x, mixed_y)
    assert torch.allclose(alone.x_adv[:4], mixed.x_adv[:4], atol=1e-9)
    if alone.success is not None and mixed.success is not None:
        assert torch.equal(alone.success[:4], mixed.success[:4])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_success_matches_the_returned_tensor(case: Case) -> None:
    x, y = batch()
    out = run(case, x, y)
    pred = tiny_model().logits(out.x_adv).argmax(1)
    targets = (y + 1) % CLASSES
    reached = pred == targets if getattr(case[2], "targeted", False) else pred != y
    if out.success is None:
        assert getattr(case[2], "check", True) is False
    else:
        assert torch.equal(reached, out.success)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_misclassified_inputs_are_returned_unchanged(case: Case) -> None:
    x, _ = batch()
    y = torch.arange(x.shape[0]) % CLASSES
    model = tiny_model()
    wrong = model.logits(x).argmax(1) != y
    assert wrong.any() and (~wrong).any()
    out = run(case, x, y)
    assert torch.equal(out.x_adv[wrong], x[wrong])
    if case[1] is not fgsm:  # FGSM's one gradient comes with the forward that finds them wrong
        assert (out.gradients[wrong] == 0).all()
