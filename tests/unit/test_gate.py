"""The audit gate: parsing threshold lines, the canonical eps labels, judging an audit result.

Every result judged here is real merge output (``tests.unit.real_audits``: the gateway's checks,
chunk jobs, merge job), for every suite and norm, labelled and unlabelled: each metric the result
can answer, and each bound of each rate's 95% interval, is gated by a line that passes and by one
that fails. Results are changed by hand only where a test is about a malformed or older result."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from contracts.gate import (
    METRICS,
    RATES,
    GateError,
    GateLine,
    baseline_metrics,
    eps_key,
    evaluate_gate,
    metric_keys,
    parse_eps,
    parse_eps_key,
    parse_gate,
    parse_line,
)
from contracts.intervals import text as interval_text

from .real_audits import GRIDS, NORMS, SUITES, real_audit

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
    ("robust_acc@linf:0.1 >= 0.4", f"expected a metric among {', '.join(METRICS)}, got 'robust_acc'"),
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
    ("median_perturbation@l2.lower >= 0.5", f"expected .lower on a rate ({', '.join(sorted(RATES))}); "
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


# --- evaluation, on real merge output ------------------------------------------------------------

# (suite, norm, labelled): every suite x norm with labels, and unlabelled inputs in both norms.
CASES = [(suite, norm, True) for suite in SUITES for norm in NORMS] + [("quick", "linf", False),
                                                                        ("standard", "l2", False)]
# The detector section's rates (oblivious, and adaptive where the audit attacks the detector too).
DETECTOR_METRICS = [metric for metric in METRICS if metric.endswith("detect_reject_accuracy")]


def _result(suite: str = "quick", norm: str = "linf", labelled: bool = True) -> dict[str, Any]:
    """A deep copy of the real result, so a test may change it."""
    return copy.deepcopy(real_audit(suite, norm, labelled).result)


def _expected_keys(suite: str, norm: str, labelled: bool, result: dict[str, Any]) -> list[str]:
    """What a client can gate on for this audit, from what it asked (not from the result)."""
    labels = [eps_key(norm, e) for e in GRIDS[norm]]
    keys = ["clean_accuracy"] if labelled else []
    keys += [f"robust_accuracy@{label}" for label in labels]
    if suite == "minimal":  # DeepFool and C&W in L2, and DeepFool in Linf when the grid is Linf
        keys += [f"median_perturbation@{n}" for n in ("linf", "l2") if n == "l2" or norm == "linf"]
    elif suite == "custom":
        keys.append(f"median_perturbation@{norm}")
    keys.append("masking_checks")
    keys += [f"{metric}@{label}" for metric in DETECTOR_METRICS for label in labels]  # tiny-net has a detector
    if (suite, norm) == ("quick", "linf"):
        keys.append("transfer_success_rate@linf:0.1")
    return keys


def _measured(result: dict[str, Any], key: str) -> tuple[float | str, dict[str, Any] | None]:
    """The figure behind a gate key and its 95% interval, read from the result's own fields."""
    metric, _, where = key.partition("@")
    bands = result["intervals"]
    if metric == "clean_accuracy":
        return result["clean_accuracy"], bands["clean_accuracy"]
    if metric == "robust_accuracy":
        return result["robust_accuracy"][where], bands["robust_accuracy"][where]
    if metric in DETECTOR_METRICS:
        return result["detector"][metric][where], bands[metric][where]
    if metric == "transfer_success_rate":
        (run,) = [r for r in result["transfer"] if r["eps_label"] == where]
        return run["success_rate"], bands["transfer_success_rate"][run["surrogate"]]
    if metric == "median_perturbation":
        return min(e[f"median_{where}"] for e in result["minimal"].values() if f"median_{where}" in e), None
    return result["masking_checks"]["status"], None


def _pass_and_fail_lines(key: str, value: float | str, band: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """Lines on ``key`` that must pass and lines that must fail, at the measured value (and at each
    bound of its interval): the gate reads exactly that figure."""
    if isinstance(value, str):
        return [(f"{key} == {value}", True), (f"{key} != {value}", False)]
    lines = [(f"{key} >= {value!r}", True), (f"{key} <= {value!r}", True), (f"{key} > {value!r}", False),
             (f"{key} < {value!r}", False)]
    if band is not None:
        lower, upper = band["lower"], band["upper"]
        lines += [(f"{key}.lower >= {lower!r}", True), (f"{key}.lower > {lower!r}", False),
                  (f"{key}.upper <= {upper!r}", True), (f"{key}.upper < {upper!r}", False)]
    return lines


def _judged(suite: str, norm: str, labelled: bool) -> list[tuple[str, bool, dict[str, Any]]]:
    result = real_audit(suite, norm, labelled).result
    lines = [line for key in metric_keys(result) for line in _pass_and_fail_lines(key, *_measured(result, key))]
    report = evaluate_gate(parse_gate([text for text, _ in lines]), result)
    return [(text, expected, row) for (text, expected), row in zip(lines, report["lines"], strict=True)]


@pytest.mark.parametrize(("suite", "norm", "labelled"), CASES)
def test_every_metric_of_every_suite_and_norm_can_pass_and_fail(suite: str, norm: str, labelled: bool) -> None:
    result = real_audit(suite, norm, labelled).result
    assert metric_keys(result) == _expected_keys(suite, norm, labelled, result)
    for text, expected, row in _judged(suite, norm, labelled):
        assert row["passed"] is expected, (text, row["detail"])
        key = text.split(" ")[0].removesuffix(".lower").removesuffix(".upper")
        value, band = _measured(result, key)
        assert row["estimate"] == value, text
        if row["bound"] is None:
            assert row["value"] == value, text
            assert row["detail"].startswith(f"measured {value if isinstance(value, str) else f'{value:.6g}'}")
        else:  # the bound is compared, the estimate and the interval are said
            assert band is not None and row["value"] == band[row["bound"]]
            assert row["interval"] == {k: band[k] for k in ("lower", "upper", "n")}
            assert row["detail"].startswith(f"measured {row['bound']} bound {band[row['bound']]:.6g} "
                                            f"(estimate {value:.6g}")
            assert interval_text(band) in row["detail"]
        if band is not None:  # every interval holds its estimate and counts the audited samples
            assert band["lower"] <= value <= band["upper"] and band["n"] <= result["n"] == 16


def test_every_metric_and_bound_is_seen_passing_and_failing() -> None:
    """The table above is not vacuous: over all cases, every metric of the gate, plain and (for
    rates) through each bound, has been judged both ways on real output."""
    seen = {(row["metric"], row["bound"], row["passed"]) for case in CASES for _, _, row in _judged(*case)}
    wanted: set[tuple[str, str | None, bool]] = {(metric, None, passed) for metric in METRICS
                                                 for passed in (True, False)}
    wanted |= {(metric, bound, passed) for metric in RATES for bound in ("lower", "upper")
               for passed in (True, False)}
    assert wanted <= seen, sorted(wanted - seen)
    statuses = {real_audit(*case).result["masking_checks"]["status"] for case in CASES}
    assert statuses == {"pass", "warn"}  # masking lines were judged against both statuses


def test_the_merge_judges_the_audits_own_gate_lines() -> None:
    audit = real_audit("quick", "linf")
    result = audit.result
    assert result["gate"] == evaluate_gate(parse_gate(audit.request["thresholds"]), result)
    lower, clean = result["gate"]["lines"]
    band = result["intervals"]["robust_accuracy"]["linf:0.02"]
    # 11 of 16 is a good estimate, but 16 samples cannot show it is above 0.5 at 95%
    assert lower["estimate"] == result["robust_accuracy"]["linf:0.02"] > 0.5 > band["lower"] == lower["value"]
    assert not lower["passed"] and clean["passed"] and result["gate"]["verdict"] == "fail"


@pytest.mark.parametrize(("suite", "norm"), [("quick", "linf"), ("standard", "l2")])
def test_unlabelled_inputs_fail_every_clean_accuracy_line(suite: str, norm: str) -> None:
    result = real_audit(suite, norm, False).result
    assert result["labels"] == "predicted" and result["clean_accuracy"] is None
    lines = ["clean_accuracy >= 0", "clean_accuracy <= 1", "clean_accuracy.lower >= 0",
             "clean_accuracy.upper <= 1"]
    report = evaluate_gate(parse_gate(lines), result)
    assert report["verdict"] == "fail"
    for line in report["lines"]:
        assert not line["passed"] and line["value"] is None
        assert line["detail"].startswith("not measured: clean_accuracy is null: the inputs came without labels")
    # robust accuracy is still measured: how often an attack changes the model's own prediction
    labelled = real_audit(suite, norm).result
    assert result["robust_accuracy"] == labelled["robust_accuracy"]


def test_a_missed_threshold_fails_and_says_by_how_much() -> None:
    result = real_audit("quick", "linf").result
    assert result["robust_accuracy"]["linf:1"] == 0.0  # the whole box: every input broken
    report = evaluate_gate(parse_gate(["clean_accuracy >= 0.9", "robust_accuracy@linf:1 >= 0.2"]), result)
    assert report["verdict"] == "fail"
    ok, missed = report["lines"]
    assert ok["passed"] and ok["value"] == 1.0
    assert ok["detail"] == "measured 1 (95% CI 0.8063-1.0000, n=16) >= 0.9"
    assert not missed["passed"] and missed["value"] == 0.0
    assert missed["detail"] == "measured 0 (95% CI 0.0000-0.1937, n=16), expected >= 0.2"


def test_eps_matches_by_value_not_by_spelling() -> None:
    result = real_audit("quick", "linf").result
    value = result["robust_accuracy"]["linf:0.1"]
    for spelling in ("0.1", "1/10", "25.5/255", "0.10000000001"):
        (line,) = evaluate_gate(parse_gate([f"robust_accuracy@linf:{spelling} >= 0"]), result)["lines"]
        assert line["passed"] and line["value"] == value, spelling
    # but a different norm with the same number is another budget
    assert evaluate_gate(parse_gate(["robust_accuracy@l2:0.1 >= 0"]), result)["verdict"] == "fail"
    # and 8/255 spelled as a decimal finds its entry in a result that names it as a fraction
    changed = _result()
    changed["robust_accuracy"] = {"linf:0.0313725490196": 0.5}
    assert evaluate_gate(parse_gate(["robust_accuracy@linf:8/255 >= 0.4"]), changed)["verdict"] == "pass"


def test_an_eps_outside_the_sweep_fails_and_names_what_was_measured() -> None:
    result = real_audit("quick", "linf").result
    report = evaluate_gate(parse_gate(["robust_accuracy@linf:4/255 >= 0.0"]), result)
    (line,) = report["lines"]
    assert report["verdict"] == "fail" and line["passed"] is False and line["value"] is None
    assert line["detail"] == ("not measured: robust_accuracy has no entry for linf:4/255 "
                              "(the sweep measured linf:0.02, linf:0.1, linf:1)")


def test_masking_warn_fails_an_equals_pass_line() -> None:
    warned = real_audit("quick", "linf").result
    assert [c["name"] for c in warned["masking_checks"]["checks"] if c["status"] == "warn"] == [
        "more-steps-and-restarts-linf"]
    (line,) = evaluate_gate(parse_gate(["masking_checks == pass"]), warned)["lines"]
    assert not line["passed"] and line["value"] == "warn"
    assert line["detail"] == "measured warn (warnings: more-steps-and-restarts-linf), expected == pass"
    assert evaluate_gate(parse_gate(["masking_checks != pass"]), warned)["verdict"] == "pass"
    assert evaluate_gate(parse_gate(["masking_checks == warn"]), warned)["verdict"] == "pass"
    clean = real_audit("quick", "l2").result
    assert clean["masking_checks"]["status"] == "pass"
    assert evaluate_gate(parse_gate(["masking_checks == warn"]), clean)["verdict"] == "fail"
    assert evaluate_gate(parse_gate(["masking_checks == pass"]), clean)["verdict"] == "pass"


@pytest.mark.parametrize(("line", "suite", "missing"), [
    ("transfer_success_rate@linf:0.1 <= 0.5", "standard", "the transfer section did not run"),
    ("median_perturbation@l2 >= 0.1", "quick", "the minimal-perturbation section did not run"),
])
def test_a_section_that_did_not_run_fails_the_line(line: str, suite: str, missing: str) -> None:
    report = evaluate_gate(parse_gate([line]), real_audit(suite, "linf").result)
    assert report["verdict"] == "fail"
    assert report["lines"][0]["detail"].startswith(f"not measured: {missing}")


def test_a_model_without_a_detector_fails_detector_lines() -> None:
    result = real_audit("quick", "linf", model="tiny-saturated").result
    assert result["detector"] is None
    (line,) = evaluate_gate(parse_gate(["detect_reject_accuracy@linf:0.1 >= 0"]), result)["lines"]
    assert not line["passed"]
    assert line["detail"].startswith("not measured: the detector section did not run")


@pytest.mark.parametrize(("line", "section", "missing"), [
    ("clean_accuracy >= 0.0", "clean_accuracy", "clean_accuracy is not in the result"),
    ("masking_checks != warn", "masking_checks", "the result has no masking_checks status"),
    ("detect_reject_accuracy@linf:0.1 >= 0", "detector", "the detector section did not run"),
])
def test_an_older_result_without_a_section_fails_the_line(line: str, section: str, missing: str) -> None:
    result = _result()
    result[section] = None
    report = evaluate_gate(parse_gate([line]), result)
    assert report["verdict"] == "fail"
    assert report["lines"][0]["detail"].startswith(f"not measured: {missing}")
    del result[section]
    assert evaluate_gate(parse_gate([line]), result)["verdict"] == "fail"


def test_detector_transfer_and_median_at_an_unmeasured_budget_fail() -> None:
    result = real_audit("quick", "linf").result
    detector = evaluate_gate(parse_gate(["detect_reject_accuracy@linf:8/255 >= 0.1"]), result)["lines"][0]
    assert detector["detail"] == "not measured: detect_reject_accuracy has no entry for linf:8/255 " \
                                 "(measured linf:0.02, linf:0.1, linf:1)"
    transfer = evaluate_gate(parse_gate(["transfer_success_rate@l2:0.5 <= 1"]), result)["lines"][0]
    assert transfer["detail"] == "not measured: no transfer run at l2:0.5 (measured linf:0.1)"
    custom = real_audit("custom", "linf").result  # DeepFool in Linf only
    median = evaluate_gate(parse_gate(["median_perturbation@l2 >= 0"]), custom)["lines"][0]
    assert median["detail"] == "not measured: no minimal-perturbation attack reported median_l2"


def test_the_strongest_minimal_attack_is_the_one_gated() -> None:
    result = real_audit("minimal", "l2").result
    medians = {name: entry["median_l2"] for name, entry in result["minimal"].items()}
    assert set(medians) == {"deepfool", "carlini-wagner-l2"}
    (line,) = evaluate_gate(parse_gate(["median_perturbation@l2 >= 0"]), result)["lines"]
    strongest = min(medians, key=lambda name: medians[name])
    assert line["value"] == medians[strongest] and f"({strongest})" in line["detail"]


def test_a_non_numeric_measurement_never_passes() -> None:
    result = _result()
    result["robust_accuracy"]["linf:0.1"] = float("nan")
    result["clean_accuracy"] = True
    report = evaluate_gate(parse_gate(["robust_accuracy@linf:0.1 <= 1", "clean_accuracy <= 1"]), result)
    assert [line["passed"] for line in report["lines"]] == [False, False]


def test_no_lines_pass() -> None:
    assert evaluate_gate([], real_audit("quick", "linf").result) == {"verdict": "pass", "lines": []}


def test_a_regression_line_compares_two_real_audits() -> None:
    before, after = real_audit("quick", "linf").result, real_audit("standard", "linf").result
    lines = parse_gate(["robust_accuracy@linf:0.1 >= baseline - 0.2", "robust_accuracy@linf:0.1 >= baseline",
                        "clean_accuracy >= baseline"])
    baseline = {"audit": "before", "model": before["model"], "metrics": baseline_metrics(lines, before)}
    report = evaluate_gate(lines, after, baseline)
    tolerant, strict, clean = report["lines"]
    difference = round(after["robust_accuracy"]["linf:0.1"] - before["robust_accuracy"]["linf:0.1"], 6)
    assert difference < 0  # APGD finds more than PGD on the same samples
    assert tolerant["passed"] and tolerant["difference"] == strict["difference"] == difference
    assert not strict["passed"] and clean["passed"]
    assert tolerant["significant"] is False  # 16 samples: within the noise


def test_metric_keys_lists_what_can_be_gated() -> None:
    assert metric_keys(real_audit("quick", "linf").result) == [
        "clean_accuracy", "robust_accuracy@linf:0.02", "robust_accuracy@linf:0.1", "robust_accuracy@linf:1",
        "masking_checks", "detect_reject_accuracy@linf:0.02", "detect_reject_accuracy@linf:0.1",
        "detect_reject_accuracy@linf:1", "adaptive_detect_reject_accuracy@linf:0.02",
        "adaptive_detect_reject_accuracy@linf:0.1", "adaptive_detect_reject_accuracy@linf:1",
        "transfer_success_rate@linf:0.1"]
    assert metric_keys({"masking_checks": None, "detector": None, "transfer": None}) == []
