"""JUnit XML of an audit: counts, failure elements, properties, and the error variant."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from contracts.gate import evaluate_gate, parse_gate
from workers.audit.junit import junit_error, junit_xml

RESULT: dict[str, Any] = {
    "model": "fmnist-cnn@1",
    "suite": "standard",
    "n": 500,
    "clean_accuracy": 0.92,
    "robust_accuracy": {"linf:8/255": 0.41, "linf:0.1": 0.0},
    "minimal": None,
    "masking_checks": {"status": "warn", "checks": []},
    "detector": None,
    "transfer": None,
}


def _with_gate(*lines: str) -> dict[str, Any]:
    return {**RESULT, "gate": evaluate_gate(parse_gate(lines), RESULT)}


def _properties(suite: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in suite.iter("property")}


def test_one_case_per_gate_line_with_failures() -> None:
    data = junit_xml(_with_gate("clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.2",
                                "masking_checks == pass"), "adversa audit fmnist-cnn")
    assert data.startswith(b"<?xml")
    root = ET.fromstring(data)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for element in (root, suite):
        assert (element.get("tests"), element.get("failures"), element.get("errors")) == ("3", "2", "0")
    assert suite.get("name") == "adversa audit fmnist-cnn"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["clean_accuracy >= 0.9", "robust_accuracy@linf:0.1 >= 0.2",
                                               "masking_checks == pass"]
    assert {c.get("classname") for c in cases} == {"adversa.audit.fmnist-cnn@1"}
    assert cases[0].find("failure") is None
    assert cases[0].findtext("system-out") == "measured 0.92 >= 0.9"
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("type") == "gate"
    assert failure.get("message") == "measured 0, expected >= 0.2"
    assert "robust_accuracy@linf:0.1 >= 0.2" in (failure.text or "")
    masking = cases[2].find("failure")
    assert masking is not None and masking.get("message") == "measured warn, expected == pass"


def test_properties_describe_the_audit() -> None:
    data = junit_xml(_with_gate("clean_accuracy >= 0.9"), "s", extra_properties={"job": "abc"})
    properties = _properties(ET.fromstring(data).find("testsuite"))  # type: ignore[arg-type]
    assert properties == {"model": "fmnist-cnn@1", "suite": "standard", "n": "500", "clean_accuracy": "0.92",
                          "masking_checks": "warn", "robust_accuracy@linf:8/255": "0.41",
                          "robust_accuracy@linf:0.1": "0.0", "verdict": "pass", "job": "abc"}


def test_no_gate_lines_is_one_passing_case() -> None:
    for gate in (None, {"verdict": "pass", "lines": []}):
        root = ET.fromstring(junit_xml({**RESULT, "gate": gate}, "s"))
        (case,) = root.iter("testcase")
        assert case.get("name") == "audit completed"
        assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("1", "0", "0")
    root = ET.fromstring(junit_xml({k: v for k, v in RESULT.items() if k != "masking_checks"}, "s"))
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
    assert ET.fromstring(junit_error("boom", "s")).find("testsuite/testcase").get("classname") \
        == "adversa.audit"  # type: ignore[union-attr]
