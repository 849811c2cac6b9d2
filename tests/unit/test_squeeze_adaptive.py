"""The adaptive attack on a classifier and its feature-squeezing detector (squeeze_adaptive), on the
tiny seeded model with a detector whose threshold comes from a small clean calibration."""

from __future__ import annotations

import pytest
import torch

from tests.unit.support import BOUNDS, batch, tiny_model
from workers.attacks.base import flat_norm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.squeeze_adaptive import SqueezeAdaptiveSpec, joint_margin, squeeze_adaptive
from workers.audit.battery import AuditPlan, Detector, Stage, run_battery
from workers.defenses.squeeze import calibrate_threshold, squeeze_scores

SQUEEZERS = (({"name": "bit-depth", "bits": 2},), ({"name": "median", "size": 2},))


@pytest.fixture(scope="module")
def threshold() -> float:
    """10% false positives on 64 clean inputs that the attacked ones are not among."""
    clean, _ = batch(64, seed=7)
    return calibrate_threshold(squeeze_scores(tiny_model().module, clean, SQUEEZERS, BOUNDS), 0.1)


def _spec(threshold: float, eps: float = 0.1, norm: str = "linf", **kw: object) -> SqueezeAdaptiveSpec:
    return SqueezeAdaptiveSpec(eps=eps, squeezers=SQUEEZERS, threshold=threshold, norm=norm,  # type: ignore[arg-type]
                               steps=10, **kw)  # type: ignore[arg-type]


def _stopped(x_adv: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Detect-and-reject: classified correctly, or flagged by the detector."""
    model = tiny_model()
    scores = squeeze_scores(model.module, x_adv, SQUEEZERS, BOUNDS)
    return (model.logits(x_adv).argmax(1) == y) | (scores > threshold)


def test_the_adaptive_attack_gets_past_the_detector_where_the_oblivious_one_is_caught(threshold: float) -> None:
    x, y = batch(32)
    g_oblivious, g_adaptive = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    oblivious = pgd(tiny_model(), x, y, PGDSpec(eps=0.1, steps=20), generator=g_oblivious)
    adaptive = squeeze_adaptive(tiny_model(), x, y, _spec(threshold), generator=g_adaptive)
    stopped_oblivious = _stopped(oblivious.x_adv, y, threshold)
    stopped_adaptive = _stopped(adaptive.x_adv, y, threshold)
    # The oblivious examples are flagged on some samples that the adaptive attack gets past: on the
    # same images detect-and-reject accuracy falls (7 of 32 stopped -> 4 measured).
    assert int(stopped_adaptive.sum()) < int(stopped_oblivious.sum())
    assert bool((~stopped_adaptive & stopped_oblivious).any())
    # The kernel's success is the definition, judged again on the returned tensor.
    assert adaptive.success is not None and torch.equal(adaptive.success, ~stopped_adaptive)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_outputs_stay_in_bounds_and_in_the_ball(threshold: float, norm: str, eps: float) -> None:
    x, y = batch(16)
    spec = _spec(threshold, eps, norm)
    out = squeeze_adaptive(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(1))
    assert out.x_adv.dtype == x.dtype and out.x_adv.shape == x.shape
    assert out.x_adv.min() >= BOUNDS[0] and out.x_adv.max() <= BOUNDS[1]
    assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-9)  # type: ignore[arg-type]
    assert out.success is not None and bool(out.success.any())


def test_same_seed_same_bits_and_a_sample_does_not_depend_on_the_others(threshold: float) -> None:
    x, y = batch(12)
    spec = _spec(threshold, random_start=True)
    first = squeeze_adaptive(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(3))
    second = squeeze_adaptive(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.x_adv, second.x_adv) and torch.equal(first.queries, second.queries)
    other = squeeze_adaptive(tiny_model(), x, y, spec, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(first.x_adv, other.x_adv)  # the seed matters (random starts)
    # Without random starts a sample's path is its own: alone or in the batch, the same example.
    fixed = _spec(threshold, random_start=False)
    whole = squeeze_adaptive(tiny_model(), x, y, fixed)
    alone = squeeze_adaptive(tiny_model(), x[5:6], y[5:6], fixed)
    torch.testing.assert_close(alone.x_adv, whole.x_adv[5:6], rtol=0, atol=1e-12)


def test_costs_are_counted_per_pass_and_misclassified_inputs_are_left_alone(threshold: float) -> None:
    x, y = batch(8)
    y = y.clone()
    y[0] = (y[0] + 1) % 4  # the model gets this one wrong already
    model = tiny_model()
    out = squeeze_adaptive(model, x, y, _spec(threshold), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.x_adv[0], x[0]) and out.success is not None and not out.success[0]
    assert int(out.queries[0]) == 3 and int(out.gradients[0]) == 0  # one clean pass: x and two squeezers
    assert int(out.gradients.max()) <= 3 * 10 and bool((out.gradients % 3 == 0).all())
    assert model.queries == int(out.queries.sum()) and model.gradients == int(out.gradients.sum())


def test_the_joint_margin_is_negative_exactly_when_misclassified_and_not_flagged() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [1.0, 3.0, 0.0], [2.0, 2.5, 0.0]])
    y = torch.zeros(4, dtype=torch.long)
    scores = torch.tensor([0.0, 0.1, 0.9, 0.4])
    margin = joint_margin(logits, scores, y, torch.ones(4), threshold=0.5, score_weight=4.0)
    # correct | wrong and passes | wrong but flagged | wrong, the score just under the threshold:
    # max(G_y, G_rej) - max_{j != y} G_j with G_rej = max G + 4 (score - 0.5)
    expected = [3 - 1, max(1, 3 - 1.6) - 3, max(1, 3 + 1.6) - 3, max(2, 2.5 - 0.4) - 2.5]
    assert margin.tolist() == pytest.approx(expected)
    assert (margin < 0).tolist() == [False, True, False, True]


def test_it_needs_a_squeezer(threshold: float) -> None:
    x, y = batch(2)
    with pytest.raises(ValueError, match="expected at least one squeezer"):
        squeeze_adaptive(tiny_model(), x, y, SqueezeAdaptiveSpec(eps=0.1, squeezers=(), threshold=threshold))


def test_the_battery_takes_the_adaptive_adversarys_best_over_both_attacks(threshold: float) -> None:
    x, y = batch(16)
    y = y.clone()
    y[0] = (y[0] + 1) % 4  # wrong to begin with: never evading, never stopped
    stages = {"linf": (Stage("pgd", PGDSpec(eps=1.0, steps=10), "linf"),)}
    plan = AuditPlan(grids={"linf": (0.02, 0.1)}, stages=stages, check_eps={}, batch_size=8, unbounded_steps=5,
                     detector=Detector(SQUEEZERS, threshold, adaptive_steps=10))
    out = run_battery(tiny_model(), x, y, plan, generator=torch.Generator().manual_seed(0))
    evaded = out.evaded_adaptive["linf"]
    oblivious = ~out.robust["linf"].all(0) & ~out.flagged["linf"]  # broken by the suite and not flagged
    oblivious[:, 0] = False
    assert evaded.shape == (2, 16) and not evaded[:, 0].any()
    assert (evaded >= oblivious).all() and (evaded[1] >= evaded[0]).all()  # more eps: a larger ball
    assert evaded[1].sum() > oblivious[1].sum()  # the joint attack adds evasions of its own
    assert out.counters["adaptive_evaded"] > 0 and out.counters["seconds_adaptive"] > 0
    again = run_battery(tiny_model(), x, y, plan, generator=torch.Generator().manual_seed(0))
    assert (again.evaded_adaptive["linf"] == evaded).all()
