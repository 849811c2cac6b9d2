"""FAB / FAB-T: the projection onto the linearised boundary, the kernel contract, exactness on a
linear model, strength on fmnist-cnn."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from tests.unit.support import BOUNDS, CLASSES, SHAPE, batch, fmnist_test, hosted, tiny_model
from workers.attacks import fab as fab_module
from workers.attacks.base import AttackOutput, flat_norm
from workers.attacks.fab import FABSpec, _random_starts, fab, fab_t, project_onto_boundary
from workers.classifier import Classifier

F64 = torch.float64


def t64(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=F64)


# --- the projection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm,point,w,b,bounds,expected",
    [
        # Free: the plain projections, L2 along w, Linf along sign(w) with |d| = r / ||w||_1.
        ("l2", [0.5, 0.5], [1.0, 2.0], 2.5, (0.0, 1.0), [0.2, 0.4]),
        ("linf", [0.5, 0.5], [1.0, 2.0], 2.5, (0.0, 1.0), [1 / 3, 1 / 3]),
        # The box stops the second coordinate at 0.85: L2 then needs lambda + 0.7 = 1.
        ("l2", [0.5, 0.5], [1.0, 2.0], 2.5, (0.0, 0.85), [0.3, 0.35]),
        # Linf with the second coordinate capped at 0.3 from its bound: delta + 0.6 = 1.
        ("linf", [0.2, 0.5], [1.0, 2.0], 2.2, (0.0, 0.8), [0.4, 0.3]),
        # Downwards (b below <w, t>), negative weights, bounds not [0, 1].
        ("linf", [0.0, 0.0], [-1.0, 1.0], -1.0, (-1.0, 1.0), [0.5, -0.5]),
        ("l2", [0.0, 0.0], [-1.0, 1.0], -1.0, (-1.0, 1.0), [0.5, -0.5]),
        # A zero weight does not move; on the hyperplane already, nothing moves.
        ("l2", [0.5, 0.5], [0.0, 2.0], 1.4, (0.0, 1.0), [0.0, 0.2]),
        ("linf", [0.5, 0.5], [0.0, 2.0], 1.4, (0.0, 1.0), [0.0, 0.2]),
        ("linf", [0.5, 0.5], [1.0, 2.0], 1.5, (0.0, 1.0), [0.0, 0.0]),
        # Out of reach inside the box: the corner that comes closest.
        ("l2", [0.5, 0.5], [1.0, 1.0], 1.5, (0.0, 0.6), [0.1, 0.1]),
        ("linf", [0.5, 0.5], [1.0, -1.0], 3.0, (0.0, 1.0), [0.5, -0.5]),
    ],
)
def test_projection_by_hand(norm: Any, point: list[float], w: list[float], b: float,
                            bounds: tuple[float, float], expected: list[float]) -> None:
    d = project_onto_boundary(t64(point), t64(w), torch.tensor([b], dtype=F64), bounds, norm)
    assert torch.allclose(d, t64(expected), atol=1e-12), d


def _random_problems(n: int, dims: int, seed: int, bounds: tuple[float, float]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    t = lo + (hi - lo) * torch.rand(n, dims, generator=g, dtype=F64)
    t[:, :3] = torch.tensor([lo, hi, lo], dtype=F64)  # some coordinates start at a bound
    w = torch.randn(n, dims, generator=g, dtype=F64)
    w[:, 3] = 0.0
    b = (w * t).sum(1) + torch.randn(n, generator=g, dtype=F64) * (hi - lo) * 0.8
    # The last rows out of reach: above the largest value of <w, z> over the box, or below the least.
    b[-4:-2] = (w[-4:-2].clamp_min(0) * hi + w[-4:-2].clamp_max(0) * lo).sum(1) + 0.5
    b[-2:] = (w[-2:].clamp_min(0) * lo + w[-2:].clamp_max(0) * hi).sum(1) - 0.5
    return t, w, b


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_lands_on_the_hyperplane_in_the_box_and_is_nearest(norm: Any) -> None:
    bounds = (-0.5, 1.5)
    t, w, b = _random_problems(64, 10, seed=3, bounds=bounds)
    d = project_onto_boundary(t, w, b, bounds, norm)
    z = t + d
    assert z.min() >= bounds[0] and z.max() <= bounds[1]
    residual = ((w * z).sum(1) - b).abs()
    # Reachable: max over the box of <w, z> (or min, for a target below) gets to b.
    best_up = (w.clamp_min(0) * bounds[1] + w.clamp_max(0) * bounds[0]).sum(1)
    best_down = (w.clamp_min(0) * bounds[0] + w.clamp_max(0) * bounds[1]).sum(1)
    reachable = (b <= best_up) & (b >= best_down)
    assert reachable.sum() >= 48 and (~reachable).sum() == 4  # both cases tested
    assert residual[reachable].max() < 1e-9
    # Unreachable: every coordinate sits at the bound on the hyperplane's side.
    up = b > (w * t).sum(1)
    corner = torch.where((w > 0) == up[:, None], torch.full_like(t, bounds[1]), torch.full_like(t, bounds[0]))
    corner = torch.where(w == 0, t, corner)
    assert torch.allclose(z[~reachable], corner[~reachable], atol=1e-12)
    size = flat_norm(d, norm)
    # No farther than feasible points found another way: where segments from t to random points
    # of the box cross the hyperplane.
    g = torch.Generator().manual_seed(4)
    p = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(500, *t.shape, generator=g, dtype=F64)
    s = (b - (w * t).sum(1)) / ((w * (p - t)).sum(2))
    crossing = (s >= 0) & (s <= 1)
    other = flat_norm((s[..., None] * (p - t)).flatten(0, 1), norm).view(500, -1)
    nearest_other = torch.where(crossing, other, torch.full_like(other, math.inf)).amin(0)
    found = reachable & nearest_other.isfinite()
    assert found.sum() >= 40
    assert (size[found] <= nearest_other[found] * (1 + 1e-9)).all()
    if norm == "linf":
        # Against a linear program: min delta s.t. |d_i| <= delta, box, <w, d> = r.
        for i in reachable.nonzero().squeeze(1)[:16].tolist():
            dims = t.shape[1]
            cost = np.r_[np.zeros(dims), 1.0]
            a_ub = np.block([[np.eye(dims), -np.ones((dims, 1))], [-np.eye(dims), -np.ones((dims, 1))]])
            box = [(bounds[0] - v, bounds[1] - v) for v in t[i].tolist()]
            lp = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dims), A_eq=np.r_[w[i].numpy(), 0.0][None],
                         b_eq=[float(b[i] - w[i] @ t[i])], bounds=[*box, (0, None)])
            assert lp.status == 0 and abs(float(size[i]) - lp.fun) < 1e-7
    else:
        # The convex problem's optimality certificate (KKT): d = clip(lambda w, box) for one lambda >= 0
        # (lambda <= 0 when the hyperplane lies below).
        free = (z > bounds[0]) & (z < bounds[1]) & (w != 0)
        for i in reachable.nonzero().squeeze(1)[:32].tolist():
            j = int(free[i].nonzero()[0])
            lam_i = float(d[i, j] / w[i, j])
            expect = (lam_i * w[i]).clamp(bounds[0] - t[i], bounds[1] - t[i])
            assert torch.allclose(d[i], expect, atol=1e-9)


# --- the kernel contract -------------------------------------------------------------------------

Case = tuple[str, Callable[..., AttackOutput], FABSpec]
CASES: list[Case] = [
    ("fab-linf", fab, FABSpec(eps=0.1, steps=10)),
    ("fab-l2-targeted", fab, FABSpec(eps=0.6, norm="l2", steps=10, targeted=True)),
    ("fab-t-linf", fab_t, FABSpec(eps=0.05, steps=10, n_target_classes=3)),
    ("fab-t-l2-restarts", fab_t, FABSpec(eps=0.3, norm="l2", steps=5, n_restarts=2)),
    ("fab-t-linf-no-early-stop", fab_t, FABSpec(eps=0.05, steps=10, early_stop=False)),
]


def _run(case: Case, model: Classifier, x: torch.Tensor, y: torch.Tensor, seed: int) -> AttackOutput:
    _, kernel, spec = case
    targets = (y + 1) % CLASSES if spec.targeted else None
    return kernel(model, x, y, spec, targets=targets, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_contract(case: Case) -> None:
    _, _, spec = case
    model = tiny_model()
    x, y = batch()
    out = _run(case, model, x, y, seed=5)
    assert out.success is not None
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    size = flat_norm(out.x_adv - x, spec.norm)
    assert size.max() <= spec.eps * (1 + 1e-9)
    assert (size[~out.success] == 0).all()  # a resisting sample comes back unchanged
    assert out.success.any() and not out.success.all()  # both kinds tested
    # The kernel's success is what the returned tensor shows: the target when targeted.
    pred = model.logits(out.x_adv).argmax(1)
    goal = pred == (y + 1) % CLASSES if spec.targeted else pred != y
    assert torch.equal(out.success, goal)
    assert out.queries.dtype == torch.int64 and (out.queries >= 3).all() and (out.gradients >= 1).all()
    again = _run(case, model, x, y, seed=5)
    assert torch.equal(out.x_adv, again.x_adv) and torch.equal(out.gradients, again.gradients)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_start_at_half_the_radius_drawn_from_the_generator(norm: Any) -> None:
    x = torch.full((8, 1, 6, 6), 0.5, dtype=F64)
    radius = torch.tensor([0.2, 0.4, math.inf, 0.1, 0.2, 0.2, 0.3, 0.2], dtype=F64)
    a, again, other = (_random_starts(x, radius, norm, BOUNDS, torch.Generator().manual_seed(seed))
                       for seed in (0, 0, 1))
    assert torch.equal(a, again) and not torch.equal(a, other)
    expected = torch.where(radius.isfinite(), radius / 2, torch.zeros_like(radius))  # no radius yet: x
    assert torch.allclose(flat_norm(a - x, norm), expected, atol=1e-12)
    # A sample's start does not depend on the others' radius.
    changed = _random_starts(x, radius.flip(0), norm, BOUNDS, torch.Generator().manual_seed(0))
    assert torch.allclose((changed - x)[0] / float(radius[-1]), (a - x)[0] / float(radius[0]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_sample_does_not_depend_on_the_others(case: Case) -> None:
    model = tiny_model()
    x, y = batch()
    out = _run(case, model, x, y, seed=2)
    g = torch.Generator().manual_seed(9)
    other = x.clone()
    other[1:] = torch.rand(other[1:].shape, generator=g, dtype=F64)
    y_other = y.clone()
    y_other[1:] = model.logits(other[1:]).argmax(1)
    changed = _run(case, model, other, y_other, seed=2)
    assert torch.equal(out.x_adv[0], changed.x_adv[0])
    assert out.success is not None and changed.success is not None
    assert out.success[0] == changed.success[0] and out.gradients[0] == changed.gradients[0]


def test_targeted_fab_reaches_the_targets() -> None:
    model = tiny_model()
    x, y = batch(n=32)
    targets = (y + 2) % CLASSES
    out = fab(model, x, y, FABSpec(eps=1.5, norm="l2", steps=30, targeted=True), targets=targets)
    assert out.success is not None and out.success.float().mean() >= 0.8
    assert torch.equal(model.logits(out.x_adv).argmax(1) == targets, out.success)


def test_misclassified_inputs_are_returned_unchanged() -> None:
    model = tiny_model()
    x, y = batch()
    wrong = (y + 1) % CLASSES
    out = fab_t(model, x, wrong, FABSpec(eps=0.1, steps=5))
    assert torch.equal(out.x_adv, x) and out.success is not None and out.success.all()


def test_early_stop_changes_the_cost_not_the_answer() -> None:
    model = tiny_model()
    x, y = batch(n=32)
    stop = fab_t(model, x, y, FABSpec(eps=0.05, steps=20, n_target_classes=3))
    full = fab_t(model, x, y, FABSpec(eps=0.05, steps=20, n_target_classes=3, early_stop=False))
    assert stop.success is not None and full.success is not None
    assert torch.equal(stop.success, full.success) and 0 < int(stop.success.sum()) < len(y)
    assert (stop.gradients <= full.gradients).all() and stop.gradients.sum() < full.gradients.sum()
    # Without early stop a sample comes back at its closest adversarial, no farther than the first.
    assert (flat_norm(full.x_adv - x, "linf") <= flat_norm(stop.x_adv - x, "linf") + 1e-12).all()


def test_sparse_compaction_changes_nothing_but_the_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator finished samples ride along masked until the next compaction point."""
    model = tiny_model()
    x, y = batch(n=32)
    spec = FABSpec(eps=0.05, steps=20, n_target_classes=3)
    every = fab_t(model, x, y, spec)
    # The extreme schedule: only at the end of a run (the accelerator's is sparse, not empty).
    monkeypatch.setattr(fab_module, "compaction_points", lambda steps, like: {steps})
    sparse = fab_t(model, x, y, spec)
    assert every.success is not None and sparse.success is not None
    assert torch.equal(every.x_adv, sparse.x_adv) and torch.equal(every.success, sparse.success)
    assert (sparse.gradients >= every.gradients).all() and sparse.gradients.sum() > every.gradients.sum()


def test_images_of_3x32x32_with_8_classes() -> None:
    torch.manual_seed(0)  # the weights of this test's model only
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
                           nn.Linear(4 * 8 * 8, 8)).double().eval()
    module.requires_grad_(False)
    model = Classifier(module, 8, (3, 32, 32), (-1.0, 1.0), "rgb")
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=F64) * 2 - 1
    y = model.logits(x).argmax(1)
    for norm, eps in (("linf", 0.05), ("l2", 1.0)):
        spec = FABSpec(eps=eps, norm=norm, steps=10)  # type: ignore[arg-type]
        out = fab_t(model, x, y, spec)
        assert out.success is not None and out.success.any()
        assert out.x_adv.shape == x.shape and out.x_adv.min() >= -1 and out.x_adv.max() <= 1
        assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-9)  # type: ignore[arg-type]
        assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
        assert out.gradients.max() <= 10 * 7  # at most steps x 7 targets


# --- exactness on a linear model -----------------------------------------------------------------


@pytest.mark.parametrize("norm,dual", [("linf", 1.0), ("l2", 2.0)])
def test_fab_finds_the_minimal_distance_on_a_linear_model(norm: Any, dual: float) -> None:
    """Inside the box, the distance from x to the complement of its class region is
    ``min_j |z_j - z_y| / ||w_j - w_y||_q``, q the dual norm; FAB without early stop and without
    a budget converges to it."""
    torch.manual_seed(0)  # the weights of this test's model only
    linear = nn.Linear(36, CLASSES).double()
    module = nn.Sequential(nn.Flatten(), linear).eval()
    module.requires_grad_(False)
    model = Classifier(module, CLASSES, SHAPE, BOUNDS, "linear")
    x = 0.5 + 0.02 * torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64)
    logits = model.logits(x)
    y = logits.argmax(1)
    weight = linear.weight.detach()
    diff_w = weight[None] - weight[y][:, None]  # (n, K, D)
    diff_z = (logits - logits.gather(1, y[:, None])).abs()
    dist = diff_z / diff_w.norm(p=dual, dim=2)
    dist = dist.scatter(1, y[:, None], math.inf).amin(1)
    # No coordinate of the nearest point reaches the box: each moves by at most the distance.
    assert ((x.flatten(1) - 0.5).abs().amax(1) + dist < 0.5).all()
    out = fab(model, x, y, FABSpec(eps=math.inf, norm=norm, steps=100, early_stop=False))
    assert out.success is not None and out.success.all()
    found = flat_norm(out.x_adv - x, norm)
    assert (found >= dist * (1 - 1e-9)).all()  # nothing closer exists
    assert (found <= dist * 1.01).all(), (found / dist).max()


# --- strength on the hosted CNN ------------------------------------------------------------------


def test_fab_t_breaks_the_cnn_within_eps() -> None:
    model = hosted()
    x, y = fmnist_test(32)
    correct = model.logits(x).argmax(1) == y
    out = fab_t(model, x, y, FABSpec(eps=0.1, steps=20, n_target_classes=3))
    assert out.success is not None
    assert torch.equal(out.success, model.logits(out.x_adv).argmax(1) != y)
    assert flat_norm(out.x_adv - x, "linf").max() <= 0.1 + 1e-6
    assert out.success[correct].float().mean() >= 0.9  # fmnist-cnn is not robust at Linf 0.1
    # Early stop: the average sample spends a small part of the 3 x 20 budget.
    assert out.gradients.float().mean() < 0.25 * 60
