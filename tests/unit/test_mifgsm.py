"""MI-FGSM: the kernel contract, the paper's update rule, strength on fmnist-cnn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.datasets import load_split
from tests.unit.support import BOUNDS, CLASSES, batch, hosted, run, tiny_model
from workers.attacks import mifgsm as mifgsm_module
from workers.attacks.base import AttackOutput, flat_norm, goal_reached
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.classifier import Classifier

Case = tuple[str, Callable[..., AttackOutput], Any, float, str]
CASES: list[Case] = [
    ("mi-fgsm-linf", mi_fgsm, MIFGSMSpec(eps=0.05, steps=10), 0.05, "linf"),
    ("mi-fgsm-l2", mi_fgsm, MIFGSMSpec(eps=0.3, norm="l2", steps=10), 0.3, "l2"),
    ("mi-fgsm-linf-random-start", mi_fgsm,
     MIFGSMSpec(eps=0.05, steps=5, step_size=0.02, decay=0.5, random_start=True), 0.05, "linf"),
    ("mi-fgsm-linf-no-early-stop", mi_fgsm, MIFGSMSpec(eps=0.05, steps=5, early_stop=False), 0.05, "linf"),
    ("mi-fgsm-l2-targeted", mi_fgsm, MIFGSMSpec(eps=0.5, norm="l2", steps=10, targeted=True), 0.5, "l2"),
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
    assert (out.gradients >= 1).all() and (out.gradients <= spec.steps).all()
    assert (out.queries >= 2).all() and (out.queries <= spec.steps + 2).all()
    targets = (y + 1) % CLASSES if spec.targeted else None
    assert torch.equal(out.success, goal_reached(tiny_model().logits(out.x_adv), y, targets, spec.targeted))
    again = run(case, x, y, seed=7)
    assert torch.equal(out.x_adv, again.x_adv) and torch.equal(out.success, again.success)
    if not spec.targeted:
        assert out.success.any()


def reference(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
              decay: float, norm: str) -> torch.Tensor:
    """The paper's update, written out: g <- mu g + grad / ||grad||_1; x <- clip(x + alpha d(g))."""
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        xg = x_adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model.module(xg), y, reduction="sum"), xg)
        g = decay * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        if norm == "linf":
            x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - eps), x + eps).clamp(*BOUNDS)
        else:
            moved = x_adv + alpha * g / torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True)
            delta = moved - x
            delta = delta * (eps / torch.linalg.vector_norm(delta, dim=(1, 2, 3), keepdim=True)).clamp(max=1.0)
            x_adv = (x + delta).clamp(*BOUNDS)
    return x_adv


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 0.6)])
def test_matches_the_papers_update(norm: str, eps: float) -> None:
    x, y = batch(n=16)
    model = tiny_model()
    spec = MIFGSMSpec(eps=eps, norm=norm, steps=4, step_size=eps / 2, decay=0.9,  # type: ignore[arg-type]
                      early_stop=False)
    out = mi_fgsm(model, x, y, spec)
    expected = reference(model, x, y, eps, eps / 2, 4, 0.9, norm)
    assert torch.allclose(out.x_adv, expected, atol=1e-12)
    # Momentum matters here: without it the path differs.
    plain = reference(model, x, y, eps, eps / 2, 4, 0.0, norm)
    assert not torch.allclose(out.x_adv, plain, atol=1e-6)


def test_without_momentum_it_is_the_basic_iterative_method() -> None:
    x, y = batch(n=16)
    model = tiny_model()
    out = mi_fgsm(model, x, y, MIFGSMSpec(eps=0.06, steps=6, decay=0.0, early_stop=False))
    bim = pgd(model, x, y, PGDSpec(eps=0.06, steps=6, step_size=0.01, random_start=False, early_stop=False))
    assert torch.allclose(out.x_adv, bim.x_adv, atol=1e-12)


def test_early_stop_keeps_the_first_successful_iterate() -> None:
    x, y = batch(n=32)
    model = tiny_model()
    stop = mi_fgsm(model, x, y, MIFGSMSpec(eps=0.1, steps=10))
    assert 0 < int(stop.success.sum()) < len(y)
    # One query for the clean check, then one per iterate 0..j evaluated: j = queries - 2.
    first = torch.where(stop.success, stop.queries - 2, torch.full_like(stop.queries, 99))
    assert int(first.min()) >= 1 and int(first[stop.success].max()) <= 10
    for k in range(1, 11):
        # The same attack cut at k steps, without early stop: its last iterate is iterate k.
        cut = mi_fgsm(model, x, y, MIFGSMSpec(eps=0.1, steps=k, step_size=0.01, early_stop=False))
        here = first == k
        assert torch.allclose(stop.x_adv[here], cut.x_adv[here], atol=1e-12)
        assert cut.success[here].all()
        assert not cut.success[first > k].any()  # not reached at iterate k by those that hit later


@pytest.fixture(scope="module")
def fmnist() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    model = hosted()
    x, y = load_split("fashion-mnist:test").slice(0, 96)
    return model, torch.from_numpy(x), torch.from_numpy(y)


def test_mi_fgsm_stronger_than_fgsm_on_the_cnn(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = fmnist
    out = mi_fgsm(model, x, y, MIFGSMSpec(eps=0.05, steps=10))
    acc_mi = float((model.logits(out.x_adv).argmax(1) == y).float().mean())
    acc_fgsm = float((model.logits(fgsm(model, x, y, FGSMSpec(eps=0.05)).x_adv).argmax(1) == y).float().mean())
    assert acc_mi < acc_fgsm
    assert acc_mi < 0.5
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
    assert out.gradients.float().mean() < 10  # early stop spends less than the nominal budget


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 4.0)])
def test_targeted_mi_fgsm_hits_its_targets(fmnist: tuple[Classifier, torch.Tensor, torch.Tensor],
                                           norm: str, eps: float) -> None:
    model, x, y = fmnist
    correct = model.logits(x).argmax(1) == y
    x, y = x[correct][:48], y[correct][:48]
    targets = (y + 3) % 10
    out = mi_fgsm(model, x, y, MIFGSMSpec(eps=eps, norm=norm, steps=20, targeted=True),  # type: ignore[arg-type]
                  targets=targets)
    hit = model.logits(out.x_adv).argmax(1) == targets
    assert hit.float().mean() >= 0.9
    assert torch.equal(hit, out.success)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sparse_compaction_gives_the_same_answer(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    # On an accelerator finished samples ride along masked until the next compaction point.
    x, y = batch(n=32)
    every = run(case, x, y, seed=5)
    # The extreme schedule: compact only after the last step, every finished row masked until then.
    monkeypatch.setattr(mifgsm_module, "compaction_points", lambda steps, like: {steps})
    sparse = run(case, x, y, seed=5)
    # Equal up to float noise: a batch of another size may round the last bit differently.
    assert torch.allclose(every.x_adv, sparse.x_adv, atol=1e-9) and torch.equal(every.success, sparse.success)
    assert (sparse.gradients >= every.gradients).all()
    if case[2].early_stop:
        assert sparse.gradients.sum() > every.gradients.sum()
