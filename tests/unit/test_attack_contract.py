"""The contract every attack kernel keeps, checked on a tiny seeded model (float64, CPU), and the
contract every entry of the attack registry (``contracts.attacks``) keeps: its kernel and spec
resolve, its Params reach the spec field by field, its flags agree with its Params and kernel."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from contracts.attacks import ATTACKS, AttackEntry, AttackInvalid
from contracts.specs import AttackParams, Targeting
from tests.conftest import REPO
from tests.unit.support import BOUNDS, CLASSES, batch, run, tiny_model
from workers.attacks.apgd import DLR_MIN_CLASSES, APGDSpec, apgd, apgd_t
from workers.attacks.base import AttackOutput, flat_norm
from workers.attacks.catalog import KERNELS, kernel_spec, resolve
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.hop_skip_jump import HopSkipJumpSpec, hop_skip_jump
from workers.attacks.jsma import JSMASpec, jsma
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.square import SquareSpec, square

BLACK_BOX = {KERNELS[name][0] for name, entry in ATTACKS.items() if entry.black_box}
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


# --- the registry: one row per attack -----------------------------------------------------------

# A value for every parameter but ``name`` and the job's own (targets, the generator to load), each
# different from its default, so that a parameter the conversion dropped or renamed shows.
PARAMS: dict[str, dict[str, Any]] = {
    "fgsm": {"norm": "l2", "eps": 0.3, "targeted": True},
    "pgd": {"norm": "l2", "eps": 0.3, "steps": 7, "step_size": 0.05, "random_start": False, "restarts": 2,
            "early_stop": False, "targeted": True},
    "deepfool": {"norm": "linf", "overshoot": 0.05, "max_iter": 20, "candidates": 3, "refine_candidates": None,
                 "first_step_scale": 0.5, "step_scale": 0.9},
    "mi-fgsm": {"norm": "l2", "eps": 0.3, "steps": 5, "step_size": 0.1, "decay": 0.5, "random_start": True,
                "early_stop": False, "targeted": True},
    "carlini-wagner-l2": {"binary_search_steps": 3, "max_iter": 20, "learning_rate": 0.05, "initial_const": 0.1,
                          "confidence": 1.0, "abort_early": False, "abort_hopeless": False, "warm_start": False,
                          "targeted": True},
    "jsma": {"theta": -0.5, "gamma": 0.5, "space": "logits", "targeted": True},
    "apgd-ce": {"norm": "l2", "eps": 0.3, "steps": 10, "restarts": 2, "rho": 0.5, "early_stop": False},
    "apgd-t": {"norm": "l2", "eps": 0.3, "steps": 10, "restarts": 2, "n_target_classes": 2, "rho": 0.5,
               "early_stop": False, "targeted": True},
    "fab-t": {"norm": "l2", "eps": 0.3, "steps": 10, "n_target_classes": 2, "alpha_max": 0.2, "eta": 1.1,
              "beta": 0.8, "early_stop": False, "targeted": True},
    "square": {"norm": "l2", "eps": 0.3, "max_queries": 300, "p_init": 0.1, "early_stop": False,
               "targeted": True},
    "hop-skip-jump": {"norm": "linf", "max_queries": 300, "steps": 10, "initial_num_evals": 50,
                      "max_num_evals": 500, "gamma": 2.0, "targeted": True},
    "advgan": {},
}
# Spec fields that the job loads itself (see ``workers.jobs.load_attack``).
LOADED: dict[str, dict[str, Any]] = {"advgan": {"generator": torch.nn.Identity(), "eps": 0.1, "targeted": True}}
# What a targeted row adds: the job's own field, which the validator asks for.
TARGET_MODE = {"target_mode": "random"}
ENTRIES = list(ATTACKS.values())


def params_of(entry: AttackEntry) -> Any:
    row = PARAMS[entry.name]
    extra = TARGET_MODE if row.get("targeted") else {"generator": "g@1"} if entry.uses_generator else {}
    return entry.params.model_validate({"name": entry.name, **row, **extra})


def test_one_row_per_entry_and_one_member_of_the_params_union_per_entry() -> None:
    assert set(PARAMS) == set(ATTACKS) == set(KERNELS)
    members = typing.get_args(typing.get_args(AttackParams)[0])
    assert [entry.params for entry in ENTRIES] == list(members)
    for entry in ENTRIES:
        assert typing.get_args(entry.params.model_fields["name"].annotation) == (entry.name,)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_kernel_and_spec_resolve(entry: AttackEntry) -> None:
    kernel, spec = resolve(entry.kernel), resolve(entry.spec)
    assert callable(kernel) and dataclasses.is_dataclass(spec)
    assert KERNELS[entry.name] == (kernel, spec)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_spec_conversion_keeps_every_parameter(entry: AttackEntry) -> None:
    fields = set(entry.params.model_fields)
    assert entry.job_fields <= fields
    to_spec = fields - {"name"} - entry.job_fields
    assert to_spec <= {f.name for f in dataclasses.fields(resolve(entry.spec))}
    row = PARAMS[entry.name]
    assert set(row) == to_spec, "expected the row to set every parameter that reaches the spec"
    for field, value in row.items():
        assert value != entry.params.model_fields[field].default, f"{field}: expected a non-default value"
    params = params_of(entry)
    _, spec = kernel_spec(params, LOADED.get(entry.name))
    for field in to_spec:
        assert getattr(spec, field) == getattr(params, field), field
    for field, value in LOADED.get(entry.name, {}).items():
        assert getattr(spec, field) is value


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_flags_agree_with_the_params(entry: AttackEntry) -> None:
    fields = entry.params.model_fields
    assert entry.targeted == issubclass(entry.params, Targeting)
    if "norm" in fields:
        assert set(typing.get_args(fields["norm"].annotation)) == set(entry.norms)
        assert fields["norm"].default == entry.norms[0]
        assert entry.norm(params_of(entry)) == PARAMS[entry.name]["norm"]
    else:
        assert len(entry.norms) == 1
    if entry.minimal:
        assert "eps" not in fields  # its size is the result
    elif not entry.uses_generator:
        assert "eps" in fields
    assert entry.uses_generator == ("generator" in fields)
    if entry.name == "apgd-t":
        assert entry.min_classes == DLR_MIN_CLASSES


ROOMY = SimpleNamespace(max_steps=10**6, max_queries=10**6)
TIGHT = SimpleNamespace(max_steps=1, max_queries=1)
CARD = SimpleNamespace(num_classes=CLASSES, input_shape=(1, 6, 6))


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_budget_rule_bounds_every_budget_parameter(entry: AttackEntry) -> None:
    params = params_of(entry)
    entry.check(params, CARD, ROOMY)
    if {"steps", "max_iter", "max_queries"} & set(entry.params.model_fields):
        with pytest.raises(AttackInvalid):
            entry.check(params, CARD, TIGHT)
    else:
        entry.check(params, CARD, TIGHT)


def test_the_registry_loads_no_kernel() -> None:
    code = ("import sys, contracts.attacks; "
            "assert not {'torch', 'workers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


LIMITS = SimpleNamespace(max_steps=100, max_queries=500)
# The gateway answers these as 422 problems with the same field and message (service.routes.attacks).
VIOLATIONS: list[tuple[dict[str, Any], tuple[int, ...], str, str]] = [
    ({"name": "pgd", "eps": 0.1, "steps": 60, "restarts": 2}, (1, 6, 6), "attack.steps",
     "expected steps x restarts (x target classes) <= 100, got 120"),
    ({"name": "apgd-t", "eps": 0.1, "steps": 10, "n_target_classes": 4}, (1, 6, 6), "attack.n_target_classes",
     "expected at most 3, got 4"),
    ({"name": "fab-t", "eps": 0.1, "steps": 20, "n_target_classes": 9}, (1, 6, 6), "attack.steps",
     "expected steps x restarts (x target classes) <= 100, got 180"),
    ({"name": "carlini-wagner-l2", "binary_search_steps": 2, "max_iter": 51}, (1, 6, 6), "attack.max_iter",
     "expected binary_search_steps x max_iter <= 100, got 102"),
    ({"name": "square", "eps": 0.1, "max_queries": 501}, (1, 6, 6), "attack.max_queries",
     "expected at most 500 queries per image, got 501"),
    ({"name": "hop-skip-jump", "max_queries": 100, "initial_num_evals": 300, "max_num_evals": 200}, (1, 6, 6),
     "attack.initial_num_evals", "expected at most max_num_evals (200), got 300"),
    ({"name": "jsma", "space": "logits"}, (3, 128, 128), "attack.space",
     "expected space 'probabilities' on inputs of more than 16384 values (the logit-space pair search is "
     "quadratic in them), got 49152"),
    ({"name": "deepfool", "max_iter": 101}, (1, 6, 6), "attack.max_iter", "expected at most 100, got 101"),
    ({"name": "deepfool", "candidates": 5}, (1, 6, 6), "attack.candidates",
     "expected at most 4 (the model's classes), got 5"),
]


@pytest.mark.parametrize("attack, shape, field, message", VIOLATIONS, ids=[v[0]["name"] for v in VIOLATIONS])
def test_budget_rule_says_which_field_and_what_was_expected(attack: dict[str, Any], shape: tuple[int, ...],
                                                            field: str, message: str) -> None:
    entry = ATTACKS[attack["name"]]
    with pytest.raises(AttackInvalid) as caught:
        card = SimpleNamespace(num_classes=CLASSES, input_shape=shape)
        entry.check(entry.params.model_validate(attack), card, LIMITS)
    assert (caught.value.field, caught.value.message) == (field, message)


def test_apgd_t_needs_three_classes() -> None:
    params = ATTACKS["apgd-t"].params.model_validate({"name": "apgd-t", "eps": 0.1, "n_target_classes": 1})
    with pytest.raises(AttackInvalid, match="at least 3 classes for the targeted DLR loss, got 2"):
        ATTACKS["apgd-t"].check(params, SimpleNamespace(num_classes=2, input_shape=(1, 6, 6)), ROOMY)
