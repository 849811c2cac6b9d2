"""The audit result's schema (``contracts.audit_result``) against the real merge's output: every suite
and norm, labelled and unlabelled, with a detector, transfer and a gate; and a result that drifts
from it (a key added, dropped, renamed or of another type) is refused, naming the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from contracts.audit_result import AuditResult, check_result
from tests.unit.real_audits import NORMS, SUITES, full_audit, history_audit, real_audit, weak_audit


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_and_norm_fits_the_schema(suite: str, norm: str, labelled: bool) -> None:
    audit = real_audit(suite, norm, labelled)
    typed = check_result(audit.result)
    assert typed.suite == suite and set(typed.curves) == {norm}
    assert typed.labels == ("given" if labelled else "predicted")
    assert (typed.clean_accuracy is None) is (not labelled)
    # Nothing is lost or added on the way: the typed result dumps back to the same figures.
    dumped = typed.model_dump(mode="json", by_alias=True)
    assert dumped["robust_accuracy"] == audit.result["robust_accuracy"]
    assert dumped["intervals"]["robust_accuracy"] == audit.result["intervals"]["robust_accuracy"]


def test_a_result_with_every_section_fits_the_schema() -> None:
    typed = check_result(full_audit().result)
    assert typed.detector is not None and typed.detector.adaptive_detect_reject_accuracy
    assert typed.transfer is not None and typed.transfer[0].eps_label == "linf:0.1"
    assert typed.minimal is not None
    assert set(typed.minimal) == {"deepfool", "deepfool-linf", "carlini-wagner-l2"}
    assert typed.gate is not None and typed.gate.verdict == "fail"
    for audit in (weak_audit(), history_audit(0, "pass"), history_audit(1, None)):
        check_result(audit.result)


def _pop(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def mutate(result: dict[str, Any]) -> None:
        node: Any = result
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1])
    return mutate


def _set(value: Any, *path: str | int) -> Callable[[dict[str, Any]], None]:
    def mutate(result: dict[str, Any]) -> None:
        node: Any = result
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize(("mutate", "field"), [
    (_set(1, "unknown_key"), "unknown_key"),
    (_pop("curves", "linf", "worst_case"), "curves.linf.worst_case"),
    (_set(0.1, "minimal", "deepfool", "median_linf"), "minimal.deepfool"),
    (_pop("transfer", 0, "eps_label"), "transfer.0.eps_label"),
    (_set(True, "masking_checks", "checks", 0, "status"), "masking_checks.checks.0.status"),
    (_set(None, "detector", "adaptive_detect_reject_accuracy"), "detector.adaptive_detect_reject_accuracy"),
    (_set({"lower": 0.1, "upper": 1.5, "k": 1, "n": 2}, "intervals", "clean_accuracy"),
     "intervals.clean_accuracy.upper"),
    (_set("pass", "gate", "lines", 0, "passed"), "gate.lines.0.passed"),
    (_set("robust", "labels"), "labels"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_a_drifting_result_is_refused_naming_the_field(mutate: Callable[[dict[str, Any]], None],
                                                       field: str) -> None:
    result = copy.deepcopy(full_audit().result)
    check_result(result)
    mutate(result)
    with pytest.raises(pydantic.ValidationError) as refused:
        AuditResult.model_validate(result)
    assert field in {".".join(str(p) for p in error["loc"]) for error in refused.value.errors()}, \
        refused.value
