"""Uploaded classifiers come in any shape: every kernel, the audit battery through merge and report,
the artifacts, AdvGAN and the defenses on tiny seeded models that are not 1x28x28, 10-class, [0, 1].

Models: RGB 3x32x32 with 8 classes and per-channel normalisation; RGB 3x24x40 (not square) with 3
classes; grayscale 1x20x20 with 2 classes; RGB 3x16x16 with 12 classes on [0, 255] inputs. Budgets
are tiny: this checks the contract (shape, dtype, device, bounds, the eps ball, same seed same
bits), not attack strength. Runs on every available device (CPU, and CUDA where there is one).
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from contracts.gate import eps_key, evaluate_gate, parse_gate
from models.architectures import Normalize
from workers.artifacts import grid_png
from workers.attacks import jsma as jsma_module
from workers.attacks.advgan import AdvGANAttackSpec, advgan
from workers.attacks.apgd import APGDSpec, apgd, apgd_t
from workers.attacks.base import AttackOutput, Norm, flat_norm
from workers.attacks.catalog import KERNELS
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fab import FABSpec, fab_t
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.hop_skip_jump import HopSkipJumpSpec, hop_skip_jump
from workers.attacks.jsma import JSMASpec, jsma
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.square import SquareSpec, square
from workers.audit.battery import AuditPlan, Detector, Stage, run_battery
from workers.audit.merge import merge, nan_to_none, worst_case_rows
from workers.audit.report import ReportSamples, png_data_uri, render_report, report_samples
from workers.audit_jobs import build_plan, stage_names
from workers.classifier import Classifier
from workers.defenses.ensemble import Ensemble
from workers.defenses.preprocess import Preprocess, Preprocessed, build_step
from workers.defenses.squeeze import squeeze_scores
from workers.defenses.training import TrainSpec, soft_labels, train
from workers.generators.advgan import AdvGANSpec, default_hinge_bound, train_advgan
from workers.scores import evaluate, quantize, summarize
from workers.specs import AuditSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 6  # samples per batch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tensors here are tiny: threads only add overhead (several times the run time on a busy
    2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Setup:
    name: str
    shape: tuple[int, int, int]
    classes: int
    bounds: tuple[float, float]
    normalize: bool

    @property
    def span(self) -> float:
        return self.bounds[1] - self.bounds[0]


SETUPS = [
    Setup("rgb32-8cls", (3, 32, 32), 8, (0.0, 1.0), True),
    Setup("rgb24x40-3cls", (3, 24, 40), 3, (0.0, 1.0), True),
    Setup("gray20-2cls", (1, 20, 20), 2, (0.0, 1.0), False),
    Setup("rgb16-12cls-255", (3, 16, 16), 12, (0.0, 255.0), True),
]
BY_NAME = {s.name: s for s in SETUPS}


def body(setup: Setup, seed: int) -> nn.Module:
    """conv - ReLU - max-pool - linear, seeded without touching the global RNG; normalisation in front."""
    channels, height, width = setup.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        if setup.normalize:
            lo, span = setup.bounds[0], setup.span
            mean = tuple(lo + span * m for m in (0.49, 0.48, 0.45)[:channels])
            std = tuple(span * s for s in (0.25, 0.24, 0.26)[:channels])
            layers.append(Normalize(mean, std))
        else:
            layers.append(nn.Identity())
        layers += [nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                   nn.Linear(6 * (height // 2) * (width // 2), setup.classes)]
        return nn.Sequential(*layers)


def classifier(setup: Setup, device: str = "cpu", seed: int = 0) -> Classifier:
    module = body(setup, seed).to(device).eval()
    module.requires_grad_(False)
    return Classifier(module, setup.classes, setup.shape, setup.bounds, setup.name)


def inputs(setup: Setup, device: str = "cpu", n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform inputs in the bounds, labelled with the model's clean predictions (all correct)."""
    g = torch.Generator().manual_seed(seed)
    x = (setup.bounds[0] + setup.span * torch.rand(n, *setup.shape, generator=g)).to(device)
    return x, classifier(setup, device).logits(x).argmax(1)


# --- every kernel, the shared contract ---------------------------------------------------------

Case = tuple[str, Callable[..., AttackOutput], Any, Norm | None]


def cases(setup: Setup) -> list[Case]:
    """``(id, kernel, spec, norm of the eps ball or None)``; eps in input units (fractions of the range)."""
    r = setup.span
    return [
        ("fgsm-linf", fgsm, FGSMSpec(eps=0.03 * r), "linf"),
        ("fgsm-l2-targeted", fgsm, FGSMSpec(eps=0.5 * r, norm="l2", targeted=True), "l2"),
        ("pgd-linf", pgd, PGDSpec(eps=0.03 * r, steps=4), "linf"),
        ("pgd-l2-targeted", pgd, PGDSpec(eps=0.5 * r, norm="l2", steps=4, targeted=True), "l2"),
        ("mi-fgsm-linf-targeted", mi_fgsm, MIFGSMSpec(eps=0.03 * r, steps=4, targeted=True), "linf"),
        ("mi-fgsm-l2-random-start", mi_fgsm, MIFGSMSpec(eps=0.5 * r, norm="l2", steps=4, random_start=True),
         "l2"),
        ("apgd-ce-linf", apgd, APGDSpec(eps=0.03 * r, steps=4), "linf"),
        ("apgd-ce-l2-targeted", apgd, APGDSpec(eps=0.5 * r, norm="l2", steps=4, targeted=True), "l2"),
        ("apgd-dlr-l2", apgd, APGDSpec(eps=0.5 * r, norm="l2", steps=4, loss="dlr"), "l2"),
        ("apgd-dlr-linf-targeted", apgd, APGDSpec(eps=0.03 * r, steps=4, loss="dlr", targeted=True), "linf"),
        ("apgd-t-linf", apgd_t, APGDSpec(eps=0.03 * r, steps=4, n_target_classes=9), "linf"),
        ("apgd-t-l2-targeted", apgd_t, APGDSpec(eps=0.5 * r, norm="l2", steps=4, targeted=True), "l2"),
        ("fab-t-linf", fab_t, FABSpec(eps=0.05 * r, steps=4, n_target_classes=9), "linf"),
        ("fab-t-l2-targeted", fab_t, FABSpec(eps=0.5 * r, norm="l2", steps=4, targeted=True), "l2"),
        ("deepfool-l2", deepfool, DeepFoolSpec(norm="l2", candidates=10, max_iter=10), None),
        ("deepfool-linf-all", deepfool, DeepFoolSpec(norm="linf", candidates=100, refine_candidates=None,
                                                     max_iter=10), None),
        ("cw-l2", carlini_wagner_l2, CarliniWagnerL2Spec(binary_search_steps=2, max_iter=8), None),
        ("cw-l2-targeted", carlini_wagner_l2,
         CarliniWagnerL2Spec(binary_search_steps=2, max_iter=8, targeted=True), None),
        ("jsma-probabilities", jsma, JSMASpec(gamma=0.01), None),
        ("jsma-logits-targeted", jsma, JSMASpec(theta=-0.5, gamma=0.005, space="logits", targeted=True), None),
        ("square-linf", square, SquareSpec(eps=0.05 * r, max_queries=25), "linf"),
        ("square-l2-targeted", square, SquareSpec(eps=0.5 * r, norm="l2", max_queries=25, targeted=True), "l2"),
        ("hop-skip-jump-l2", hop_skip_jump,
         HopSkipJumpSpec(norm="l2", max_queries=80, steps=2, initial_num_evals=8, max_num_evals=16), None),
        ("hop-skip-jump-linf-targeted", hop_skip_jump,
         HopSkipJumpSpec(norm="linf", max_queries=80, steps=2, initial_num_evals=8, max_num_evals=16,
                         targeted=True), None),
    ]


def dlr_needs_three(setup: Setup, spec: Any, kernel: Callable[..., AttackOutput]) -> bool:
    """The DLR losses (APGD-DLR, APGD-T) are not defined on two classes: they must refuse clearly."""
    return setup.classes < 3 and (kernel is apgd_t or getattr(spec, "loss", "ce") == "dlr")


def test_the_table_covers_every_kernel() -> None:
    covered = {case[1] for case in cases(SETUPS[0])} | {advgan}
    assert covered == {kernel for kernel, _ in KERNELS.values()}


def run_case(case: Case, model: Classifier, x: torch.Tensor, y: torch.Tensor, seed: int) -> AttackOutput:
    _, kernel, spec, _ = case
    targets = (y + 1) % model.num_classes if getattr(spec, "targeted", False) else None
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return kernel(model, x, y, spec, targets=targets, generator=gen)


CASE_IDS = [c[0] for c in cases(SETUPS[0])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernel_contract(case_id: str, setup: Setup, device: str) -> None:
    case = next(c for c in cases(setup) if c[0] == case_id)
    _, kernel, spec, norm = case
    model = classifier(setup, device)
    x, y = inputs(setup, device)
    if dlr_needs_three(setup, spec, kernel):
        with pytest.raises(ValueError, match="expected .*at least 3 classes.*got 2"):
            run_case(case, model, x, y, seed=7)
        return
    out = run_case(case, model, x, y, seed=7)
    again = run_case(case, classifier(setup, device), x, y, seed=7)
    lo, hi = setup.bounds
    assert out.x_adv.shape == x.shape and out.x_adv.dtype == x.dtype and out.x_adv.device == x.device
    assert torch.isfinite(out.x_adv).all()
    assert out.x_adv.min() >= lo and out.x_adv.max() <= hi
    if norm is not None:
        eps = spec.eps
        assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-5)
    assert out.queries.shape == (N,) and out.gradients.shape == (N,) and (out.queries >= 1).all()
    if out.success is not None:
        assert out.success.dtype == torch.bool and out.success.shape == (N,)
    assert torch.equal(out.x_adv, again.x_adv), "same seed, same bits"
    if kernel is jsma:
        # At most floor(gamma * C*H*W) features change.
        assert (flat_norm(out.x_adv - x, "l0") <= math.floor(spec.gamma * x[0].numel())).all()


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_attacks_do_something_on_every_shape(setup: Setup) -> None:
    """Units are the model's: a budget of a tenth of the range breaks some inputs of a random net."""
    model = classifier(setup)
    x, y = inputs(setup, n=12)
    out = pgd(model, x, y, PGDSpec(eps=0.1 * setup.span, steps=10), generator=torch.Generator().manual_seed(0))
    assert out.success is not None and bool(out.success.any())
    found = deepfool(model, x, y, DeepFoolSpec(candidates=10))
    assert found.success is not None and bool(found.success.all())
    assert torch.equal(found.success, model.logits(found.x_adv).argmax(1) != y)


class Rescaled(nn.Module):
    """``inner((x - lo) / (hi - lo))``: the same classifier, its inputs in other units."""

    def __init__(self, inner: nn.Module, bounds: tuple[float, float]) -> None:
        super().__init__()
        self.inner, self.lo, self.span = inner, bounds[0], bounds[1] - bounds[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.lo) / self.span)


@pytest.mark.parametrize("bounds", [(0.0, 255.0), (-1.0, 1.0)], ids=["0-255", "-1-1"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_kernels_do_not_depend_on_the_units_of_the_input(case_id: str, bounds: tuple[float, float]) -> None:
    """The same model with inputs in other units, attacked with eps in those units, gives the same
    examples in those units: no kernel assumes [0, 1] (float64, so no decision flips on rounding)."""
    setup = BY_NAME["rgb32-8cls"]
    unit = classifier(setup)
    unit.module.double()
    lo, hi = bounds
    other = Classifier(Rescaled(unit.module, bounds).eval(), setup.classes, setup.shape, bounds, "rescaled")
    x, _ = inputs(setup)
    x = x.double()
    y = unit.logits(x).argmax(1)
    case = next(c for c in cases(setup) if c[0] == case_id)
    if case[1] is carlini_wagner_l2:  # enough budget to find examples, or both runs return x
        case = (case[0], case[1], dataclasses.replace(case[2], max_iter=30, learning_rate=0.1), case[3])
    scaled_spec = case[2]
    for name in ("eps",):
        if hasattr(scaled_spec, name):
            scaled_spec = dataclasses.replace(scaled_spec, **{name: getattr(scaled_spec, name) * (hi - lo)})
    first = run_case(case, unit, x, y, seed=3)
    second = run_case((case[0], case[1], scaled_spec, case[3]), other, lo + (hi - lo) * x, y, seed=3)
    assert torch.allclose((second.x_adv - lo) / (hi - lo), first.x_adv, atol=1e-7)
    if first.success is not None and second.success is not None:
        assert torch.equal(first.success, second.success)
        if case[1] is carlini_wagner_l2:
            assert bool(first.success.any())
    assert torch.equal(first.queries, second.queries) and torch.equal(first.gradients, second.gradients)


def test_dlr_on_three_classes_uses_the_lowest_logits_it_has() -> None:
    """The targeted DLR's denominator ``z_pi1 - (z_pi3 + z_pi4) / 2`` takes ``z_pi3`` for ``z_pi4`` on
    three classes; on four or more it is the paper's."""
    from workers.attacks.apgd import dlr_loss

    logits = torch.tensor([[3.0, 1.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    assert torch.allclose(dlr_loss(logits, y, t), torch.tensor([-(3.0 - 1.0) / (3.0 - (-1.0))]))
    four = torch.tensor([[3.0, 1.0, -1.0, -3.0]])
    assert torch.allclose(dlr_loss(four, y, t), torch.tensor([-(3.0 - 1.0) / (3.0 - (-2.0))]))


# --- large inputs and many classes -----------------------------------------------------------------


def big_model(classes: int = 1000) -> Classifier:
    """3x224x224 with 1000 classes, cheap: average-pool to 8x8, then one linear layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), nn.AdaptiveAvgPool2d(8),
                               nn.Flatten(), nn.Linear(3 * 64, classes)).eval()
    module.requires_grad_(False)
    return Classifier(module, classes, (3, 224, 224), (0.0, 1.0), "big")


def test_large_inputs_and_many_classes() -> None:
    model = big_model()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = model.logits(x).argmax(1)
    gen = torch.Generator().manual_seed(0)
    runs: list[tuple[Callable[..., AttackOutput], Any, Norm | None, float]] = [
        (apgd_t, APGDSpec(eps=0.01, steps=2, n_target_classes=9), "linf", 0.01),
        (deepfool, DeepFoolSpec(candidates=60, refine_candidates=None, max_iter=3), None, 0.0),
        (square, SquareSpec(eps=0.02, max_queries=5), "linf", 0.02),
        (square, SquareSpec(eps=1.0, norm="l2", max_queries=5), "l2", 1.0),
        (hop_skip_jump, HopSkipJumpSpec(max_queries=40, steps=1, initial_num_evals=4, max_num_evals=4),
         None, 0.0),
        (jsma, JSMASpec(gamma=1e-4), None, 0.0),
    ]
    for kernel, spec, norm, eps in runs:
        out = kernel(model, x, y, spec, generator=gen)
        assert out.x_adv.shape == x.shape and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
        if norm is not None:
            assert flat_norm(out.x_adv - x, norm).max() <= eps * (1 + 1e-5)


def test_jsma_pair_search_on_huge_inputs_is_refused_clearly() -> None:
    model = big_model(10)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = model.logits(x).argmax(1)
    queries = model.queries
    with pytest.raises(ValueError, match=r"expected .* features .* got 150528"):
        jsma(model, x, y, JSMASpec(space="logits", gamma=0.01))
    assert model.queries == queries  # refused before any work


def test_jsma_pair_search_is_exact_with_tiled_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the memory cap below one row's pair matrix, the search is tiled and still exact."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    full_best, full_flat = jsma_module._best_pairs(u, v)
    monkeypatch.setattr(jsma_module, "PAIR_MEMORY_BYTES", 40 * 7 * 4 * 2)  # 7 rows of one row's matrix
    best, flat = jsma_module._best_pairs(u, v)
    assert torch.equal(best, full_best) and torch.equal(flat, full_flat)
    score = (u[:, :, None] + u[:, None, :]).clamp(min=0) * (v[:, :, None] + v[:, None, :]).clamp(min=0)
    score.diagonal(dim1=1, dim2=2).zero_()
    assert torch.equal(best, score.flatten(1).amax(1))


# --- the audit battery, every suite, through merge, gate and report ----------------------------------


def audit_spec(suite: str, setup: Setup) -> AuditSpec:
    r = setup.span
    grids = {"linf": [0.01 * r, 0.05 * r]}
    if suite == "minimal":
        grids = {"l2": [0.5 * r, 2.0 * r], "linf": [0.05 * r]}
    attacks = None
    if suite == "custom":
        attacks = [
            {"name": "pgd", "eps": r, "steps": 2},
            {"name": "square", "eps": r, "max_queries": 10},
            {"name": "apgd-t", "eps": r, "steps": 2, "n_target_classes": 9},
            {"name": "jsma", "gamma": 0.005},
            {"name": "hop-skip-jump", "max_queries": 40, "steps": 1, "initial_num_evals": 4,
             "max_num_evals": 4},
        ]
        if setup.classes < 3:
            attacks = [a for a in attacks if a["name"] != "apgd-t"]
    check = {norm: grid[-1] for norm, grid in grids.items()}
    return AuditSpec.model_validate({
        "suite": suite, "attacks": attacks, "grids": grids, "check_eps": check, "steps": 2,
        "n_target_classes": 9, "square_queries": 10, "transfer_eps": 0.05 * r,
        "thresholds": [f"robust_accuracy@{eps_key(next(iter(grids)), next(iter(grids.values()))[0])} >= 0"],
    })


SUITES = ["quick", "standard", "autoattack", "minimal", "custom"]
AUDITED = ["rgb24x40-3cls", "gray20-2cls", "rgb16-12cls-255"]


def png_images(html: str) -> list[Image.Image]:
    import base64

    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("name", AUDITED)
def test_audit_suite_merge_and_report(name: str, suite: str) -> None:
    setup = BY_NAME[name]
    model = classifier(setup)
    x, _ = inputs(setup, n=8)
    y = torch.arange(8) % setup.classes  # some inputs wrong to begin with
    spec = audit_spec(suite, setup)
    detector = Detector(squeezers=(({"name": "bit-depth", "bits": 4},), ({"name": "median", "size": 2},)),
                        threshold=0.5) if suite == "quick" else None
    surrogates = (classifier(setup, seed=5),) if suite == "quick" else ()
    plan = small_budgets(build_plan(spec, detector, surrogates, 4, num_classes=setup.classes))
    chunks = [run_battery(model, x[i:i + 4], y[i:i + 4], plan, generator=torch.Generator().manual_seed(i))
              for i in (0, 4)]
    bounded, minimal = stage_names(spec, setup.classes)
    if suite in ("standard", "autoattack"):
        assert ("apgd-t" in bounded["linf"]) == (setup.classes >= 3)
    classes = [f"class <{k}>" for k in range(setup.classes)]
    info = {"threshold": 0.5, "fpr": 0.05, "model": "squeezer"} if detector is not None else None
    result = nan_to_none(merge(chunks, spec.grids, bounded, minimal, classes, detector=info))
    result.update({"model": setup.name, "suite": suite, "seed": 0})
    result["gate"] = evaluate_gate(parse_gate(spec.thresholds), result)
    assert result["n"] == 8 and result["gate"]["verdict"] == "pass"
    for norm, grid in spec.grids.items():
        curve = result["curves"][norm]
        assert len(curve["worst_case"]) == len(grid)
    header, rows = worst_case_rows(chunks, spec.grids, bounded)
    assert len(rows) == 8 and len(header) == len(rows[0])
    samples = report_samples(chunks, result, spec.grids, spec.check_eps, setup.bounds)
    assert samples is not None and samples.x.shape[1:] == setup.shape
    html = render_report(result, samples, classes)
    assert "class &lt;0&gt;" in html
    images = png_images(html)
    assert len(images) == 3 * samples.x.shape[0]
    expected_mode = "L" if setup.shape[0] == 1 else "RGB"
    assert {im.mode for im in images} == {expected_mode}
    height, width = setup.shape[1:]
    assert all(im.width * height == im.height * width for im in images)  # aspect ratio kept


def small_budgets(plan: AuditPlan) -> AuditPlan:
    """Tiny budgets where ``build_plan`` takes the kernels' defaults (C&W: 9 x 100 iterations)."""
    def small(stage: Stage) -> Stage:
        if stage.name == "carlini-wagner-l2":
            return dataclasses.replace(stage, spec=CarliniWagnerL2Spec(binary_search_steps=2, max_iter=10))
        if stage.name == "deepfool":
            return dataclasses.replace(stage, spec=dataclasses.replace(stage.spec, max_iter=10))
        return stage

    return dataclasses.replace(plan, minimal=tuple(small(stage) for stage in plan.minimal), unbounded_steps=10,
                               more_steps_factor=1, more_restarts=1)


@pytest.mark.parametrize("suite", ["quick", "minimal"])
def test_the_battery_does_not_depend_on_the_units_of_the_input(suite: str) -> None:
    setup = BY_NAME["rgb16-12cls-255"]
    unit_setup = dataclasses.replace(setup, bounds=(0.0, 1.0))
    unit = classifier(unit_setup)
    unit.module.double()
    other = Classifier(Rescaled(unit.module, setup.bounds).eval(), setup.classes, setup.shape, setup.bounds,
                       "rescaled")
    x, _ = inputs(unit_setup, n=6)
    x = x.double()
    y = torch.arange(6) % setup.classes
    results = []
    for model, span in ((unit, 1.0), (other, 255.0)):
        spec = audit_spec(suite, dataclasses.replace(setup, bounds=(0.0, span)))
        plan = small_budgets(build_plan(spec, None, (), 3, num_classes=setup.classes))
        gen = torch.Generator().manual_seed(0)
        results.append((run_battery(model, span * x, y, plan, generator=gen), span))
    (first, _), (second, span) = results
    for norm in first.robust:
        assert (first.robust[norm] == second.robust[norm]).all()
        assert np.allclose(second.images[norm] / span, first.images[norm], atol=1e-7)
    for name, sizes in first.minimal.items():
        assert np.allclose(second.minimal[name] / span, sizes, equal_nan=True)
    # The same counters in the same order; keys name eps in input units, and two values scale.
    def comparable(counters: dict[str, float], span: float) -> list[tuple[str, float]]:
        return [(key.split("@")[0], value / (span if key.startswith("more_steps_eps") else 1.0))
                for key, value in counters.items()
                if key not in ("median_gradient_norm", "mean_l1_logits") and not key.startswith("seconds_")]

    assert comparable(first.counters, 1.0) == comparable(second.counters, span)


def test_report_renders_bounds_and_channels() -> None:
    """A [0, 255] RGB image renders with its colours; other channel counts render as grey tiles."""
    image = np.zeros((3, 4, 6), dtype=np.float32)
    image[0] = 255.0  # pure red on [0, 255]
    picture = png_images(f'src="{png_data_uri(image, (0.0, 255.0))}"')[0]
    assert picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 0, 0)
    assert picture.width * 4 == picture.height * 6
    four = np.random.default_rng(0).uniform(-1, 1, (4, 5, 7)).astype(np.float32)
    grey = png_images(f'src="{png_data_uri(four, (-1.0, 1.0))}"')[0]
    assert grey.mode == "L"
    samples = ReportSamples(x=four[None], x_adv=four[None] * 0.9, labels=np.array([0]),
                            clean_pred=np.array([0]), adv_pred=np.array([1]), eps_label="linf:0.1",
                            bounds=(-1.0, 1.0))
    assert len(png_images(render_report({}, samples, ["a", "b"]))) == 3


# --- artifacts and scores -----------------------------------------------------------------------------


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_grid_png_mode_and_size(setup: Setup) -> None:
    model = classifier(setup)
    x, y = inputs(setup)
    x_adv = fgsm(model, x, y, FGSMSpec(eps=0.05 * setup.span)).x_adv
    image = Image.open(io.BytesIO(grid_png(x.numpy(), x_adv.numpy(), setup.bounds)))
    channels, height, width = setup.shape
    assert image.mode == ("L" if channels == 1 else "RGB")
    scale = image.width // (N * (width + 2) + 2)
    assert scale >= 1
    assert image.size == ((N * (width + 2) + 2) * scale, (3 * (height + 2) + 2) * scale)


def test_grid_png_colours_on_255_bounds_and_big_images() -> None:
    x = np.zeros((1, 3, 2, 2), dtype=np.float32)
    x[:, 2] = 255.0  # blue
    image = Image.open(io.BytesIO(grid_png(x, x, (0.0, 255.0)))).convert("RGB")
    scale = image.width // (2 + 2 + 2)
    assert image.getpixel((2 * scale, 2 * scale)) == (0, 0, 255)
    big = np.random.default_rng(0).uniform(0, 1, (8, 3, 224, 224)).astype(np.float32)
    image = Image.open(io.BytesIO(grid_png(big, big, (0.0, 1.0))))
    assert image.size == (8 * 226 + 2, 3 * 226 + 2)  # not upscaled: big images are big enough


def test_scores_on_255_bounds() -> None:
    setup = BY_NAME["rgb16-12cls-255"]
    model = classifier(setup)
    x, y = inputs(setup)
    x = quantize(x, setup.bounds)  # integer-valued pixels, as from a PNG
    out = pgd(model, x, y, PGDSpec(eps=8.0, steps=5), generator=torch.Generator().manual_seed(0))
    x_q = quantize(out.x_adv, setup.bounds)
    assert torch.allclose(x_q, x_q.round())  # 8 bits over [0, 255] are the integers
    clean = model.logits(x).argmax(1)
    ev = evaluate(model, x, y, out.x_adv, clean, None, 4)
    # Float noise at 255 (~1.5e-5) must not count as a changed feature in L0.
    same = evaluate(model, x, y, x * (1 + 1e-7), clean, None, 4)
    assert (same.l0 == 0).all()
    scores = summarize(ev, y, clean, True, False)
    assert scores["n"] == N and scores["perturbation"]["linf"]["mean"] is None or (
        scores["perturbation"]["linf"]["mean"] <= 8.0 + 1e-4)


# --- AdvGAN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rgb32-8cls", "rgb24x40-3cls"])
def test_advgan_trains_and_attacks(name: str, device: str) -> None:
    setup = BY_NAME[name]
    model = classifier(setup, device)
    x, y = inputs(setup, device, n=8)
    eps = 0.05 * setup.span
    spec = AdvGANSpec(eps=eps, epochs=1, batch_size=4)
    assert spec.hinge_bound is None
    result = train_advgan(model, x, y, spec, generator=torch.Generator().manual_seed(0))
    assert result.steps == 2
    out = advgan(model, x, y, AdvGANAttackSpec(result.generator, eps))
    assert out.x_adv.shape == x.shape and out.x_adv.device == x.device
    assert flat_norm(out.x_adv - x, "linf").max() <= eps * (1 + 1e-6)
    again = train_advgan(classifier(setup, device), x, y, spec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(advgan(model, x, y, AdvGANAttackSpec(again.generator, eps)).x_adv, out.x_adv)
    # Black box: a surrogate of the same shape, distilled from the scores.
    black = AdvGANSpec(eps=eps, epochs=1, batch_size=4, mode="black-box", targeted=True, target=1)
    trained = train_advgan(model, x, y, black, generator=torch.Generator().manual_seed(0),
                           surrogate=body(setup, 3))
    targets = torch.ones_like(y)
    out = advgan(model, x, y, AdvGANAttackSpec(trained.generator, eps, targeted=True), targets=targets)
    assert out.x_adv.min() >= setup.bounds[0] and out.x_adv.max() <= setup.bounds[1]


def test_advgan_default_hinge_bound_scales_with_the_input() -> None:
    assert default_hinge_bound(0.3, (1, 28, 28)) == pytest.approx(0.3 * math.sqrt(0.1 * 28 * 28))
    assert default_hinge_bound(8.0, (3, 16, 16)) == pytest.approx(8.0 * math.sqrt(0.1 * 768))


# --- defenses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rgb24x40-3cls", "gray20-2cls", "rgb16-12cls-255"])
def test_training_recipes(name: str, device: str) -> None:
    setup = BY_NAME[name]
    x, y = inputs(setup, device, n=8)
    eps = 0.03 * setup.span
    teacher = classifier(setup, device).module
    recipes: list[tuple[TrainSpec, torch.Tensor]] = [
        (TrainSpec(epochs=1, batch_size=4), y),
        (TrainSpec(epochs=1, batch_size=4, objective="fgsm", eps=eps), y),
        (TrainSpec(epochs=1, batch_size=4, objective="pgd", eps=eps, pgd_steps=2), y),
        (TrainSpec(epochs=1, batch_size=4, temperature=20.0), soft_labels(teacher, x, 20.0)),
    ]
    for spec, targets in recipes:
        module = body(setup, 1).to(device)
        before = [p.detach().clone() for p in module.parameters()]
        report = train(module, x, targets, spec, bounds=setup.bounds,
                       generator=torch.Generator().manual_seed(0))
        assert report.steps == 2 and math.isfinite(report.final_loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


STEPS: list[dict[str, Any]] = [{"name": "bit-depth", "bits": 3}, {"name": "median", "size": 2},
                               {"name": "median", "size": 3}, {"name": "jpeg", "quality": 75},
                               {"name": "gaussian-blur", "sigma": 1.0}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_preprocessing_steps(setup: Setup, device: str) -> None:
    x, y = inputs(setup, device)
    lo, hi = setup.bounds
    for params in STEPS:
        out = build_step(params, setup.bounds)(x)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, params
        assert out.min() >= lo - 1e-4 * setup.span and out.max() <= hi + 1e-4 * setup.span, params
    model = classifier(setup, device)
    defended = Preprocessed(Preprocess(STEPS, setup.bounds), model.module).eval()
    wrapped = Classifier(defended, setup.classes, setup.shape, setup.bounds, "defended", differentiable=False)
    assert wrapped.logits(x).shape == (N, setup.classes)


def test_jpeg_keeps_colours_on_255_bounds() -> None:
    x = torch.empty(1, 3, 16, 24)
    for c, value in enumerate((200.0, 40.0, 120.0)):
        x[:, c] = value
    out = build_step({"name": "jpeg", "quality": 90}, (0.0, 255.0))(x)
    assert (out - x).abs().max() <= 3.0


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_ensembles_and_feature_squeezing(setup: Setup) -> None:
    x, _ = inputs(setup)
    members = [classifier(setup, seed=s).module for s in (0, 1)]
    for combine in ("mean-probabilities", "majority-vote"):
        assert Ensemble(members, combine).eval()(x).shape == (N, setup.classes)  # type: ignore[arg-type]
    squeezers = [[{"name": "bit-depth", "bits": 1}], [{"name": "median", "size": 2}],
                 [{"name": "jpeg", "quality": 50}]]
    scores = squeeze_scores(members[0], x, squeezers, setup.bounds, batch_size=4)
    assert scores.shape == (N,) and (scores >= 0).all() and (scores <= 2 + 1e-6).all()
