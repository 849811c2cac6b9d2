"""The audit gate: parsing threshold lines, the canonical eps labels, judging an audit result."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from contracts.gate import (
    GateError,
    GateLine,
    eps_key,
    evaluate_gate,
    metric_keys,
    parse_eps,
    parse_eps_key,
    parse_gate,
    parse_line,
)

RESULT: dict[str, Any] = {
    "model": "fmnist-cnn@1",
    "suite": "standard",
    "n": 500,
    "clean_accuracy": 0.92,
    "robust_accuracy": {"linf:1/255": 0.7, "linf:8/255": 0.41, "linf:0.1": 0.0, "l2:0.5": 0.3},
    "minimal": {"deepfool": {"success_rate": 1.0, "median_l2": 0.56, "median_linf": 0.1},
                "carlini-wagner-l2": {"success_rate": 1.0, "median_l2": 0.48, "median_linf": None}},
    "masking_checks": {"status": "pass", "checks": [{"name": "iterations-help", "status": "pass",
                                                     "evidence": "ok"}]},
    "detector": {"detect_reject_accuracy": {"linf:0.1": 0.7}},
    "transfer": [{"surrogate": "fmnist-resnet18", "eps_label": "linf:0.1", "success_rate": 0.4},
                 {"surrogate": "fmnist-mlp", "eps_label": "linf:0.1", "success_rate": 0.25}],
    "gate": None,
}


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("clean_accuracy >= 0.9", GateLine("clean_accuracy >= 0.9", "clean_accuracy", None, None, ">=", 0.9)),
    ("robust_accuracy@linf:8/255 >= 0.4",
     GateLine("robust_accuracy@linf:8/255 >= 0.4", "robust_accuracy", "linf", 8 / 255, ">=", 0.4)),
    ("robust_accuracy@l2:0.5 > 0.25",
     GateLine("robust_accuracy@l2:0.5 > 0.25", "robust_accuracy", "l2", 0.5, ">", 0.25)),
    ("detect_reject_accuracy@linf:0.1 >= 0.6",
     GateLine("detect_reject_accuracy@linf:0.1 >= 0.6", "detect_reject_accuracy", "linf", 0.1, ">=", 0.6)),
    ("median_perturbation@l2 >= 0.5",
     GateLine("median_perturbation@l2 >= 0.5", "median_perturbation", "l2", None, ">=", 0.5)),
    ("median_perturbation@linf < 2",
     GateLine("median_perturbation@linf < 2", "median_perturbation", "linf", None, "<", 2.0)),
    ("masking_checks == pass", GateLine("masking_checks == pass", "masking_checks", None, None, "==", "pass")),
    ("masking_checks != warn", GateLine("masking_checks != warn", "masking_checks", None, None, "!=", "warn")),
    ("transfer_success_rate@linf:0.1 <= 0.3",
     GateLine("transfer_success_rate@linf:0.1 <= 0.3", "transfer_success_rate", "linf", 0.1, "<=", 0.3)),
    ("robust_accuracy@linf:8/255.lower >= 0.4",
     GateLine("robust_accuracy@linf:8/255.lower >= 0.4", "robust_accuracy", "linf", 8 / 255, ">=", 0.4,
              "lower")),
    ("robust_accuracy@linf:0.1.upper < 0.5",
     GateLine("robust_accuracy@linf:0.1.upper < 0.5", "robust_accuracy", "linf", 0.1, "<", 0.5, "upper")),
    ("clean_accuracy.UPPER <= 0.99",
     GateLine("clean_accuracy.UPPER <= 0.99", "clean_accuracy", None, None, "<=", 0.99, "upper")),
    ("detect_reject_accuracy@linf:0.1 .lower >= 0.6",
     GateLine("detect_reject_accuracy@linf:0.1 .lower >= 0.6", "detect_reject_accuracy", "linf", 0.1, ">=", 0.6,
              "lower")),
    ("transfer_success_rate@linf:0.1.upper <= 0.3",
     GateLine("transfer_success_rate@linf:0.1.upper <= 0.3", "transfer_success_rate", "linf", 0.1, "<=", 0.3,
              "upper")),
])
def test_parse_every_metric(text: str, expected: GateLine) -> None:
    assert parse_line(text) == expected


@pytest.mark.parametrize("text", [
    "robust_accuracy@linf:8/255>=0.4",
    "  robust_accuracy@linf:8/255   >=   0.4  ",
    "robust_accuracy @ linf : 8/255 >= 0.4",
    "\trobust_accuracy@LINF:8/255 >= 0.4\n",
])
def test_whitespace_and_case_do_not_matter(text: str) -> None:
    line = parse_line(text)
    assert (line.metric, line.norm, line.eps, line.op, line.value) == ("robust_accuracy", "linf", 8 / 255,
                                                                      ">=", 0.4)
    assert line.expression == text.strip()


def test_a_fraction_and_its_rounded_decimal_are_different_budgets() -> None:
    fraction = parse_line("robust_accuracy@linf:8/255 >= 0.4")
    decimal = parse_line("robust_accuracy@linf:0.0313725 >= 0.4")
    assert fraction.eps == 8 / 255
    assert decimal.eps == 0.0313725
    assert eps_key("linf", fraction.eps) == "linf:8/255"
    assert eps_key("linf", decimal.eps) == "linf:0.0313725"


def test_masking_value_may_be_quoted() -> None:
    assert parse_line('masking_checks == "pass"').value == "pass"


@pytest.mark.parametrize(("text", "expected"), [
    ("", "expected `<metric>[@<norm>:<eps>][.lower|.upper] <op> <value>`, got an empty line"),
    ("robust_accuracy", "with <op> one of >=, >, <=, <, ==, !=, got 'robust_accuracy' (no operator)"),
    (">= 0.4", "no metric before '>='"),
    ("robust_acc@linf:0.1 >= 0.4", "expected a metric among clean_accuracy, robust_accuracy, "
                                   "detect_reject_accuracy, median_perturbation, masking_checks, "
                                   "transfer_success_rate, got 'robust_acc'"),
    ("robust_accuracy@l1:0.1 >= 0.4", "expected a norm among linf, l2 after '@', got 'l1'"),
    ("robust_accuracy@linf:0 >= 0.4", "expected eps > 0, got '0'"),
    ("robust_accuracy@linf:-0.1 >= 0.4", "expected eps > 0, got '-0.1'"),
    ("robust_accuracy@linf:8/0 >= 0.4", "expected eps as a number or a fraction like 8/255, got '8/0'"),
    ("robust_accuracy@linf:abc >= 0.4", "expected eps as a number or a fraction like 8/255, got 'abc'"),
    ("robust_accuracy@linf:nan >= 0.4", "expected eps > 0, got 'nan'"),
    ("robust_accuracy@linf >= 0.4", "robust_accuracy needs an eps after the norm (linf:<eps>)"),
    ("robust_accuracy >= 0.4", "robust_accuracy needs @<norm>:<eps>, e.g. `robust_accuracy@linf:8/255 >= 0.4`"),
    ("detect_reject_accuracy@l2 >= 0.4", "detect_reject_accuracy needs an eps after the norm (l2:<eps>)"),
    ("transfer_success_rate <= 0.4", "transfer_success_rate needs @<norm>:<eps>"),
    ("median_perturbation >= 0.5", "median_perturbation needs @<norm>, e.g. `median_perturbation@l2 >= 0.5`"),
    ("median_perturbation@l2:0.5 >= 0.5", "median_perturbation takes @<norm> only (no eps)"),
    ("clean_accuracy@linf:0.1 >= 0.9", "clean_accuracy takes no @<norm>"),
    ("robust_accuracy@linf:0.1 => 0.4", "expected an operator among >=, >, <=, <, ==, !=, got '=>'"),
    ("clean_accuracy = 0.9", "expected an operator among >=, >, <=, <, ==, !=, got '='"),
    ("clean_accuracy >= high", "expected a number after '>=', got 'high'"),
    ("clean_accuracy >=", "no value after '>='"),
    ("clean_accuracy >= inf", "expected a finite number after '>=', got 'inf'"),
    ("clean_accuracy >= 90", "expected a fraction in [0, 1] for clean_accuracy (0.4, not 40), got '90'"),
    ("median_perturbation@l2 >= -1", "expected a number >= 0 for median_perturbation, got '-1'"),
    ("masking_checks >= pass", "masking_checks compares with == or != only, got '>='"),
    ("masking_checks == ok", "expected masking_checks == pass or warn, got 'ok'"),
    ("robust_accuracy@linf:0.1.mean >= 0.4", "expected .lower or .upper (a bound of the 95% interval) after "
                                             "the metric, got .mean in 'robust_accuracy@linf:0.1.mean >= 0.4'"),
    ("clean_accuracy.low >= 0.9", "expected .lower or .upper (a bound of the 95% interval) after the metric, "
                                  "got .low"),
    ("median_perturbation@l2.lower >= 0.5", "expected .lower on a rate (clean_accuracy, "
                                            "detect_reject_accuracy, robust_accuracy, transfer_success_rate); "
                                            "median_perturbation has no interval"),
    ("masking_checks.upper == pass", "masking_checks has no interval"),
])
def test_errors_say_what_was_expected(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_line(text)
    assert expected in str(info.value)


def test_parse_gate_names_the_failing_line() -> None:
    lines = parse_gate(["clean_accuracy >= 0.9", "masking_checks == pass"])
    assert [line.metric for line in lines] == ["clean_accuracy", "masking_checks"]
    with pytest.raises(GateError) as info:
        parse_gate(["clean_accuracy >= 0.9", "masking_checks == pass", "robust_accuracy@linf >= 0.4"])
    assert info.value.index == 2
    assert str(info.value).startswith("gate line 2: robust_accuracy needs an eps")
    assert isinstance(info.value, ValueError)
    assert parse_gate([]) == []


def test_parse_gate_refuses_a_single_string() -> None:
    with pytest.raises(TypeError):
        parse_gate("clean_accuracy >= 0.9")


# --- eps labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("norm", "eps", "key"), [
    ("linf", 8 / 255, "linf:8/255"),
    ("linf", 1 / 255, "linf:1/255"),
    ("linf", 0.1, "linf:0.1"),
    ("linf", 0.0313725, "linf:0.0313725"),
    ("linf", 8 / 255 + 1e-9, "linf:8/255"),
    ("l2", 0.5, "l2:0.5"),
    ("l2", 1e-9, "l2:1e-09"),
    ("linf", 0.2, "linf:0.2"),  # 51/255 too, but a short decimal reads better
    ("l2", 1.0, "l2:1"),
    ("l2", 3.0, "l2:3"),
])
def test_eps_key(norm: str, eps: float, key: str) -> None:
    assert eps_key(norm, eps) == key


def test_parse_eps_and_keys_round_trip() -> None:
    assert parse_eps(" 8/255 ") == 8 / 255
    assert parse_eps("0.1") == 0.1
    assert parse_eps_key("linf:8/255") == ("linf", 8 / 255)
    assert parse_eps_key("l2:0.5") == ("l2", 0.5)
    assert parse_eps_key("l1:0.5") is None
    assert parse_eps_key("linf") is None
    assert parse_eps_key("linf:x") is None


# --- evaluation ---------------------------------------------------------------------------------

def _judge(*lines: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
    return evaluate_gate(parse_gate(lines), RESULT if result is None else result)


def test_everything_measured_and_met_passes() -> None:
    report = _judge("clean_accuracy >= 0.9", "robust_accuracy@linf:8/255 >= 0.4",
                    "robust_accuracy@l2:0.5 > 0.25", "median_perturbation@l2 >= 0.45",
                    "masking_checks == pass", "detect_reject_accuracy@linf:0.1 >= 0.6",
                    "transfer_success_rate@linf:0.1 <= 0.4")
    assert report["verdict"] == "pass", report
    first, robust, _, median, masking, detector, transfer = report["lines"]
    # a result without intervals (from before they were recorded) is judged on the rates alone
    assert first == {"expression": "clean_accuracy >= 0.9", "metric": "clean_accuracy", "bound": None,
                     "value": 0.92, "estimate": 0.92, "interval": None, "threshold": 0.9, "passed": True,
                     "detail": "measured 0.92 >= 0.9"}
    assert robust["value"] == 0.41 and robust["detail"] == "measured 0.41 >= 0.4"
    # the strongest minimal-perturbation attack (smallest median) is the one gated
    assert median["value"] == 0.48 and "carlini-wagner-l2" in median["detail"]
    assert masking["value"] == "pass"
    assert detector["value"] == 0.7
    # the most successful surrogate is the one gated
    assert transfer["value"] == 0.4 and "fmnist-resnet18" in transfer["detail"]


def test_a_missed_threshold_fails_and_says_by_how_much() -> None:
    report = _judge("clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.2")
    assert report["verdict"] == "fail"
    ok, missed = report["lines"]
    assert ok["passed"] and not missed["passed"]
    assert missed["value"] == 0.0
    assert missed["detail"] == "measured 0, expected >= 0.2"


def test_eps_matches_by_value_not_by_spelling() -> None:
    result = copy.deepcopy(RESULT)
    result["robust_accuracy"] = {"linf:0.0313725490196": 0.5}  # 8/255 spelled as a decimal
    assert _judge("robust_accuracy@linf:8/255 >= 0.4", result=result)["verdict"] == "pass"
    result["robust_accuracy"] = {"linf:8/255": 0.5}
    assert _judge("robust_accuracy@linf:0.03137254902 >= 0.4", result=result)["verdict"] == "pass"
    # but a different norm with the same number is another budget
    result["robust_accuracy"] = {"l2:8/255": 0.5}
    assert _judge("robust_accuracy@linf:8/255 >= 0.4", result=result)["verdict"] == "fail"


def test_an_eps_outside_the_sweep_fails_and_names_what_was_measured() -> None:
    report = _judge("robust_accuracy@linf:4/255 >= 0.0")
    (line,) = report["lines"]
    assert report["verdict"] == "fail" and line["passed"] is False and line["value"] is None
    assert line["detail"] == ("not measured: robust_accuracy has no entry for linf:4/255 "
                              "(the sweep measured linf:1/255, linf:8/255, linf:0.1, l2:0.5)")


def test_masking_warn_fails_an_equals_pass_line() -> None:
    result = copy.deepcopy(RESULT)
    result["masking_checks"] = {"status": "warn", "checks": [
        {"name": "iterations-help", "status": "pass", "evidence": "ok"},
        {"name": "black-box-beats-white-box", "status": "warn", "evidence": "square 0.2 < pgd 0.6"}]}
    report = _judge("masking_checks == pass", result=result)
    (line,) = report["lines"]
    assert report["verdict"] == "fail"
    assert line["value"] == "warn"
    assert line["detail"] == "measured warn (warnings: black-box-beats-white-box), expected == pass"
    assert _judge("masking_checks != pass", result=result)["verdict"] == "pass"
    assert _judge("masking_checks == warn", result=result)["verdict"] == "pass"
    assert _judge("masking_checks == warn")["verdict"] == "fail"


@pytest.mark.parametrize(("line", "section", "missing"), [
    ("detect_reject_accuracy@linf:0.1 >= 0.5", "detector", "the detector section did not run"),
    ("transfer_success_rate@linf:0.1 <= 0.5", "transfer", "the transfer section did not run"),
    ("median_perturbation@l2 >= 0.1", "minimal", "the minimal-perturbation section did not run"),
    ("clean_accuracy >= 0.0", "clean_accuracy", "clean_accuracy is not in the result"),
    ("masking_checks != warn", "masking_checks", "the result has no masking_checks status"),
])
def test_a_section_that_did_not_run_fails_the_line(line: str, section: str, missing: str) -> None:
    result = copy.deepcopy(RESULT)
    result[section] = None
    report = _judge(line, result=result)
    assert report["verdict"] == "fail"
    assert report["lines"][0]["detail"].startswith(f"not measured: {missing}")
    del result[section]
    assert _judge(line, result=result)["verdict"] == "fail"


def test_detector_and_transfer_at_an_unmeasured_eps_fail() -> None:
    detector = _judge("detect_reject_accuracy@linf:8/255 >= 0.1")["lines"][0]
    assert detector["detail"] == "not measured: detect_reject_accuracy has no entry for linf:8/255 " \
                                 "(measured linf:0.1)"
    transfer = _judge("transfer_success_rate@l2:0.5 <= 1")["lines"][0]
    assert transfer["detail"] == "not measured: no transfer run at l2:0.5 (measured linf:0.1)"
    result = copy.deepcopy(RESULT)
    result["minimal"] = {"deepfool": {"success_rate": 0.0, "median_l2": None}}
    median = _judge("median_perturbation@l2 >= 0", result=result)["lines"][0]
    assert median["detail"] == "not measured: no minimal-perturbation attack reported median_l2"


def test_a_non_numeric_measurement_never_passes() -> None:
    result = copy.deepcopy(RESULT)
    result["robust_accuracy"]["linf:0.1"] = float("nan")
    result["clean_accuracy"] = True
    report = _judge("robust_accuracy@linf:0.1 <= 1", "clean_accuracy <= 1", result=result)
    assert [line["passed"] for line in report["lines"]] == [False, False]


def test_no_lines_pass() -> None:
    assert evaluate_gate([], RESULT) == {"verdict": "pass", "lines": []}


def test_metric_keys_lists_what_can_be_gated() -> None:
    assert metric_keys(RESULT) == [
        "clean_accuracy", "robust_accuracy@linf:1/255", "robust_accuracy@linf:8/255",
        "robust_accuracy@linf:0.1", "robust_accuracy@l2:0.5", "median_perturbation@linf",
        "median_perturbation@l2", "masking_checks", "detect_reject_accuracy@linf:0.1",
        "transfer_success_rate@linf:0.1"]
    # every listed key parses and passes a trivially true gate line
    for key in metric_keys(RESULT):
        line = f"{key} == pass" if key == "masking_checks" else f"{key} >= 0"
        assert _judge(line)["verdict"] == "pass", line
    assert metric_keys({"masking_checks": None, "detector": None, "transfer": None}) == []
