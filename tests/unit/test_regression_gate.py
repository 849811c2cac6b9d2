"""Regression gates: lines that compare with a baseline audit (``>= baseline - 0.01``), the
significance of a difference (Newcombe's interval from the two Wilson intervals), and the JUnit
report, on results built by the real merge."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import pytest

from contracts.gate import GateError, baseline_metrics, evaluate_gate, parse_gate, parse_line
from workers.audit.intervals import difference, interval, significant
from workers.audit.junit import junit_xml
from workers.audit.merge import Chunk, merge
from workers.specs import Baseline

GRID = {"linf": [8 / 255, 0.1]}
LINES = ["robust_accuracy@linf:8/255 >= baseline - 0.01", "clean_accuracy >= baseline",
         "robust_accuracy@linf:0.1 >= 0.1"]


def audit(n: int, correct: int, robust: tuple[int, int], model: str) -> dict[str, Any]:
    """A merged audit result of ``n`` samples: ``correct`` classified right, ``robust[e]`` of them
    still right at eps ``e`` of the grid."""
    labels = np.arange(n) % 10
    predictions = labels.copy()
    predictions[correct:] = (labels[correct:] + 1) % 10
    held = np.zeros((2, 2, n), dtype=bool)  # (stages, eps, n)
    for e, k in enumerate(robust):
        held[:, e, :k] = True
    chunk = Chunk(labels=labels, clean_pred=predictions, robust={"linf": held})
    result = merge([chunk], GRID, {"linf": ["fgsm", "pgd"]}, {}, [str(c) for c in range(10)])
    return {**result, "model": model, "suite": "quick"}


def baseline_of(result: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    """What the gateway puts in the audit spec, as the merge reads it."""
    found = Baseline.model_validate({"audit": "b" * 32, "model": result["model"], "created_at": None,
                                     "metrics": baseline_metrics(parse_gate(lines), result)})
    return found.model_dump(mode="json")


@pytest.mark.parametrize(("text", "offset"), [
    ("clean_accuracy >= baseline", 0.0), ("clean_accuracy>=BASELINE", 0.0),
    ("robust_accuracy@linf:8/255 >= baseline - 0.01", -0.01),
    ("robust_accuracy@linf:0.1 > baseline+0.02", 0.02),
    ("transfer_success_rate@linf:0.1 <= baseline + 0.05", 0.05),
    ("median_perturbation@l2 >= baseline - 0.1", -0.1),
])
def test_baseline_lines_parse_to_an_offset(text: str, offset: float) -> None:
    line = parse_line(text)
    assert line.baseline and line.value == offset and line.bound is None


@pytest.mark.parametrize(("text", "expected"), [
    ("robust_accuracy@linf:0.1.lower >= baseline", "no .lower in a baseline comparison"),
    ("masking_checks == baseline", "masking_checks has no baseline"),
    ("clean_accuracy >= baseline - x", "expected a number after 'baseline -'"),
    ("clean_accuracy >= baseline - 2", "expected a fraction in [0, 1]"),
    ("clean_accuracy >= baseline - -0.1", "expected a finite number >= 0"),
    ("clean_accuracy >= baseline * 2", "expected a number after '>='"),
])
def test_bad_baseline_lines_say_what_was_expected(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_line(text)
    assert expected in str(caught.value)


def test_newcombes_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17, table II, example (a): 56/70 - 48/80, method 10
    lower, upper = difference(56, 70, 48, 80)
    assert (round(lower, 4), round(upper, 4)) == (0.0524, 0.3339)
    assert significant(interval(56, 70), interval(48, 80)) is True
    assert significant(interval(9, 20), interval(11, 20)) is False
    assert significant({"lower": 0.1, "upper": 0.2}, interval(1, 2)) is None  # no counts, no verdict


def test_an_unchanged_model_passes_and_a_weakened_one_fails() -> None:
    before = audit(200, 180, (120, 30), "m@1")
    baseline = baseline_of(before, LINES)
    same = evaluate_gate(parse_gate(LINES), audit(200, 180, (120, 30), "m@2"), baseline)
    assert same["verdict"] == "pass"
    robust = same["lines"][0]
    assert (robust["value"], robust["baseline_value"], robust["difference"], robust["significant"]) == (
        0.6, 0.6, 0.0, False)
    assert robust["threshold"] == pytest.approx(0.59) and robust["baseline"]["audit"] == "b" * 32
    assert robust["baseline"]["interval"]["n"] == 200

    weaker = evaluate_gate(parse_gate(LINES), audit(200, 176, (60, 30), "m@3"), baseline)
    assert weaker["verdict"] == "fail"
    robust, clean, fixed = weaker["lines"]
    assert (robust["passed"], robust["value"], robust["baseline_value"], robust["difference"]) == (
        False, 0.3, 0.6, -0.3)
    assert robust["significant"] is True  # 60/200 vs 120/200: far outside the noise
    assert "baseline 0.6" in robust["detail"] and "measured 0.3" in robust["detail"]
    assert (clean["passed"], clean["difference"], clean["significant"]) == (False, -0.02, False)
    assert fixed["passed"] and fixed.get("baseline") is None  # plain lines are judged as before


def test_a_line_without_its_baseline_figure_fails_never_passes() -> None:
    result = audit(50, 45, (20, 5), "m@1")
    lines = parse_gate(["clean_accuracy >= baseline"])
    unnamed = evaluate_gate(lines, result)
    assert unnamed["verdict"] == "fail" and "named none" in unnamed["lines"][0]["detail"]
    lacking = evaluate_gate(lines, result, {"audit": "x", "model": "m@1", "metrics": {}})
    assert lacking["verdict"] == "fail" and "has no clean_accuracy" in lacking["lines"][0]["detail"]


def test_the_baseline_must_hold_every_compared_metric() -> None:
    result = audit(50, 45, (20, 5), "m@1")
    with pytest.raises(GateError) as caught:
        baseline_metrics(parse_gate(["clean_accuracy >= 0.5", "robust_accuracy@linf:0.3 >= baseline"]), result)
    assert caught.value.index == 1 and "robust_accuracy@linf:0.3" in caught.value.message
    unlabelled = {**result, "clean_accuracy": None, "labels": "predicted"}
    with pytest.raises(GateError, match="clean_accuracy"):
        baseline_metrics(parse_gate(["clean_accuracy >= baseline"]), unlabelled)


def test_junit_shows_both_numbers() -> None:
    before = audit(200, 180, (120, 30), "m@1")
    baseline = baseline_of(before, LINES)
    after = audit(200, 176, (60, 30), "m@2")
    result = {**after, "baseline": {"audit": baseline["audit"], "model": "m@1", "created_at": None},
              "gate": evaluate_gate(parse_gate(LINES), after, baseline)}
    root = ET.fromstring(junit_xml(result, "adversa audit m"))
    case = root.find(".//testcase[@name='robust_accuracy@linf:8/255 >= baseline - 0.01']")
    assert case is not None
    values = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert values["value"] == "0.3" and values["baseline_value"] == "0.6" and values["difference"] == "-0.3"
    assert values["significant"] == "true" and values["baseline_audit"] == "b" * 32
    failure = case.find("failure")
    assert failure is not None and "measured 0.3" in str(failure.get("message"))
    assert "baseline 0.6" in str(failure.get("message"))
    suite = {p.get("name"): p.get("value") for p in root.iterfind("testsuite/properties/property")}
    assert suite["baseline"] == f"{'b' * 32} (m@1)"
