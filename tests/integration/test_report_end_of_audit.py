"""The report at the end of a real audit, in a real browser: ``POST /v1/audits`` to a gateway process,
chunk and merge jobs on a real worker process over Redis, then the report opened in headless
Chromium through its signed link, as a CI log's reader opens it. From the laid-out page (screen
coordinates of the SVG as Chromium draws it) and the audit's own result: the time shown is the
audit's, every series is drawn and visible (each attack's curve in per-attack mode, the PGD curve,
the worst case), the eps axis is numeric from 0 with the clean accuracy there,
and the worst case's 95% intervals are drawn where the result puts them.

"A 0.5 confidence gate" is read as a line on a bound of a 95% interval against 0.5:
``robust_accuracy@linf:0.01.lower >= 0.5`` passes only if the sample shows, at 95% confidence,
that at least half the images withstand eps 0.01. The screenshot is saved in the test's temporary
directory (or ``ADVERSA_UI_SCREENSHOTS``); docs/results/report-end-of-audit.png is one of them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By

from tests.integration.conftest import wait
from tests.integration.test_report_browser import MISSING, browser  # noqa: F401 - the fixture
from tests.integration.test_ui_browser import settled, shots

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no {' or '.join(MISSING)}: `make browser` installs "
                                "Debian's chromium and chromium-driver")
GRID = [0.01, 0.03, 0.1]
GATE = "robust_accuracy@linf:0.01.lower >= 0.5"  # the 0.5 confidence gate (see the docstring)
# A custom suite runs every attack on every sample (per-attack curves, as the standard suite with
# per_attack_curves): PGD, whose curve the worst case used to hide, AutoAttack's three, and the
# FGSM probe the suite adds. Small budgets: one audit of 16 images in two chunks.
ATTACKS = [{"name": "pgd", "eps": 0.1, "steps": 5}, {"name": "apgd-ce", "eps": 0.1, "steps": 5},
           {"name": "apgd-t", "eps": 0.1, "steps": 5, "n_target_classes": 3},
           {"name": "square", "eps": 0.1, "max_queries": 20}]
PX = 1.5  # screen pixels: SVG coordinates are rounded to 1e-6 of a user unit, layout to subpixels

# Where Chromium drew the linf chart: tick marks and labels, each series' line (its vertices in
# screen coordinates and its computed style), the 95% interval segments, the legend's names.
GEOMETRY = """
const svg = document.querySelector('svg[aria-label="Robust accuracy under linf attacks"]');
const centre = el => {
  const r = el.getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2];
};
const vertices = path => {
  const m = path.getScreenCTM();
  const n = (path.getAttribute('d').match(/-?\\d+(?:\\.\\d+)?(?:e-?\\d+)?/g) || []).map(Number);
  const out = [];
  for (let i = 0; i + 1 < n.length; i += 2) {
    const p = new DOMPoint(n[i], n[i + 1]).matrixTransform(m);
    out.push([p.x, p.y]);
  }
  return out;
};
const ticks = axis => Array.from(svg.querySelectorAll(`g[id*="-${axis}tick_"]`))
  .filter(g => g.querySelector('text') && g.querySelector('use'))
  .map(g => {
    const [x, y] = centre(g.querySelector('use'));
    return {label: g.querySelector('text').textContent, x, y};
  });
return {
  box: (r => [r.width, r.height])(svg.getBoundingClientRect()),
  xticks: ticks('x'), yticks: ticks('y'),
  series: Array.from(svg.querySelectorAll('g[id*="-series-"]'), g => {
    const p = g.querySelector('path'), s = getComputedStyle(p), r = p.getBoundingClientRect();
    return {id: g.id, points: vertices(p), stroke: s.stroke,
            opacity: Number(s.strokeOpacity) * Number(s.opacity), width: parseFloat(s.strokeWidth),
            display: s.display, visibility: s.visibility,
            size: [r.width, r.height], markers: g.querySelectorAll('use').length};
  }),
  intervals: Array.from(svg.querySelectorAll('g[id*="-intervals-"] path'),
                        p => ({id: p.parentNode.id, points: vertices(p)})),
  legend: Array.from(svg.querySelectorAll('g[id*="legend"] text'), t => t.textContent),
};
"""


def _duration(seconds: float) -> str:
    """How the report writes a duration (``workers.audit.report``): under a minute, to 0.1 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _scale(ticks: list[dict[str, Any]], axis: str) -> tuple[float, float, list[float]]:
    """(screen position of value 0, pixels per unit, the tick values) from the labelled ticks."""
    values = [float(t["label"].replace("%", "").replace("\u2212", "-")) / (100 if "%" in t["label"] else 1)
              for t in ticks]
    where = [t[axis] for t in ticks]
    per_unit = (where[-1] - where[0]) / (values[-1] - values[0])
    for value, position in zip(values, where, strict=True):  # a linear axis: every tick on the line
        assert position == pytest.approx(where[0] + per_unit * (value - values[0]), abs=PX)
    return where[0] - per_unit * values[0], per_unit, values


def test_the_report_at_the_end_of_an_audit(service: httpx.Client, browser: Chrome,  # noqa: F811
                                           tmp_path: Path) -> None:
    response = service.post("/v1/audits", json={
        "model": "fmnist-cnn", "attacks": ATTACKS, "eps": {"linf": GRID}, "chunk_size": 8, "seed": 0,
        "inputs": {"dataset": "fashion-mnist:test", "offset": 0, "limit": 16}, "thresholds": [GATE]})
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    job = wait(service, audit_id)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    (line,) = result["gate"]["lines"]
    band = result["intervals"]["robust_accuracy"]["linf:0.01"]
    assert line["bound"] == "lower" and line["threshold"] == 0.5 and line["value"] == band["lower"]
    assert line["passed"] is (band["lower"] >= 0.5)

    link = service.get(f"/v1/audits/{audit_id}/report-link")
    assert link.status_code == 200, link.text
    browser.set_window_size(1280, 1500)
    browser.delete_all_cookies()
    browser.get_log("browser")
    browser.get(link.json()["url"])
    assert settled(browser, "Robustness audit") == []
    browser.save_screenshot(str(shots(tmp_path) / "report-end-of-audit.png"))

    # The time is the audit's, from its first chunk to the end of the merge, not the merge's alone.
    shown = browser.find_element(By.XPATH, "//dl[@class='summary']/div[dt='Audit time']/dd").text
    assert result["seconds"] > result["merge_seconds"] > 0
    assert shown == _duration(result["seconds"]) != "0.0 s"

    curve = result["curves"]["linf"]
    attacks = list(curve["attacks"])
    assert attacks == ["fgsm", "pgd", "apgd-ce", "apgd-t", "square"]
    geometry = browser.execute_script(GEOMETRY)
    assert geometry["box"][0] > 300 and geometry["box"][1] > 150

    # Every series is drawn and visible: the worst case first, wide and pale beneath; each attack
    # after it (painted over it), opaque, in the legend in the same order.
    series = geometry["series"]
    assert [s["id"] for s in series] == [f"curve-linf-series-{i}" for i in range(len(attacks) + 1)]
    assert [name for name in geometry["legend"] if name in ("worst case", *attacks)] == ["worst case", *attacks]
    for drawn in series:
        assert drawn["display"] != "none" and drawn["visibility"] == "visible" and drawn["stroke"] != "none"
        assert drawn["opacity"] > 0 and drawn["width"] > 0 and drawn["size"][0] > 0
        assert drawn["markers"] == len(GRID) + 1
    worst, *lines = series
    assert all(s["opacity"] == 1 and s["width"] < worst["width"] for s in lines)
    assert len({s["stroke"] for s in lines}) == len(lines)

    # A numeric eps axis from 0; every series starts there at the clean accuracy, and each point
    # lies where its eps and accuracy put it.
    x0, x_per_eps, x_values = _scale(geometry["xticks"], "x")
    y0, y_per_unit, y_values = _scale(geometry["yticks"], "y")
    assert x_values[0] == 0 and x_values == sorted(x_values) and y_values[0] == 0 and y_values[-1] == 1
    clean = result["clean_accuracy"]
    assert clean is not None and 0 < clean <= 1
    for drawn, values in zip(series, [curve["worst_case"], *curve["attacks"].values()], strict=True):
        assert drawn["points"][0] == pytest.approx([x0, y0 + y_per_unit * clean], abs=PX)
        expected = [[x0 + x_per_eps * e, y0 + y_per_unit * v] for e, v in zip([0.0, *GRID], [clean, *values],
                                                                               strict=True)]
        assert [p for point in drawn["points"] for p in point] == pytest.approx(
            [p for point in expected for p in point], abs=PX)

    # The 95% intervals of the clean accuracy (at eps 0) and of the worst case (at each eps): one
    # vertical segment per point, from the lower to the upper bound.
    bands = [result["intervals"]["clean_accuracy"], *result["intervals"]["curves"]["linf"]["worst_case"]]
    segments = [s["points"] for s in geometry["intervals"] if s["id"] == "curve-linf-intervals-0"]
    drawn_bands = [s for s in segments if not math.isclose(s[0][1], s[1][1], abs_tol=0.01)]
    assert len(drawn_bands) == len(GRID) + 1
    assert {s["id"] for s in geometry["intervals"]} == {"curve-linf-intervals-0"}  # the worst case's only
    for segment, e, interval in zip(drawn_bands, [0.0, *GRID], bands, strict=True):
        assert interval["lower"] < interval["upper"]
        (xa, ya), (xb, yb) = segment
        assert xa == pytest.approx(x0 + x_per_eps * e, abs=PX) and xb == pytest.approx(xa, abs=0.01)
        assert sorted([ya, yb]) == pytest.approx(sorted([y0 + y_per_unit * interval["lower"],
                                                         y0 + y_per_unit * interval["upper"]]), abs=PX)
    table = browser.find_element(By.CSS_SELECTOR, "#robust-accuracy").text
    assert "0 (clean)" in table and "worst case, 95% interval" in table
    for interval in bands:
        assert f"{100 * interval['lower']:.1f}–{100 * interval['upper']:.1f}%" in table
    gate = browser.find_element(By.CSS_SELECTOR, "#gate").text
    assert GATE in gate and re.search(r"lower bound \d", gate)
