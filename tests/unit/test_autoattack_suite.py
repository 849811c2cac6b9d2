"""The ``autoattack`` suite (AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square) through
the real battery and merge on the tiny model: its stages, the cascade on survivors, the worst case."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tests.unit.support import CLASSES, batch, tiny_model
from workers.attacks.catalog import KERNELS
from workers.attacks.fab import FABSpec, fab_t
from workers.audit.battery import run_battery
from workers.audit.merge import merge
from workers.audit_jobs import build_plan, stage_names
from workers.specs import AuditSpec

GRID = [0.02, 0.1, 0.3]
SUITE = ["fgsm", "apgd-ce", "apgd-t", "fab-t", "square"]


def spec(suite: str = "autoattack", norms: tuple[str, ...] = ("linf",)) -> AuditSpec:
    grids = {"linf": GRID, "l2": [0.25, 0.5, 1.0]}
    return AuditSpec.model_validate({
        "suite": suite, "grids": {n: grids[n] for n in norms}, "check_eps": {"linf": 0.1, "l2": 0.5},
        "steps": 5, "n_target_classes": 3, "square_queries": 30})


def test_the_suite_is_autoattacks_standard_version() -> None:
    assert KERNELS["fab-t"] == (fab_t, FABSpec)
    bounded, minimal = stage_names(spec(norms=("linf", "l2")), CLASSES)
    assert bounded == {"linf": SUITE, "l2": SUITE} and minimal == {}
    # Two classes: the targeted DLR loss is undefined, APGD-T is left out (FAB-T needs no third class).
    assert stage_names(spec(), 2)[0]["linf"] == ["fgsm", "apgd-ce", "fab-t", "square"]
    plan = build_plan(spec(), None, (), 16, CLASSES)
    assert plan.cascade and build_plan(spec("standard"), None, (), 16, CLASSES).cascade
    per_attack = spec().model_copy(update={"per_attack_curves": True})
    assert not build_plan(per_attack, None, (), 16, CLASSES).cascade
    fab = next(stage for stage in plan.stages["linf"] if stage.name == "fab-t")
    assert fab.spec == FABSpec(eps=1.0, norm="linf", steps=5, n_target_classes=3)


def test_the_cascade_attacks_survivors_only_and_keeps_the_worst_case() -> None:
    x, y = batch(16)
    y[:2] = (y[:2] + 1) % CLASSES  # two inputs wrong to begin with
    plan = build_plan(spec(), None, (), 8, CLASSES)
    cascade_model, independent_model = tiny_model(), tiny_model()
    out = run_battery(cascade_model, x, y, plan, generator=torch.Generator().manual_seed(0))
    robust = out.robust["linf"]  # (stages, eps, n)
    assert robust.shape == (len(SUITE), len(GRID), 16)
    assert not robust[:, :, :2].any()
    assert (np.diff(robust.astype(int), axis=1) <= 0).all(), "robust at a larger eps implies robust at smaller"
    # After the probe, each stage's curve is "robust after it and every stage before it".
    assert (np.diff(robust[1:].astype(int), axis=0) <= 0).all()
    worst = robust.all(0)
    assert (worst == (robust[0] & robust[-1])).all()
    assert ((out.broken_by["linf"] >= 0) == (~worst & (out.labels == out.clean_pred))).all()
    assert worst[0].any() and not worst[-1].any(), "some survive the smallest eps, none the largest"
    # Every kept worst-case image inside its ball and misclassified exactly where the sample fell.
    for e, eps in enumerate(GRID):
        delta = np.abs(out.images["linf"][e] - out.clean_images).reshape(len(out.clean_images), -1).max(1)
        assert (delta <= eps + 1e-9).all()
        keep = len(out.clean_images)
        assert ((out.image_preds["linf"][e] != out.labels[:keep]) == ~worst[e, :keep]).all()

    # The same plan without the cascade attacks every sample with every stage: more gradients.
    run_battery(independent_model, x, y, dataclasses.replace(plan, cascade=False),
                generator=torch.Generator().manual_seed(0))
    assert cascade_model.gradients < independent_model.gradients
    # The bounded more-steps check: PGD with 2x the suite's 5 steps and 1 restart.
    assert out.counters["more_steps_attacked@linf"] > 0
    assert out.counters["more_steps_steps@linf"] == 10 and out.counters["more_steps_restarts@linf"] == 1
    assert out.counters["seconds_suite"] > 0 and out.counters["seconds_checks"] > 0

    result = merge([out], {"linf": GRID}, {"linf": SUITE}, {}, [str(c) for c in range(CLASSES)])
    curves = result["curves"]["linf"]["attacks"]
    assert list(curves) == SUITE
    assert curves["square"] == [float(worst[e].mean()) for e in range(len(GRID))]
