"""The audit battery and its merge on tiny models: monotone curves, worst case, BPDA, EOT, and the
masking checks' evidence."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.unit.support import BOUNDS, CLASSES, SHAPE, batch, tiny_model
from workers.attacks.apgd import APGDSpec
from workers.attacks.deepfool import DeepFoolSpec
from workers.attacks.fgsm import FGSMSpec
from workers.attacks.pgd import PGDSpec
from workers.attacks.square import SquareSpec
from workers.audit.battery import AuditPlan, Detector, Stage, run_battery
from workers.audit.merge import Chunk, Tolerances, merge
from workers.classifier import Classifier
from workers.defenses.preprocess import Preprocess, Preprocessed

GRID = (0.02, 0.05, 0.1, 0.3)
NAMES = ["fgsm", "pgd", "square"]


def plan(**overrides: object) -> AuditPlan:
    stages = (Stage("fgsm", FGSMSpec(eps=1.0, check=False), "linf"),
              Stage("pgd", PGDSpec(eps=1.0, steps=10), "linf"),
              Stage("square", SquareSpec(eps=1.0, max_queries=200), "linf"))
    values: dict[str, object] = {"grids": {"linf": GRID}, "stages": {"linf": stages},
                                 "minimal": (Stage("deepfool", DeepFoolSpec(), "l2", bounded=False),),
                                 "check_eps": {"linf": 0.05}, "batch_size": 16, "keep_images": 4}
    values.update(overrides)
    return AuditPlan(**values)  # type: ignore[arg-type]


def test_curves_are_monotone_and_the_worst_case_is_the_minimum() -> None:
    model = tiny_model()
    x, y = batch(40)
    out = run_battery(model, x, y, plan(), generator=torch.Generator().manual_seed(0))
    robust = out.robust["linf"]  # (stages, eps, n)
    assert robust.shape == (3, len(GRID), 40)
    assert (np.diff(robust.astype(int), axis=1) <= 0).all(), "robust at a larger eps implies robust at smaller"
    worst = robust.all(0)
    broken_by = out.broken_by["linf"]
    assert ((broken_by >= 0) == ~worst).all()
    # PGD is at least as strong as FGSM here, and at the largest eps nearly everything falls.
    assert robust[1].sum() <= robust[0].sum()
    assert worst[-1].mean() <= 0.1
    assert out.images["linf"].shape == (len(GRID), 4, *SHAPE)
    assert out.image_preds["linf"].shape == (len(GRID), 4)
    assert np.isfinite(out.minimal["deepfool"]).all()  # DeepFool breaks every input of the tiny model
    counters = out.counters
    assert counters["unbounded_broken"] == counters["unbounded_attacked"] == 40
    assert counters["zero_gradients"] == 0 and counters["random_max_logit_diff"] == 0
    assert "single_step_only@linf:0.05" in counters and "black_box_only@linf:0.02" in counters
    assert counters["more_steps_eps@linf"] == 0.05
    # Same seed, same answer.
    again = run_battery(model, x, y, plan(), generator=torch.Generator().manual_seed(0))
    assert (again.robust["linf"] == robust).all()


def test_merge_of_chunks_equals_merge_of_the_whole() -> None:
    model = tiny_model()
    x, y = batch(40)
    gen = torch.Generator().manual_seed(0)
    whole = run_battery(model, x, y, plan(), generator=gen)
    halves = [run_battery(model, x[i:i + 20], y[i:i + 20], plan(), generator=torch.Generator().manual_seed(0))
              for i in (0, 20)]
    classes = [f"c{i}" for i in range(CLASSES)]
    a = merge([whole], {"linf": GRID}, {"linf": NAMES}, {"deepfool": "l2"}, classes)
    b = merge(list(halves), {"linf": GRID}, {"linf": NAMES}, {"deepfool": "l2"}, classes)
    assert a["n"] == b["n"] == 40 and a["clean_accuracy"] == 1.0
    assert set(a["robust_accuracy"]) == {"linf:0.02", "linf:0.05", "linf:0.1", "linf:0.3"}
    for key, value in a["robust_accuracy"].items():
        assert abs(value - b["robust_accuracy"][key]) <= 0.15  # different random streams per chunk
    curve = a["curves"]["linf"]
    assert curve["labels"] == ["0.02", "0.05", "0.1", "0.3"] and set(curve["attacks"]) == set(NAMES)
    assert all(w <= min(curve["attacks"][s][e] for s in NAMES) for e, w in enumerate(curve["worst_case"]))
    assert sum(row["n"] for row in a["per_class"]) == 40
    assert a["minimal"]["deepfool"]["success_rate"] == 1.0 and a["minimal"]["deepfool"]["median_l2"] > 0
    checks = {c["name"]: c for c in a["masking_checks"]["checks"]}
    assert checks["unbounded-attack-succeeds"]["status"] == "pass"
    assert checks["deterministic-forward-pass"]["status"] == "pass"
    assert checks["gradients-not-vanishing"]["status"] == "pass"


class Saturated(nn.Module):
    """Logits scaled by 1e4: the softmax saturates and cross-entropy gradients underflow to zero,
    as for a distilled network deployed at T=1."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e4


def test_a_saturated_model_warns_about_masking() -> None:
    tiny = tiny_model()
    module = Saturated(tiny.module).eval()
    model = Classifier(module, CLASSES, SHAPE, BOUNDS, "saturated")
    x, y = batch(40)
    out = run_battery(model, x, y, plan(), generator=torch.Generator().manual_seed(0))
    result = merge([out], {"linf": GRID}, {"linf": NAMES}, {"deepfool": "l2"}, ["a", "b", "c", "d"])
    checks = {c["name"]: c for c in result["masking_checks"]["checks"]}
    assert result["masking_checks"]["status"] == "warn"
    assert checks["gradients-not-vanishing"]["status"] == "warn"
    assert "zero input gradient" in checks["gradients-not-vanishing"]["evidence"]


def test_bpda_is_used_for_non_differentiable_models() -> None:
    tiny = tiny_model()
    wrapped = Preprocessed(Preprocess([{"name": "bit-depth", "bits": 6}], BOUNDS), tiny.module).eval()
    model = Classifier(wrapped, CLASSES, SHAPE, BOUNDS, "wrapped", differentiable=False)
    naive = Classifier(wrapped, CLASSES, SHAPE, BOUNDS, "naive", differentiable=True)
    x, y = batch(40)
    y = model.logits(x).argmax(1)
    only_pgd = plan(stages={"linf": (Stage("pgd", PGDSpec(eps=1.0, steps=10, random_start=False), "linf"),)},
                    minimal=())
    honest = run_battery(model, x, y, only_pgd, generator=torch.Generator().manual_seed(0))
    fooled = run_battery(naive, x, y, only_pgd, generator=torch.Generator().manual_seed(0))
    assert honest.bpda and not fooled.bpda
    # Plain gradients through bit depth are zero: PGD without BPDA finds nothing, with BPDA it works.
    assert fooled.robust["linf"][0, 2].mean() == 1.0
    assert honest.robust["linf"][0, 2].mean() < 0.5
    assert fooled.counters["zero_gradients"] == 40


class Noisy(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.01 * torch.randn_like(x))


def test_a_randomized_model_is_attacked_with_eot_and_flagged() -> None:
    tiny = tiny_model()
    model = Classifier(Noisy(tiny.module).eval(), CLASSES, SHAPE, BOUNDS, "noisy")
    x, y = batch(24)
    out = run_battery(model, x, y, plan(minimal=()), generator=torch.Generator().manual_seed(0))
    assert out.eot and out.counters["random_max_logit_diff"] > 0
    result = merge([out], {"linf": GRID}, {"linf": NAMES}, {}, ["a", "b", "c", "d"],
                   tolerances=Tolerances())
    checks = {c["name"]: c for c in result["masking_checks"]["checks"]}
    assert checks["deterministic-forward-pass"]["status"] == "warn" and "EOT" in checks[
        "deterministic-forward-pass"]["evidence"]


def test_detector_and_black_box_evidence_in_the_merge() -> None:
    labels = np.array([0, 1, 2, 3])
    robust = np.array([[[1, 0, 1, 0]], [[1, 0, 0, 0]]], dtype=bool)  # (stages=2, eps=1, n=4)
    chunk = Chunk(labels=labels, clean_pred=labels.copy(), robust={"linf": robust},
                  broken_by={"linf": np.array([[-1, 0, 1, 0]])}, minimal={},
                  flagged={"linf": np.array([[False, True, False, False]])},
                  clean_flagged=np.array([False, False, False, True]), transfer={},
                  counters={"n": 4, "correct": 4, "black_box_only@linf:0.1": 1.0, "unbounded_attacked": 4,
                            "unbounded_broken": 4}, bpda=False, eot=False,
                  flagged_by_stage={"linf": np.array([[[False, True, False, False]],
                                                      [[False, True, True, False]]])})
    result = merge([chunk], {"linf": [0.1]}, {"linf": ["apgd-ce", "square"]}, {}, ["a", "b", "c", "d"],
                   detector={"threshold": 0.5, "fpr": 0.05})
    assert result["robust_accuracy"] == {"linf:0.1": 0.25}
    assert result["curves"]["linf"]["attacks"] == {"apgd-ce": [0.5], "square": [0.25]}
    detector = result["detector"]
    assert detector["detection_rate"]["linf:0.1"] == round(1 / 3, 4)
    assert detector["detect_reject_accuracy"]["linf:0.1"] == 0.5  # robust sample 0 + rejected sample 1
    assert detector["clean_rejection_rate"] == 0.25
    assert detector["detection_rate_by_attack"] == {"apgd-ce": {"linf:0.1": 0.5},
                                                    "square": {"linf:0.1": round(2 / 3, 4)}}
    checks = {c["name"]: c for c in result["masking_checks"]["checks"]}
    assert checks["white-box-beats-black-box"]["status"] == "warn"
    assert "1 sample-eps pair" in checks["white-box-beats-black-box"]["evidence"]


def test_apgd_stages_run_in_the_battery() -> None:
    model = tiny_model()
    x, y = batch(16)
    stages = (Stage("apgd-ce", APGDSpec(eps=1.0, steps=10), "linf"),
              Stage("apgd-t", APGDSpec(eps=1.0, steps=10, n_target_classes=3), "linf"))
    out = run_battery(model, x, y, plan(stages={"linf": stages}, minimal=()),
                      generator=torch.Generator().manual_seed(0))
    assert out.robust["linf"].shape == (2, len(GRID), 16)
    assert out.robust["linf"][:, -1].mean() <= 0.1


def test_the_detector_scores_each_attack_and_the_worst_case() -> None:
    model = tiny_model()
    x, y = batch(24)
    detector = Detector(squeezers=(({"name": "bit-depth", "bits": 2},),), threshold=0.2)
    out = run_battery(model, x, y, plan(detector=detector, minimal=()),
                      generator=torch.Generator().manual_seed(0))
    assert out.flagged["linf"].shape == (len(GRID), 24)
    assert out.flagged_by_stage["linf"].shape == (3, len(GRID), 24)
    assert out.clean_flagged is not None and out.clean_flagged.shape == (24,)
    # Only examples that broke the model are scored per stage.
    assert not (out.flagged_by_stage["linf"] & out.robust["linf"]).any()
