"""The audit report rendered from a result of the real pipeline (the quick battery on the tiny model,
chunks saved and loaded as the chunk jobs do, merged, gated): every series visible, a numeric eps
axis from 0, checks that tested nothing shown as n/a, readable check values, the sample grid at the
gated eps, the audit's time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from contracts.gate import evaluate_gate, parse_gate
from workers.audit.battery import run_battery
from workers.audit.merge import Chunk, merge, nan_to_none
from workers.audit.report import render_report, report_samples, sample_eps
from workers.audit_jobs import _load, _save, build_plan, stage_names
from workers.specs import AuditSpec

from .support import BOUNDS, CLASSES, batch, tiny_model
from .test_report import parse, section, series_group, series_line

GRID = [0.02, 0.05, 0.1, 0.3]  # not equally spaced
NAMES = [f"class {k}" for k in range(CLASSES)]


@dataclass(frozen=True)
class Audit:
    spec: AuditSpec
    chunks: list[Chunk]
    result: dict[str, Any]


def run_audit(thresholds: list[str], check_eps: float = 0.3) -> Audit:
    """What ``_audit_chunk`` and ``_audit_merge`` do, without Redis or a blob store."""
    spec = AuditSpec(suite="quick", grids={"linf": GRID}, check_eps={"linf": check_eps}, steps=5,
                     thresholds=thresholds)
    model = tiny_model()
    x, y = batch(16)
    plan = build_plan(spec, None, (), 8, num_classes=CLASSES)
    chunks = []
    for i in (0, 8):
        found = run_battery(model, x[i:i + 8], y[i:i + 8], plan, generator=torch.Generator().manual_seed(i))
        chunks.append(_load(_save(found, list(found.minimal))))
    bounded, minimal = stage_names(spec, CLASSES)
    result = nan_to_none(merge(chunks, spec.grids, bounded, minimal, NAMES))
    result.update({"model": "tiny@1", "suite": spec.suite, "seed": 0, "attacks": bounded,
                   "minimal_attacks": list(minimal)})
    gate = parse_gate(spec.thresholds)
    result["gate"] = evaluate_gate(gate, result) if gate else None
    result["seconds"] = 754.2
    return Audit(spec, chunks, result)


@pytest.fixture(scope="module")
def audit() -> Audit:
    return run_audit(["robust_accuracy@linf:0.05 >= 0.1", "clean_accuracy >= 0.9"])


def render(audit: Audit) -> str:
    samples = report_samples(audit.chunks, audit.result, audit.spec.grids, audit.spec.check_eps, BOUNDS)
    return render_report(audit.result, samples, NAMES)


def chart(page: str) -> str:
    charts = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(charts) == 1
    return charts[0]  # type: ignore[no-any-return]


def row(html: str, name: str) -> str:
    found = [r for r in re.findall(r"<tr>.*?</tr>", html, re.S) if f">{name}<" in r]
    assert len(found) == 1, name
    return found[0]


def test_every_series_is_visible(audit: Audit) -> None:
    curve = audit.result["curves"]["linf"]
    assert curve["attacks"]["pgd"] == curve["worst_case"]  # the case of the issue: PGD sets the worst case
    svg = chart(render(audit))
    parse(svg)
    legend = svg[svg.index('id="curve-linf-legend'):]
    order = [legend.find(f">{name}</text>") for name in ("worst case", "fgsm", "pgd")]
    assert min(order) >= 0 and order == sorted(order)  # the worst case first, drawn below
    worst, attacks = series_line(svg, "linf", 0)[1], [series_line(svg, "linf", i)[1] for i in (1, 2)]
    assert worst.get("stroke-dasharray") and float(worst.get("stroke-opacity", 1)) < 1
    assert float(worst["stroke-width"]) > max(float(a["stroke-width"]) for a in attacks)
    # Attacks that coincide are told apart by colour and dash, and by marker shape; every point has
    # its marker, hollow, so that markers below show through.
    assert len({(a["stroke"], a.get("stroke-dasharray")) for a in attacks}) == len(attacks)
    shapes = []
    for i in (1, 2):
        group = series_group(svg, "linf", i)
        uses = re.findall(r'<use xlink:href="#(m[0-9a-f]+)"[^>]*style="([^"]*)"', group)
        assert len(uses) == len(GRID) + 1
        assert all("fill-opacity: 0" in style for _, style in uses)
        assert len({marker for marker, _ in uses}) == 1
        shapes.append(re.search(rf'<path id="{uses[0][0]}" d="([^"]*)"', group).group(1))  # type: ignore[union-attr]
    assert shapes[0] != shapes[1]


def test_eps_is_a_numeric_axis_from_zero_with_the_clean_accuracy_there(audit: Audit) -> None:
    svg = chart(render(audit))
    parse(svg)
    clean = audit.result["clean_accuracy"]
    curve = audit.result["curves"]["linf"]
    for i, name in enumerate(["worst case", *curve["attacks"]]):
        points, _ = series_line(svg, "linf", i)
        xs, ys = [x for x, _ in points], [y for _, y in points]
        values = [clean, *(curve["worst_case"] if name == "worst case" else curve["attacks"][name])]
        eps = [0.0, *GRID]
        # x proportional to eps (0.02 and 0.05 are closer than 0.1 and 0.3), y linear in accuracy.
        scale = (xs[-1] - xs[0]) / eps[-1]
        assert xs == pytest.approx([xs[0] + scale * e for e in eps], abs=0.1)
        slope = (ys[-1] - ys[0]) / (values[-1] - values[0])
        assert ys == pytest.approx([ys[0] + slope * (v - values[0]) for v in values], abs=0.1)
    ticks = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert {"0.00", "0.10", "0.20", "0.30"} <= set(ticks)  # numeric ticks from 0
    table = section(render(audit), "robust-accuracy")
    assert "0 (clean)" in table and "100.0%" in table


def test_checks_that_tested_nothing_show_n_a(audit: Audit) -> None:
    checks = {c["name"]: c for c in audit.result["masking_checks"]["checks"]}
    more = checks["more-steps-and-restarts-linf"]
    assert more["values"]["attacked"] == 0 and more["status"] in ("pass", "n/a")
    masking = section(render(audit), "gradient-masking-checks")
    tested_nothing = row(masking, "more-steps-and-restarts-linf")
    assert "n/a" in tested_nothing and "pass" not in tested_nothing.split("</td>")[1]
    assert "✔ pass" in row(masking, "unbounded-attack-succeeds")
    na = {**audit.result, "masking_checks": {"status": "pass", "checks": [{**more, "status": "n/a"}]}}
    assert "– n/a" in section(render_report(na, None, NAMES), "gradient-masking-checks")


def test_check_values_are_readable_text(audit: Audit) -> None:
    masking = section(render(audit), "gradient-masking-checks")
    values = [cells.split("<td")[-1] for cells in re.findall(r"<tr>.*?</tr>", masking, re.S)[1:]]
    assert values and not any(ch in cell for cell in values for ch in "{}[]'")
    assert "by eps: linf:0.02 = 0, linf:0.05 = 0" in row(masking, "iterative-not-weaker-than-single-step")
    assert "curve: 75.0%, 37.5%, 12.5%, 0.0%" in row(masking, "success-grows-with-eps-linf")
    assert "success rate = 100.0%" in row(masking, "unbounded-attack-succeeds")


def test_the_sample_grid_is_drawn_at_the_gated_eps(audit: Audit) -> None:
    samples = report_samples(audit.chunks, audit.result, audit.spec.grids, audit.spec.check_eps, BOUNDS)
    assert samples is not None and samples.eps_label == "linf:0.05"  # the gate's, not the check eps 0.3
    e = GRID.index(0.05)
    first = audit.chunks[0]
    broken = [i for i in range(first.images["linf"].shape[1]) if first.broken_by["linf"][e, i] >= 0]
    assert broken
    np.testing.assert_array_equal(samples.x_adv[0], first.images["linf"][e, broken[0]])
    assert samples.adv_pred[0] == first.image_preds["linf"][e, broken[0]]
    assert "<code>linf:0.05</code>" in section(render(audit), "sample-images")


def test_without_a_robust_accuracy_gate_the_grid_eps_nearest_the_check_eps(audit: Audit) -> None:
    # No robust-accuracy line on a norm that has images: the check eps (0.09) decides.
    lines = ["clean_accuracy >= 0.5", "robust_accuracy@l2:1 >= 0"]
    ungated = {**audit.result, "gate": evaluate_gate(parse_gate(lines), audit.result)}
    check_eps = {"linf": 0.09}
    assert sample_eps(ungated, audit.spec.grids, check_eps, ["linf"]) == ("linf", 2)
    samples = report_samples(audit.chunks, ungated, audit.spec.grids, check_eps, BOUNDS)
    assert samples is not None and samples.eps_label == "linf:0.1"
    assert sample_eps({**audit.result, "gate": None}, {"linf": GRID}, {}, None) == ("linf", len(GRID) - 1)


def test_the_audit_time_is_shown(audit: Audit) -> None:
    summary = render(audit).split("</header>")[0]
    assert "Audit time" in summary and "12 min 34 s" in summary
    short = render_report({**audit.result, "seconds": 12.34}, None, NAMES).split("</header>")[0]
    assert "12.3 s" in short
