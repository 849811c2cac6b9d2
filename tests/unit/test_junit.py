"""JUnit XML of an audit: counts, failure elements, properties, and the error variant, from real
merge output (``tests.unit.real_audits``: the quick Linf audit of a tiny model, 16 inputs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from contracts.gate import evaluate_gate, parse_gate
from contracts.intervals import text as interval_text
from workers.audit.junit import junit_error, junit_xml

from .real_audits import real_audit


def _result() -> dict[str, Any]:
    return real_audit("quick", "linf").result


def _with_gate(*lines: str) -> dict[str, Any]:
    return {**_result(), "gate": evaluate_gate(parse_gate(lines), _result())}


def _properties(suite: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in suite.iter("property")}


def test_one_case_per_gate_line_with_failures() -> None:
    result = _result()
    assert result["clean_accuracy"] == 1.0 and result["robust_accuracy"]["linf:0.1"] < 0.2
    assert result["masking_checks"]["status"] == "warn"
    data = junit_xml(_with_gate("clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.2",
                                "masking_checks == pass"), "adversa audit tiny-net")
    assert data.startswith(b"<?xml")
    root = ET.fromstring(data)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for element in (root, suite):
        assert (element.get("tests"), element.get("failures"), element.get("errors")) == ("3", "2", "0")
    assert suite.get("name") == "adversa audit tiny-net"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.2",
                                               "masking_checks == pass"]
    assert {c.get("classname") for c in cases} == {"adversa.audit.tiny-net@1"}
    assert cases[0].find("failure") is None
    assert cases[0].findtext("system-out") == "measured 1 (95% CI 0.8063-1.0000, n=16) >= 0.9"
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("type") == "gate"
    band = result["intervals"]["robust_accuracy"]["linf:0.1"]
    assert failure.get("message") == (f"measured {result['robust_accuracy']['linf:0.1']:.6g} "
                                      f"({interval_text(band)}), expected >= 0.2")
    assert "robust_accuracy@linf:0.1 >= 0.2" in (failure.text or "")
    masking = cases[2].find("failure")
    assert masking is not None
    assert masking.get("message") == "measured warn (warnings: more-steps-and-restarts-linf), expected == pass"


def test_properties_describe_the_audit() -> None:
    result = _result()
    data = junit_xml(_with_gate("clean_accuracy >= 0.9"), "s", extra_properties={"job": "abc"})
    properties = _properties(ET.fromstring(data).find("testsuite"))  # type: ignore[arg-type]
    bands = result["intervals"]
    expected = {"model": "tiny-net@1", "suite": "quick", "n": "16", "clean_accuracy": "1.0",
                "clean_accuracy.interval": interval_text(bands["clean_accuracy"]), "masking_checks": "warn",
                "verdict": "pass", "job": "abc"}
    for key, value in result["robust_accuracy"].items():
        expected[f"robust_accuracy@{key}"] = str(value)
        expected[f"robust_accuracy@{key}.interval"] = interval_text(bands["robust_accuracy"][key])
    for key, value in result["detector"]["detect_reject_accuracy"].items():
        expected[f"detect_reject_accuracy@{key}"] = str(value)
    assert expected.items() <= properties.items()
    assert list(properties)[-1] == "job"


def test_no_gate_lines_is_one_passing_case() -> None:
    for gate in (None, {"verdict": "pass", "lines": []}):
        root = ET.fromstring(junit_xml({**_result(), "gate": gate}, "s"))
        (case,) = root.iter("testcase")
        assert case.get("name") == "audit completed"
        assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("1", "0", "0")
    root = ET.fromstring(junit_xml({k: v for k, v in _result().items() if k != "masking_checks"}, "s"))
    assert _properties(root.find("testsuite"))["masking_checks"] == ""  # type: ignore[arg-type]


def test_error_variant() -> None:
    message = 'HTTP 422: inputs.dataset: expected "fashion-mnist:test" <got> \x00 & more\nsecond line'
    root = ET.fromstring(junit_error(message, "adversa audit m", model="m"))
    (suite,) = root.findall("testsuite")
    for element in (root, suite):
        assert (element.get("tests"), element.get("failures"), element.get("errors")) == ("1", "0", "1")
    (case,) = suite.findall("testcase")
    assert case.get("classname") == "adversa.audit.m"
    error = case.find("error")
    assert error is not None
    # characters XML cannot carry are replaced, everything else survives escaping
    assert error.get("message") == message.replace("\x00", "\ufffd")
    assert error.text == message.replace("\x00", "\ufffd")
    only = ET.fromstring(junit_error("boom", "s")).find("testsuite/testcase")
    assert only is not None and only.get("classname") == "adversa.audit"
