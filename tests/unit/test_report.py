"""The audit report page: complete and partial results, escaping, charts, images, the amplification.

The complete result is real merge output (``tests.unit.real_audits.full_audit``: every section of a
result, both norms), with a few strings changed to break unescaped HTML; the sample images are
synthetic where a test is about images of a given size or channel count."""

from __future__ import annotations

import base64
import copy
import io
import re
import subprocess
import sys
from html import escape
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.audit.report import ReportSamples, amplify_perturbation, png_data_uri, render_report

from .real_audits import full_audit

HOSTILE = "<script>alert(1)</script>"
CLASSES = [HOSTILE, "trouser", "pullover", "dress", 'coat "long" & warm', "sandal", "shirt", "sneaker",
           "bag", "ankle boot"]
ATTACKS = ["fgsm", "apgd-ce", "apgd-t", "square"]
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "col", "area", "base", "embed", "track"}


HOSTILE_ATTACK = "<img src=x onerror=alert(2)>"


def full_result() -> dict[str, Any]:
    """A real audit result with every section, a few of its strings changed to break unescaped HTML:
    the model, an attack's name, a check's evidence and a gate line's detail."""
    result = copy.deepcopy(full_audit().result)
    result["model"] += "<b>"
    attacks = result["curves"]["l2"]["attacks"]
    attacks[HOSTILE_ATTACK] = attacks.pop("carlini-wagner-l2")
    result["masking_checks"]["checks"][0]["evidence"] += " <sic> & more"
    result["gate"]["lines"][1]["detail"] = "<too low>"
    return result


def sample_images(k: int = 4, channels: int = 1, size: int = 28, seed: int = 0) -> ReportSamples:
    rng = np.random.default_rng(seed)
    x = rng.random((k, channels, size, size), dtype=np.float32)
    x_adv = np.clip(x + rng.uniform(-8 / 255, 8 / 255, x.shape).astype(np.float32), 0, 1)
    labels = np.arange(k) % len(CLASSES)
    return ReportSamples(x=x, x_adv=x_adv, labels=labels, clean_pred=labels.copy(),
                         adv_pred=(labels + 1) % len(CLASSES), eps_label="linf:8/255 <worst>",
                         bounds=(0.0, 1.0))


class Tags(HTMLParser):
    """Counts start tags and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.attrs: dict[str, list[dict[str, str | None]]] = {}
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._count(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._count(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def _count(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.attrs.setdefault(tag, []).append(dict(attrs))


def parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    tags.close()
    assert tags.errors == [] and tags.stack == []
    return tags


def section(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, anchor
    return match.group(1)


def test_a_full_result_renders_a_complete_self_contained_page() -> None:
    page = render_report(full_result(), sample_images(), CLASSES)
    assert page.startswith("<!DOCTYPE html>\n")
    assert '<meta charset="utf-8">' in page
    tags = parse(page)
    assert tags.counts["html"] == tags.counts["head"] == tags.counts["body"] == 1
    assert "Not run." not in page
    # Nothing is fetched from outside: no scripts, stylesheets, fonts or remote images.
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert re.findall(r"url\((?!#)", page) == []  # only the charts' own clip paths (url(#...))
    assert all(img["src"] and img["src"].startswith("data:image/png;base64,") for img in tags.attrs["img"])
    # Only the SVG namespaces (two charts), never a fetched address.
    assert set(re.findall(r"https?://[^\s\"]*", page)) == {"http://www.w3.org/2000/svg",
                                                            "http://www.w3.org/1999/xlink"}
    page.encode("utf-8")


def test_a_minimal_result_says_what_was_not_run() -> None:
    page = render_report({"model": "fmnist-cnn@1", "n": 10, "clean_accuracy": None, "minimal": None,
                          "detector": None, "transfer": None, "gate": {"verdict": None, "lines": []}},
                         None, CLASSES)
    tags = parse(page)
    assert "img" not in tags.counts and "svg" not in tags.counts
    for anchor in ("robust-accuracy", "gradient-masking-checks", "per-class", "minimal-perturbations",
                   "detector", "transfer-attacks", "sample-images"):
        assert "Not run." in section(page, anchor), anchor
    assert "no gate" in page
    assert "not recorded" in page  # BPDA / EOT


def test_an_empty_result_renders() -> None:
    parse(render_report({}, None, []))


def test_every_string_from_the_data_is_escaped() -> None:
    page = render_report(full_result(), sample_images(k=10), CLASSES)
    tags = parse(page)
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "tiny-net@1&lt;b&gt;" in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "coat &quot;long&quot; &amp; warm" in page
    assert "&lt;sic&gt; &amp; more" in page and "&lt;too low&gt;" in page
    assert "linf:8/255 &lt;worst&gt;" in page
    assert "onerror" not in "".join(str(a) for img in tags.attrs["img"] for a in img)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_three_images_per_sample(k: int) -> None:
    tags = parse(render_report(full_result(), sample_images(k=k), CLASSES))
    assert tags.counts["img"] == 3 * k


def series_line(chart: str, norm: str, i: int) -> tuple[list[tuple[float, float]], dict[str, str]]:
    """The points (SVG coordinates) and style of the line of series ``i`` in a matplotlib chart."""
    match = re.search(rf'<g id="curve-{norm}-series-{i}">\s*<path d="([^"]*)"[^>]*style="([^"]*)"', chart)
    assert match, (norm, i)
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", match.group(1))]
    style = dict(part.strip().split(": ", 1) for part in match.group(2).split(";") if part.strip())
    return list(zip(numbers[::2], numbers[1::2], strict=True)), style


def series_group(chart: str, norm: str, i: int) -> str:
    """The whole ``<g>`` of series ``i`` (its line, marker definition and markers)."""
    start = chart.index(f'<g id="curve-{norm}-series-{i}">')
    depth, position = 0, start
    for tag in re.finditer(r"<g[\s>]|</g>", chart[start:]):
        depth += -1 if tag.group() == "</g>" else 1
        position = start + tag.end()
        if depth == 0:
            break
    return chart[start:position]


def test_each_chart_has_a_line_per_attack_and_one_for_the_worst_case() -> None:
    result = full_result()
    page = render_report(result, None, CLASSES)
    charts = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(charts) == len(result["curves"])
    for chart, (norm, curve) in zip(charts, result["curves"].items(), strict=True):
        parse(chart)
        count = len(curve["attacks"]) + 1
        assert len(re.findall(rf'<g id="curve-{norm}-series-\d+">', chart)) == count
        # The legend names the worst case first (drawn beneath the attacks: it always coincides
        # with one of them), then every attack, escaped.
        legend = chart[chart.index(f'id="curve-{norm}-legend'):]
        names = ["worst case", *curve["attacks"]]
        positions = [legend.find(f">{escape(name)}</text>") for name in names]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
        styles = [series_line(chart, norm, i)[1] for i in range(count)]
        widths = [float(style["stroke-width"]) for style in styles]
        assert widths[0] > max(widths[1:])
        colours = [style["stroke"] for style in styles]
        assert len(set(colours)) == len(colours)
        dashes = [style.get("stroke-dasharray", "solid") for style in styles[1:]]
        assert len(set(dashes)) == len(dashes)  # told apart without colour, too
        # Every series has the clean accuracy at eps 0, then one point per eps.
        for i in range(count):
            assert len(series_line(chart, norm, i)[0]) == len(curve["eps"]) + 1


def test_the_worst_case_line_goes_through_its_values() -> None:
    result = full_result()
    chart = re.findall(r"<svg.*?</svg>", render_report(result, None, CLASSES), re.S)[0]
    points, _ = series_line(chart, "linf", 0)
    # Lower accuracy is further down (larger y), and y is linear in accuracy; x is linear in eps,
    # from eps 0 (the clean accuracy): uneven grids keep their spacing.
    values = [result["clean_accuracy"], *result["curves"]["linf"]["worst_case"]]
    eps = [0.0, *result["curves"]["linf"]["eps"]]
    ys, xs = [y for _, y in points], [x for x, _ in points]
    slope = (ys[-1] - ys[0]) / (values[-1] - values[0])
    assert slope < 0
    for y, v in zip(ys, values, strict=True):
        assert y == pytest.approx(ys[0] + slope * (v - values[0]), abs=0.1)
    x_slope = (xs[-1] - xs[0]) / (eps[-1] - eps[0])
    for x, e in zip(xs, eps, strict=True):
        assert x == pytest.approx(xs[0] + x_slope * e, abs=0.1)


def test_the_worst_case_carries_its_intervals_as_error_bars() -> None:
    result = full_result()
    bands = result["intervals"]["curves"]["linf"]["worst_case"]
    chart = re.findall(r"<svg.*?</svg>", render_report(result, None, CLASSES), re.S)[0]
    plain = re.findall(r"<svg.*?</svg>", render_report({**result, "intervals": None}, None, CLASSES), re.S)[0]
    assert 'id="curve-linf-intervals-0"' in chart and 'id="curve-linf-intervals-0"' not in plain
    # one segment per point: the clean accuracy's interval at eps 0, then the worst case's
    group = chart[chart.index('id="curve-linf-intervals-0"'):].split("</g>")[0]
    assert group.count("<path") == len(bands) + 1
    table = section(render_report(result, None, CLASSES), "robust-accuracy")
    clean = result["intervals"]["clean_accuracy"]
    assert f"{100 * clean['lower']:.1f}–{100 * clean['upper']:.1f}%" in table
    for band in bands:  # the chart draws them; the table prints them
        assert f"{100 * band['lower']:.1f}–{100 * band['upper']:.1f}%" in table


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def test_values_appear_formatted() -> None:
    result = full_result()
    page = render_report(result, sample_images(), CLASSES)
    summary = page.split("</header>")[0]
    assert pct(result["clean_accuracy"]) in summary
    clean = result["intervals"]["clean_accuracy"]
    assert f"(95% CI {pct(clean['lower'])[:-1]}–{pct(clean['upper'])}, n={clean['n']})" in summary
    robust = section(page, "robust-accuracy")
    assert all(pct(v) in robust for curve in result["curves"].values() for v in curve["worst_case"])
    assert f"{result['seconds']:.1f} s" in summary and result["seconds"] < 60
    minimal = section(page, "minimal-perturbations")
    for entry in result["minimal"].values():
        assert pct(entry["success_rate"]) in minimal
        assert all(f"{v:.4g}" in minimal for k, v in entry.items() if k.startswith(("median", "mean")))
    detector = section(page, "detector")
    info, bands = result["detector"], result["intervals"]
    assert f"Threshold {info['threshold']:.4g}" in detector and pct(info["fpr"]) in detector
    rates = [(metric, key, value) for metric in ("detection_rate", "detect_reject_accuracy",
                                                 "adaptive_detect_reject_accuracy")
             for key, value in (info.get(metric) or {}).items()]
    assert len(rates) >= 2 * 6  # both norms' grids
    for metric, key, value in rates:  # each rate with its 95% interval
        band = bands[metric][key]
        assert pct(value) in detector and f"{pct(band['lower'])[:-1]}–{pct(band['upper'])}" in detector
    assert pct(info["detection_rate"]["linf:0.1"]) in detector
    (transfer,) = result["transfer"]
    assert pct(transfer["success_rate"]) in section(page, "transfer-attacks")
    per_class = section(page, "per-class")
    assert all(pct(v) in per_class for row in result["per_class"] for v in row["robust_accuracy"].values())
    gate = section(page, "gate")
    assert "✘ fail" in gate and "✔ pass" in gate and escape(result["gate"]["lines"][0]["detail"]) in gate
    masking = section(page, "gradient-masking-checks")
    assert "⚠ warn" in masking and "✔ pass" in masking and "– n/a" in masking
    assert "broken margin = 2" in masking and "attacked = 3" in masking
    assert "✘ fail" in summary and "no" in summary and "16" in summary
    samples = section(page, "sample-images")
    assert "true: <strong>trouser</strong>" in samples
    assert "adversarial prediction: <strong>pullover</strong>" in samples


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_the_amplified_perturbation_maps_the_largest_change_to_the_edge_of_the_range(
    bounds: tuple[float, float],
) -> None:
    lo, hi = bounds
    rng = np.random.default_rng(1)
    x = (lo + (hi - lo) * rng.random((1, 6, 6))).astype(np.float32)
    delta = rng.normal(0, (hi - lo) / 100, x.shape).astype(np.float32)
    delta.flat[7] = -(hi - lo) / 10  # the largest change, negative: it maps to lo
    out = amplify_perturbation(x, x + delta, bounds)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    assert out.shape == x.shape
    assert out.flat[7] == pytest.approx(lo, abs=1e-4 * (hi - lo))
    assert np.abs(out - mid).max() == pytest.approx(half, rel=1e-5)
    assert out.min() >= lo - 1e-4 and out.max() <= hi + 1e-4
    # Linear, centred at mid-grey: the sign and ratios of the changes are kept.
    actual = (x + delta).astype(np.float64) - x
    np.testing.assert_allclose(out - mid, actual * half / np.abs(actual).max(), atol=1e-4 * (hi - lo))


def test_no_perturbation_is_flat_mid_grey() -> None:
    x = np.random.default_rng(2).random((3, 4, 4)).astype(np.float32)
    out = amplify_perturbation(x, x.copy(), (0.0, 1.0))
    assert np.all(out == 0.5)


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_png_data_uri_upscales_with_nearest_neighbour(channels: int, mode: str) -> None:
    image = np.zeros((channels, 28, 28), dtype=np.float32)
    image[:, 0, 0] = 1.0
    uri = png_data_uri(image, (0.0, 1.0))
    assert uri.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert picture.format == "PNG" and picture.mode == mode and picture.size == (84, 84)
    pixels = np.asarray(picture).reshape(84, 84, channels)
    assert (pixels[:3, :3] == 255).all() and (pixels[3:, :] == 0).all() and (pixels[:, 3:] == 0).all()


def test_png_data_uri_maps_the_bounds_to_black_and_white() -> None:
    image = np.array([[[-1.0, 0.0, 1.0, 3.0]]], dtype=np.float32)  # 3.0 is out of bounds: clipped
    picture = Image.open(io.BytesIO(base64.b64decode(png_data_uri(image, (-1.0, 1.0), min_px=1).split(",")[1])))
    assert np.asarray(picture).tolist() == [[0, 128, 255, 255]]


def test_three_channel_samples_render() -> None:
    tags = parse(render_report(full_result(), sample_images(k=2, channels=3, size=32), CLASSES))
    assert tags.counts["img"] == 6
    assert {img["width"] for img in tags.attrs["img"]} == {"96"}


def test_samples_are_checked_for_shape() -> None:
    good = sample_images(k=2)
    with pytest.raises(ValueError, match=r"expected x_adv of shape"):
        ReportSamples(good.x, good.x_adv[:1], good.labels, good.clean_pred, good.adv_pred, "e", (0.0, 1.0))
    with pytest.raises(ValueError, match=r"expected x of shape \(k, C, H, W\)"):
        ReportSamples(good.x[:, :, :, :, None], good.x_adv, good.labels, good.clean_pred, good.adv_pred, "e",
                      (0.0, 1.0))
    with pytest.raises(ValueError, match=r"expected adv_pred of shape \(2,\)"):
        ReportSamples(good.x, good.x_adv, good.labels, good.clean_pred, good.adv_pred[:1], "e", (0.0, 1.0))


def test_report_imports_no_torch() -> None:
    code = "import sys, workers.audit.report; assert 'torch' not in sys.modules, 'report imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
