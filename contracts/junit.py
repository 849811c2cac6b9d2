"""JUnit XML of an audit, for CI systems that show test reports: one test case per gate line.

Torch-free, stdlib only (``xml.etree``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from contracts.intervals import text as interval_text

# characters XML 1.0 cannot carry, even escaped
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: Any) -> str:
    return _INVALID_XML.sub("\ufffd", str(value))


def _document(suite_name: str, cases: list[ET.Element], properties: Mapping[str, Any]) -> bytes:
    failures = sum(1 for case in cases if case.find("failure") is not None)
    errors = sum(1 for case in cases if case.find("error") is not None)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors)}
    root = ET.Element("testsuites", {"name": _text(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": _text(suite_name), **counts, "skipped": "0"})
    if properties:
        holder = ET.SubElement(suite, "properties")
        for name, value in properties.items():
            ET.SubElement(holder, "property", {"name": _text(name), "value": _text(value)})
    suite.extend(cases)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _case(name: str, classname: str) -> ET.Element:
    return ET.Element("testcase", {"name": _text(name), "classname": _text(classname), "time": "0"})


def _section(parent: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = parent.get(name)
    return value if isinstance(value, Mapping) else {}


def junit_xml(result: Mapping[str, Any], suite_name: str, *,
              extra_properties: Mapping[str, Any] | None = None) -> bytes:
    """One ``<testcase>`` per gate line of ``result["gate"]`` (a ``<failure type="gate">`` with the
    line's detail when it failed), or one passing ``audit completed`` case when nothing was gated.
    Properties: model, suite, n, clean accuracy, robust accuracy per eps, with a detector the
    detect-and-reject accuracy per eps under the oblivious attacks (``detect_reject_accuracy@...``) and
    under the adaptive one (``adaptive_detect_reject_accuracy@...``) (each rate followed by a
    ``<name>.interval`` property with its 95% interval and sample count), masking status, baseline,
    verdict. A line that compares with the baseline also carries both values, their difference and
    whether it is significant as properties of its test case (and in its message)."""
    model = str(result.get("model") or "model")
    classname = f"adversa.audit.{model}"
    gate = result.get("gate")
    lines = (gate.get("lines") or []) if isinstance(gate, Mapping) else []
    cases = []
    for line in lines:
        case = _case(str(line.get("expression")), classname)
        detail = str(line.get("detail", ""))
        if isinstance(line.get("baseline"), Mapping):  # a regression line: both numbers, as properties too
            holder = ET.SubElement(case, "properties")
            shown = {name: line.get(name) for name in ("value", "baseline_value", "difference", "threshold",
                                                       "significant")}
            shown["baseline_audit"] = line["baseline"].get("audit")
            for name, value in shown.items():
                text = "" if value is None else str(value).lower() if isinstance(value, bool) else value
                ET.SubElement(holder, "property", {"name": name, "value": _text(text)})
        if line.get("passed"):
            ET.SubElement(case, "system-out").text = _text(detail)
        else:
            failure = ET.SubElement(case, "failure", {"message": _text(detail), "type": "gate"})
            failure.text = _text(f"{line.get('expression')}: {detail}")
        cases.append(case)
    if not cases:
        case = _case("audit completed", classname)
        ET.SubElement(case, "system-out").text = "no gate lines; the audit ran to completion"
        cases.append(case)

    masking = result.get("masking_checks")
    properties: dict[str, Any] = {
        "model": model,
        "suite": result.get("suite", ""),
        "n": result.get("n", ""),
        "clean_accuracy": "" if result.get("clean_accuracy") is None else result["clean_accuracy"],
        "masking_checks": masking.get("status", "") if isinstance(masking, Mapping) else "",
    }
    intervals = _section(result, "intervals")
    if ci := interval_text(intervals.get("clean_accuracy")):
        properties["clean_accuracy.interval"] = ci
    robust = result.get("robust_accuracy")
    bands = _section(intervals, "robust_accuracy")
    if isinstance(robust, Mapping):
        for key, value in robust.items():
            properties[f"robust_accuracy@{key}"] = value
            if ci := interval_text(bands.get(key)):
                properties[f"robust_accuracy@{key}.interval"] = ci
    detector = _section(result, "detector")
    for metric in ("detect_reject_accuracy", "adaptive_detect_reject_accuracy"):  # oblivious, adaptive
        table, metric_bands = _section(detector, metric), _section(intervals, metric)
        for key, value in table.items():
            properties[f"{metric}@{key}"] = "" if value is None else value
            if ci := interval_text(metric_bands.get(key)):
                properties[f"{metric}@{key}.interval"] = ci
    baseline = result.get("baseline")
    if isinstance(baseline, Mapping):
        properties["baseline"] = f"{baseline.get('audit')} ({baseline.get('model')})"
    if isinstance(gate, Mapping) and gate.get("verdict"):
        properties["verdict"] = gate["verdict"]
    properties.update(extra_properties or {})
    return _document(suite_name, cases, properties)


def junit_error(message: str, suite_name: str, *, model: str | None = None,
                extra_properties: Mapping[str, Any] | None = None) -> bytes:
    """The report of an audit that could not run or finish: one test case with an ``<error>``."""
    case = _case("audit", f"adversa.audit.{model}" if model else "adversa.audit")
    error = ET.SubElement(case, "error", {"message": _text(message), "type": "error"})
    error.text = _text(message)
    properties = {"model": model or "", **(extra_properties or {})}
    return _document(suite_name, [case], properties)
