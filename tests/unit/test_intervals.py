"""95% Wilson intervals: the arithmetic against known values and scipy, and every rate of a real
audit (``run_battery -> save -> load -> merge``, then gate, JUnit, report) carrying its count and
interval, with ``.lower``/``.upper`` gate lines that pass and fail on them."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import torch
from rich.console import Console
from scipy.stats import binomtest

from contracts.gate import evaluate_gate, parse_gate
from service.cli import _print_summary
from workers.audit.battery import Detector, run_battery
from workers.audit.intervals import interval, wilson
from workers.audit.junit import junit_xml
from workers.audit.merge import merge, nan_to_none
from workers.audit.report import render_report
from workers.audit_jobs import _load, _save, build_plan, stage_names
from workers.specs import AuditSpec

from .support import CLASSES, batch, tiny_model

GRID = [0.02, 0.1, 0.3]
NAMES = [f"class {k}" for k in range(CLASSES)]


# --- the arithmetic -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "lower", "upper"), [
    (8, 10, 0.490, 0.943),   # the textbook example
    (0, 10, 0.000, 0.278),   # never empty at 0/n ...
    (10, 10, 0.722, 1.000),  # ... nor at n/n
    (20, 40, 0.352, 0.648),  # symmetric around one half
    (1, 1, 0.207, 1.000),
])
def test_wilson_known_values(k: int, n: int, lower: float, upper: float) -> None:
    low, high = wilson(k, n)
    assert (round(low, 3), round(high, 3)) == (lower, upper)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (3, 7), (41, 100), (499, 500), (250, 500), (1, 10_000)])
def test_wilson_agrees_with_scipy(k: int, n: int) -> None:
    reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    assert math.isclose(low, reference.low, abs_tol=1e-9) and math.isclose(high, reference.high, abs_tol=1e-9)


def test_the_stored_interval_is_rounded_outwards_and_holds_the_counts() -> None:
    entry = interval(8, 10)
    assert entry == {"k": 8, "n": 10, "lower": 0.4901, "upper": 0.9434}  # 0.490162..., 0.943317...
    assert interval(3, 0) is None
    with pytest.raises(ValueError, match="expected 0 <= k <= n"):
        wilson(11, 10)


# --- a real audit ---------------------------------------------------------------------------------------


def run_audit(thresholds: list[str]) -> dict[str, Any]:
    """The quick suite on the tiny model, two chunks saved and loaded as the chunk jobs do, merged
    and gated; 4 of the 16 labels are wrong, so clean accuracy is 0.75."""
    spec = AuditSpec(suite="quick", grids={"linf": GRID}, check_eps={"linf": 0.3}, steps=5,
                     thresholds=thresholds)
    model = tiny_model()
    x, y = batch(16)
    y[:4] = (y[:4] + 1) % CLASSES
    plan = build_plan(spec, None, (), 8, num_classes=CLASSES)
    chunks = []
    for i in (0, 8):
        found = run_battery(model, x[i:i + 8], y[i:i + 8], plan, generator=torch.Generator().manual_seed(i))
        chunks.append(_load(_save(found, list(found.minimal))))
    bounded, minimal = stage_names(spec, CLASSES)
    result = nan_to_none(merge(chunks, spec.grids, bounded, minimal, NAMES))
    result.update({"model": "tiny@1", "suite": spec.suite, "seed": 0})
    result["gate"] = evaluate_gate(parse_gate(spec.thresholds), result)
    return result


LINES = ["robust_accuracy@linf:0.02.lower >= 0.3",  # 9 of 16 robust: at least 0.33 with 95% confidence
         "robust_accuracy@linf:0.02.lower >= 0.5",  # ... but not 0.5, though the estimate is above it
         "clean_accuracy.upper <= 0.85",  # 12 of 16 correct: the estimate is below, the bound is not
         "robust_accuracy@linf:0.02 >= 0.5"]


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return run_audit(LINES)


def _check(entry: Any, rate: float | None, n: int) -> None:
    assert entry is not None and entry["n"] == n and entry["k"] == round(rate * n)  # type: ignore[operator]
    low, high = wilson(entry["k"], n)
    assert entry["lower"] == pytest.approx(low, abs=1e-4) and entry["upper"] == pytest.approx(high, abs=1e-4)
    assert entry["lower"] <= rate <= entry["upper"]  # type: ignore[operator]


def test_every_rate_of_the_result_has_its_count_and_interval(result: dict[str, Any]) -> None:
    n, bands = result["n"], result["intervals"]
    assert n == 16 and result["clean_accuracy"] == 0.75
    _check(bands["clean_accuracy"], result["clean_accuracy"], n)
    assert list(bands["robust_accuracy"]) == list(result["robust_accuracy"])
    assert list(result["robust_accuracy"]) == ["linf:0.02", "linf:0.1", "linf:0.3"]
    for key, rate in result["robust_accuracy"].items():
        _check(bands["robust_accuracy"][key], rate, n)
    curve, curve_bands = result["curves"]["linf"], bands["curves"]["linf"]
    assert set(curve_bands["attacks"]) == set(curve["attacks"]) == {"fgsm", "pgd"}
    for name, rates in curve["attacks"].items():
        for rate, entry in zip(rates, curve_bands["attacks"][name], strict=True):
            _check(entry, rate, n)
    for rate, entry in zip(curve["worst_case"], curve_bands["worst_case"], strict=True):
        _check(entry, rate, n)
    for row in result["per_class"]:
        _check(row["intervals"]["clean_accuracy"], row["clean_accuracy"], row["n"])
        for key, rate in row["robust_accuracy"].items():
            _check(row["intervals"]["robust_accuracy"][key], rate, row["n"])


def test_lower_and_upper_gate_lines_compare_the_bound(result: dict[str, Any]) -> None:
    robust = result["robust_accuracy"]["linf:0.02"]
    band = result["intervals"]["robust_accuracy"]["linf:0.02"]
    assert 0.3 <= band["lower"] < 0.5 <= robust  # the data this test is about
    passed, failed, upper, plain = result["gate"]["lines"]
    assert passed["passed"] and passed["bound"] == "lower" and passed["value"] == band["lower"]
    assert passed["estimate"] == robust and passed["interval"] == {"lower": band["lower"],
                                                                   "upper": band["upper"], "n": 16}
    ci = f"95% CI {band['lower']:.4f}-{band['upper']:.4f}, n=16"
    assert passed["detail"] == f"measured lower bound {band['lower']:.6g} (estimate {robust:.6g}; {ci}) >= 0.3"
    assert not failed["passed"] and failed["value"] == band["lower"]
    assert failed["detail"].endswith(f"; {ci}), expected >= 0.5")
    clean = result["intervals"]["clean_accuracy"]
    assert not upper["passed"] and upper["value"] == clean["upper"] > 0.85 > result["clean_accuracy"]
    # the same threshold on the estimate passes: the interval is what fails the lower line
    assert plain["passed"] and plain["value"] == robust and ci in plain["detail"]
    assert result["gate"]["verdict"] == "fail"


def test_a_bound_line_on_a_result_without_intervals_is_not_measured(result: dict[str, Any]) -> None:
    older = {k: v for k, v in result.items() if k != "intervals"}
    (line,) = evaluate_gate(parse_gate(["robust_accuracy@linf:0.02.lower >= 0"]), older)["lines"]
    assert not line["passed"] and line["value"] is None
    assert line["detail"].startswith("not measured: the result has no 95% interval for robust_accuracy")


def test_junit_and_report_show_the_intervals(result: dict[str, Any]) -> None:
    root = ET.fromstring(junit_xml(result, "adversa"))
    properties = {str(p.get("name")): str(p.get("value")) for p in root.iter("property")}
    band = result["intervals"]["robust_accuracy"]["linf:0.1"]
    assert properties["robust_accuracy@linf:0.1.interval"] == (
        f"95% CI {band['lower']:.4f}-{band['upper']:.4f}, n=16")
    assert properties["clean_accuracy.interval"].startswith("95% CI 0.")
    failures = [str(f.get("message")) for f in root.iter("failure")]
    assert len(failures) == 2 and all("95% CI" in message for message in failures)

    page = render_report(result, None, NAMES)
    # the worst case's intervals: error bars in the chart (matplotlib draws them as a line
    # collection, absent without intervals), the figures in the table under it
    chart = re.findall(r"<svg.*?</svg>", page, re.S)[0]
    bare = re.findall(r"<svg.*?</svg>", render_report({k: v for k, v in result.items() if k != "intervals"},
                                                      None, NAMES), re.S)[0]
    assert chart.count("LineCollection") > bare.count("LineCollection")
    worst = result["intervals"]["curves"]["linf"]["worst_case"]
    cells = [f"{100 * b['lower']:.1f}–{100 * b['upper']:.1f}%" for b in worst]
    row = re.search(r"<tr><td>worst case, 95% interval</td>.*?</tr>", page)
    assert row is not None and all(cell in row.group(0) for cell in cells)
    clean = result["intervals"]["clean_accuracy"]
    assert f"(95% CI {100 * clean['lower']:.1f}–{100 * clean['upper']:.1f}%, n=16)" in page


def test_the_cli_summary_shows_the_intervals(result: dict[str, Any]) -> None:
    console = Console(record=True, width=240)
    _print_summary(result, result["gate"], "http://adversa/report.html", console)
    text = console.export_text()
    for key in ("clean_accuracy", "robust_accuracy"):
        bands = result["intervals"][key]
        for band in [bands] if key == "clean_accuracy" else bands.values():
            assert f"95% CI {band['lower']:.4f}-{band['upper']:.4f}, n=16" in text
    assert "95% interval" in text and "lower bound" in text


def test_detect_and_reject_figures_carry_their_intervals() -> None:
    lines = ["detect_reject_accuracy@linf:0.1.lower >= 0", "detect_reject_accuracy@linf:0.1.upper < 0.1"]
    spec = AuditSpec(suite="quick", grids={"linf": GRID}, check_eps={"linf": 0.3}, steps=5, thresholds=lines)
    detector = Detector(squeezers=(({"name": "bit-depth", "bits": 2},),), threshold=0.2)
    x, y = batch(16)
    found = run_battery(tiny_model(), x, y, build_plan(spec, detector, (), 16, num_classes=CLASSES),
                        generator=torch.Generator().manual_seed(0))
    bounded, minimal = stage_names(spec, CLASSES)
    result = nan_to_none(merge([_load(_save(found, list(found.minimal)))], spec.grids, bounded, minimal, NAMES,
                               detector={"threshold": 0.2, "fpr": 0.05}))
    bands = result["intervals"]
    for key, rate in result["detector"]["detect_reject_accuracy"].items():
        _check(bands["detect_reject_accuracy"][key], rate, 16)
    for key, rate in result["detector"]["detection_rate"].items():
        broken = round((1 - result["robust_accuracy"][key]) * 16)  # every label is the model's own
        if rate is None:
            assert broken == 0 and bands["detection_rate"][key] is None
        else:
            _check(bands["detection_rate"][key], rate, broken)
    _check(bands["clean_rejection_rate"], result["detector"]["clean_rejection_rate"], 16)
    passed, failed = evaluate_gate(parse_gate(lines), result)["lines"]
    band = bands["detect_reject_accuracy"]["linf:0.1"]
    assert passed["passed"] and passed["value"] == band["lower"]
    assert not failed["passed"] and failed["value"] == band["upper"] >= 0.1  # 16 inputs never say "below 10%"
