"""The audit result: what the merge job returns (``GET /v1/jobs/{id}``'s ``result`` for an audit,
``audit.json``), typed once here and read by everything that reads a result: the merge validates
its own output against it before storing anything, the gate reads its metrics from it, the report
renders it, the CLI checks what the service sent before it prints a summary or a JUnit file.

Every model forbids keys it does not name, so a field that the merge adds, renames or drops fails
the merge's own validation (and the tests that run the real merge for every suite and norm) instead
of reaching a reader that silently skips it. Keys of per-eps figures are ``norm:eps`` labels
(``linf:8/255``, see ``contracts.gate.eps_key``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.specs import AuditSpec

Rate = float | None  # a proportion in [0, 1]; None where nothing was there to count


class Closed(BaseModel):
    """A section of the result: no key beyond those named."""

    model_config = ConfigDict(extra="forbid")


class Interval(Closed):
    """A proportion's 95% confidence interval: ``k`` of ``n``, bounds in [0, 1] (``contracts.intervals``)."""

    k: int = Field(ge=0)
    n: int = Field(ge=0)
    lower: float = Field(ge=0, le=1)
    upper: float = Field(ge=0, le=1)


class Curve(Closed):
    """Robust accuracy over one norm's eps grid: per bounded or minimal attack (each over all ``n``
    inputs; a minimal attack's sample counts as robust up to its perturbation's size) and the worst
    case over them (robust to every attack)."""

    eps: list[float]
    labels: list[str]
    attacks: dict[str, list[Rate]]
    worst_case: list[Rate]


class CurveIntervals(Closed):
    attacks: dict[str, list[Interval | None]]
    worst_case: list[Interval | None]


class ClassIntervals(Closed):
    clean_accuracy: Interval | None
    robust_accuracy: dict[str, Interval | None]


class ClassRow(Closed):
    """One class's figures (classes with no input are left out)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: int = Field(alias="class", ge=0)
    name: str
    n: int = Field(ge=1)
    clean_accuracy: Rate
    robust_accuracy: dict[str, Rate]
    intervals: ClassIntervals


class Minimal(Closed):
    """A minimal-perturbation attack over the correctly classified inputs: how often it found an
    adversarial example and the size of those it found, in its norm (``median_l2`` or ``median_linf``)."""

    model_config = ConfigDict(extra="allow")  # median_<norm>, mean_<norm>: checked below

    success_rate: Rate

    @model_validator(mode="after")
    def _one_norm(self) -> Minimal:
        extra = dict(self.model_extra or {})
        norms = {key.split("_", 1)[1] for key in extra if key.startswith(("median_", "mean_"))}
        allowed = {f"{stat}_{norm}" for norm in norms for stat in ("median", "mean")}
        if len(norms) != 1 or set(extra) != allowed:
            raise ValueError(f"expected median_<norm> and mean_<norm> of one norm, got {sorted(extra)}")
        for key, value in extra.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{key}: expected a number or null, got {value!r}")
        return self


class AdaptiveRun(Closed):
    attack: str
    steps: int | None
    sample_eps_attacked: int = Field(ge=0)
    sample_eps_evaded: int = Field(ge=0)
    seconds: float = Field(ge=0)


class Detector(Closed):
    """The model's calibrated detector (detect-and-reject): its settings, the oblivious figures (the
    suite's examples) and the adaptive one (an attacker that knows the detector); ``evaluations``
    says which attack answers which figure."""

    model: str
    threshold: float
    fpr: float
    squeezers: Any = None
    detection_rate: dict[str, Rate]
    detect_reject_accuracy: dict[str, Rate]
    detection_rate_by_attack: dict[str, dict[str, Rate]]
    adaptive_detect_reject_accuracy: dict[str, Rate]
    evaluations: dict[Literal["oblivious", "adaptive"], str]
    adaptive: AdaptiveRun
    clean_rejection_rate: Rate


class Transfer(Closed):
    """Examples crafted on ``surrogate`` at the transfer eps, scored on the audited model."""

    surrogate: str
    eps_label: str | None
    success_rate: Rate


class Intervals(Closed):
    """The 95% intervals of the result's proportions, keyed like the figures themselves."""

    clean_accuracy: Interval | None
    robust_accuracy: dict[str, Interval | None]
    curves: dict[str, CurveIntervals]
    minimal_success_rate: dict[str, Interval | None] | None = None
    transfer_success_rate: dict[str, Interval | None] | None = None
    clean_rejection_rate: Interval | None = None
    detection_rate: dict[str, Interval | None] | None = None
    detect_reject_accuracy: dict[str, Interval | None] | None = None
    adaptive_detect_reject_accuracy: dict[str, Interval | None] | None = None


class Check(Closed):
    """One masking check: ``pass``, ``warn`` or ``n/a`` (nothing to test), the evidence in words, and
    the figures it was judged on."""

    name: str
    status: Literal["pass", "warn", "n/a"]
    evidence: str
    values: dict[str, Any]


class MaskingChecks(Closed):
    status: Literal["pass", "warn"]
    checks: list[Check]


class GateInterval(Closed):
    lower: float
    upper: float
    n: int


class GateBaseline(Closed):
    audit: str | None
    model: str | None
    value: Any
    interval: GateInterval | None


class GateLineResult(Closed):
    """One evaluated gate line (``contracts.gate.evaluate_line``)."""

    expression: str
    metric: str
    bound: Literal["lower", "upper"] | None
    value: Any
    estimate: Any
    interval: GateInterval | None
    threshold: Any
    passed: bool
    detail: str
    baseline: GateBaseline | None = None
    baseline_value: Any = None
    difference: float | None = None
    significant: bool | None = None


class Gate(Closed):
    verdict: Literal["pass", "fail"]
    lines: list[GateLineResult]


class BaselineRef(Closed):
    audit: str
    model: str
    created_at: str | None


class AuditResult(Closed):
    """An audit's result. ``robust_accuracy`` is the worst case over every attack of the suite, per
    ``norm:eps``; ``clean_accuracy`` is None without labels (``labels`` ``predicted``: the model's
    own predictions stood in for them)."""

    model: str
    suite: Literal["quick", "standard", "autoattack", "minimal", "custom"]
    n: int = Field(ge=0)
    seed: int
    labels: Literal["given", "predicted"]
    clean_accuracy: Rate
    curves: dict[str, Curve]
    robust_accuracy: dict[str, Rate]
    bpda: bool
    eot: bool
    per_class: list[ClassRow]
    minimal: dict[str, Minimal] | None
    minimal_attacks: list[str]
    attacks: dict[str, list[str]]
    detector: Detector | None
    transfer: list[Transfer] | None
    intervals: Intervals
    masking_checks: MaskingChecks
    counters: dict[str, float]
    settings: AuditSpec
    notes: list[str]
    baseline: BaselineRef | None
    gate: Gate | None
    artifacts: list[str]
    merge_seconds: float = Field(ge=0)
    seconds: float = Field(ge=0)


def check_result(result: dict[str, Any]) -> AuditResult:
    """``result`` as an ``AuditResult``; ``pydantic.ValidationError`` naming each field that does
    not fit."""
    return AuditResult.model_validate(result)
