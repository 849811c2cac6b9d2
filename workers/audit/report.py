"""The audit report: one self-contained HTML page made from an audit result and a few sample images.

Torch-free (numpy, Pillow, matplotlib, stdlib) so that the gateway can render it too. The page needs
nothing from outside: charts are inline SVG drawn by matplotlib (``contracts.charts``), images are
PNG data URIs, styles are inline, there is no script.
Every string that comes from the result or the class list is escaped on its way into the page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from contracts.charts import Series, accuracy_chart_svg
from contracts.gate import eps_key, parse_eps, parse_line
from workers.artifacts import display_layout
from workers.audit.merge import Chunk

NOT_RUN = '<p class="not-run">Not run.</p>'
MISSING = "—"
NOT_APPLICABLE = "n/a"
# Images are upscaled (nearest neighbour) to at least this many pixels on their longer side.
MIN_IMAGE_PX = 84


@dataclass(frozen=True)
class ReportSamples:
    """A few audited images and their worst-case adversarial versions at one eps.

    ``x`` and ``x_adv`` are ``(k, C, H, W)``, values in ``bounds`` (C = 1 shows grey, C = 3 in colour,
    any other count as grey channels side by side); ``labels``,
    ``clean_pred`` and ``adv_pred`` are ``(k,)`` class indices; ``eps_label`` names the eps the
    adversarial images belong to, e.g. ``"linf:8/255"``.
    """

    x: np.ndarray
    x_adv: np.ndarray
    labels: np.ndarray
    clean_pred: np.ndarray
    adv_pred: np.ndarray
    eps_label: str
    bounds: tuple[float, float]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or min(self.x.shape[1:]) < 1:
            raise ValueError(f"expected x of shape (k, C, H, W), got {self.x.shape}")
        if self.x_adv.shape != self.x.shape:
            raise ValueError(f"expected x_adv of shape {self.x.shape}, got {self.x_adv.shape}")
        k = self.x.shape[0]
        for name in ("labels", "clean_pred", "adv_pred"):
            shape = getattr(self, name).shape
            if shape != (k,):
                raise ValueError(f"expected {name} of shape ({k},), got {shape}")
        lo, hi = self.bounds
        if not lo < hi:
            raise ValueError(f"expected bounds (lo, hi) with lo < hi, got {self.bounds}")


def amplify_perturbation(x: np.ndarray, x_adv: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """``x_adv - x`` scaled so that its largest magnitude reaches the edge of ``bounds``, centred on
    mid-grey: zero change shows as mid-grey, the largest change as black or white. No change at all
    gives a flat mid-grey image."""
    lo, hi = bounds
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    delta = np.asarray(x_adv, dtype=np.float64) - np.asarray(x, dtype=np.float64)
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return np.full(delta.shape, mid, dtype=np.float32)
    return (mid + delta * (half / peak)).astype(np.float32)


def png_data_uri(image: np.ndarray, bounds: tuple[float, float], min_px: int = MIN_IMAGE_PX) -> str:
    """A ``(C, H, W)`` image (values in ``bounds``) as a ``data:image/png`` URI, upscaled by a whole
    factor with nearest neighbour so that its longer side is at least ``min_px``. One channel gives a
    grey PNG, three an RGB one; any other count grey channels side by side (``display_layout``)."""
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"expected an image of shape (C, H, W), got {image.shape}")
    lo, hi = bounds
    scaled = (np.asarray(image, dtype=np.float64) - lo) / (hi - lo) * 255.0
    pixels = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(display_layout(pixels[None])[0]))  # 2-D: L; 3-D: RGB
    factor = _upscale(picture.height, picture.width, min_px)
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_eps(result: Mapping[str, Any], grids: Mapping[str, Sequence[float]], check_eps: Mapping[str, float],
               norms: Collection[str] | None = None) -> tuple[str, int] | None:
    """Where the sample grid is drawn, as ``(norm, index into grids[norm])``: at the eps of the gate's
    first robust-accuracy line (the budget the release is judged at), else at the first norm's grid
    eps nearest its check eps (its largest without one). ``norms``: those with images (None: all)."""
    usable = [n for n, grid in grids.items() if len(grid) and (norms is None or n in norms)]
    if not usable:
        return None
    gate = result.get("gate")
    for line in (gate.get("lines") or []) if isinstance(gate, Mapping) else []:
        if not isinstance(line, Mapping) or line.get("metric") != "robust_accuracy":
            continue
        try:
            parsed = parse_line(str(line.get("expression", "")))
        except ValueError:
            continue
        if parsed.norm in usable and parsed.eps is not None:
            return parsed.norm, _nearest(grids[parsed.norm], parsed.eps)
    norm = usable[0]
    grid = grids[norm]
    return norm, _nearest(grid, check_eps.get(norm, grid[-1]))


def _nearest(grid: Sequence[float], eps: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - eps))


def report_samples(chunks: Sequence[Chunk], result: Mapping[str, Any], grids: Mapping[str, Sequence[float]],
                   check_eps: Mapping[str, float], bounds: tuple[float, float],
                   k: int = 8) -> ReportSamples | None:
    """Up to ``k`` samples with their worst-case examples at the eps ``sample_eps`` picks (those broken
    there first; none broken: the first ones), for the image grid. ``result`` is the merged audit
    result with its gate evaluated."""
    clean = [chunk.clean_images for chunk in chunks]
    if not chunks or any(images is None for images in clean):
        return None
    picked = sample_eps(result, grids, check_eps, [n for n in grids if all(n in c.images for c in chunks)])
    if picked is None:
        return None
    norm, e = picked
    kept = [(c, i) for c, chunk in enumerate(chunks) for i in range(chunk.images[norm].shape[1])]
    picks = [(c, i) for c, i in kept if chunks[c].broken_by[norm][e, i] >= 0][:k] or kept[:k]
    if not picks:
        return None
    return ReportSamples(
        x=np.stack([np.asarray(clean[c])[i] for c, i in picks]),
        x_adv=np.stack([chunks[c].images[norm][e, i] for c, i in picks]),
        labels=np.array([chunks[c].labels[i] for c, i in picks]),
        clean_pred=np.array([chunks[c].clean_pred[i] for c, i in picks]),
        adv_pred=np.array([chunks[c].image_preds[norm][e, i] for c, i in picks]),
        eps_label=eps_key(norm, float(grids[norm][e])), bounds=bounds)


def render_report(result: Mapping[str, Any], samples: ReportSamples | None, classes: Sequence[str]) -> str:
    """The whole report page (UTF-8 HTML5) for an audit ``result`` (the audit job's JSON result;
    any section may be missing or None and then reads "Not run."), with image grids from ``samples``
    and class names from ``classes``."""
    model = result.get("model")
    title = f"Robustness audit — {model}" if model else "Robustness audit"
    body = "\n".join(
        [
            f"<header><h1>{_e(title)}</h1>{_summary(result)}</header>",
            _section("Robust accuracy", _curves(result.get("curves"), result.get("clean_accuracy"),
                                                _bands(result, "curves"),
                                                _bands(result).get("clean_accuracy"))),
            _section("Gradient-masking checks", _masking(result.get("masking_checks"))),
            _section("Gate", _gate(result.get("gate"))),
            _section("Per class", _per_class(result)),
            _section("Minimal perturbations", _minimal(result.get("minimal"))),
            _section("Detector", _detector(result.get("detector"), _bands(result))),
            _section("Transfer attacks",
                     _transfer(result.get("transfer"), _bands(result, "transfer_success_rate"))),
            _section("Sample images", _samples(samples, classes)),
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


# --- formatting -------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage, e.g. ``0.92 -> "92.0%"``."""
    if not _is_number(value) or not math.isfinite(value):
        return MISSING if value is None else _e(value)
    return f"{100 * value:.1f}%"


def _ci(band: Any) -> str:
    """A 95% interval as ``"36.8–45.4%"`` (``MISSING`` when there is none)."""
    if not isinstance(band, Mapping) or not all(_is_number(band.get(b)) for b in ("lower", "upper")):
        return MISSING
    return f"{100 * band['lower']:.1f}–{100 * band['upper']:.1f}%"


def _bands(result: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    """``result["intervals"][path...]`` (the 95% intervals that mirror the result's rates), or {}."""
    node: Any = result.get("intervals")
    for step in path:
        node = node.get(step) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _num(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _is_fraction_key(key: str) -> bool:
    return any(word in key for word in ("rate", "accuracy", "fpr"))


def _section(heading: str, content: str) -> str:
    anchor = heading.lower().replace(" ", "-")
    return f'<section id="{_e(anchor)}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    """A table from already-escaped cells; columns from ``numeric_from`` on are right-aligned."""
    def align(i: int) -> str:
        return ' class="num"' if i >= numeric_from else ""

    head_html = "".join(f'<th scope="col"{align(i)}>{cell}</th>' for i, cell in enumerate(head))
    body_html = "\n".join(
        "<tr>" + "".join(f"<td{align(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>" for row in rows
    )
    return (
        f'<div class="scroll"><table>\n<thead><tr>{head_html}</tr></thead>\n'
        f"<tbody>\n{body_html}\n</tbody>\n</table></div>"
    )


def _shade(value: Any) -> str:
    """A cell with a percentage, tinted from red (0) to green (1) so a table reads at a glance."""
    if not _is_number(value) or not math.isfinite(value):
        return _pct(value)
    hue = round(120 * min(max(value, 0.0), 1.0))
    return f'<span class="cell" style="background:hsl({hue}, 70%, 88%)">{_pct(value)}</span>'


def _marker(status: Any) -> str:
    """A status as text plus symbol, so it reads without colour too."""
    known = {
        "pass": ("pass", "✔ pass"),
        "warn": ("warn", "⚠ warn"),
        "fail": ("fail", "✘ fail"),
        NOT_APPLICABLE: ("na", "– n/a"),
    }
    css, text = known.get(str(status), ("unknown", str(status) if status is not None else "not run"))
    return f'<span class="badge {css}">{_e(text)}</span>'


# --- sections ---------------------------------------------------------------------------------------


def _summary(result: Mapping[str, Any]) -> str:
    gate = result.get("gate") if isinstance(result.get("gate"), Mapping) else None
    verdict = gate.get("verdict") if gate else None
    verdict_html = _marker(verdict) if verdict is not None else '<span class="badge unknown">no gate</span>'
    items = [
        ("Model", _e(result["model"]) if result.get("model") is not None else MISSING),
        ("Suite", _num(result.get("suite"))),
        ("Samples (n)", _num(result.get("n"))),
        ("Seed", _num(result.get("seed"))),
        ("Clean accuracy", _pct(result.get("clean_accuracy")) + _ci_note(_bands(result).get("clean_accuracy"))),
        ("Verdict", verdict_html),
        ("BPDA used", _num(result.get("bpda")) if result.get("bpda") is not None else "not recorded"),
        ("EOT used", _num(result.get("eot")) if result.get("eot") is not None else "not recorded"),
        ("Audit time", _duration(result.get("seconds"))),
    ]
    cells = "".join(f"<div><dt>{_e(name)}</dt><dd>{value}</dd></div>" for name, value in items)
    return f'<dl class="summary">{cells}</dl>'


def _ci_note(band: Any) -> str:
    if _ci(band) == MISSING:
        return ""
    return f' <span class="ci">(95% CI {_ci(band)}, n={_num(band.get("n"))})</span>'


def _curves(curves: Any, clean_accuracy: Any = None, bands: Mapping[str, Any] | None = None,
            clean_band: Any = None) -> str:
    """Per norm: the chart (the worst case with its 95% intervals as error bars, the clean
    accuracy's at eps 0) and the table (every figure, and a row of the worst case's intervals)."""
    if not isinstance(curves, Mapping) or not curves:
        return NOT_RUN
    clean = clean_accuracy if _is_number(clean_accuracy) and math.isfinite(clean_accuracy) else None
    parts = []
    for norm, curve in curves.items():
        if not isinstance(curve, Mapping):
            continue
        labels_given = [str(label) for label in curve.get("labels") or []]
        eps = _eps_values(curve.get("eps"), labels_given)
        labels = labels_given if len(labels_given) == len(eps) else [f"{v:.4g}" for v in eps]
        attacks = curve.get("attacks") or {}
        series = [(str(name), list(values or [])) for name, values in attacks.items()]
        worst = curve.get("worst_case")
        band = (bands or {}).get(norm)
        worst_band = list(band.get("worst_case") or []) if isinstance(band, Mapping) else []
        chart = _chart(norm, eps, series, list(worst) if worst else None, clean, worst_band, clean_band)
        first = [_pct(clean)] if clean is not None else []
        rows = [[_e(name), *first, *(_pct(v) for v in values)] for name, values in series]
        if worst:
            rows.append(["<strong>worst case</strong>",
                         *(f"<strong>{cell}</strong>" for cell in [*first, *(_pct(v) for v in worst)])])
        if worst_band:
            rows.append(["worst case, 95% interval", *([_ci(clean_band)] if first else []),
                         *(_ci(b) for b in worst_band)])
        head = ["attack", *(["0 (clean)"] if clean is not None else []), *(_e(label) for label in labels)]
        parts.append(f'<figure class="chart">{chart}<figcaption>{_e(norm)}</figcaption></figure>\n'
                     f"{_table(head, rows)}")
    return "\n".join(parts) or NOT_RUN


def _chart(norm: str, eps: Sequence[float], series: Sequence[tuple[str, Sequence[Any]]],
           worst_case: Sequence[Any] | None, clean: float | None, worst_band: Sequence[Any],
           clean_band: Any = None) -> str:
    """The chart of one norm: every attack, and the worst case (with its 95% intervals) beneath them;
    each line starts at the clean accuracy (with its interval), at eps 0."""
    xs = [0.0, *eps] if clean is not None else list(eps)
    start = [clean] if clean is not None else []
    lines = []
    if worst_case is not None:
        first = [clean_band if isinstance(clean_band, Mapping) else {}] if start else []
        bands = [b if isinstance(b, Mapping) else {} for b in [*first, *worst_band]]
        low = [b.get("lower") for b in bands]
        high = [b.get("upper") for b in bands]
        lines.append(Series("worst case", xs, [*start, *worst_case], low, high, emphasis=True))
    lines.extend(Series(name, xs, [*start, *values]) for name, values in series)
    return accuracy_chart_svg(f"Robust accuracy under {norm} attacks", f"eps ({norm})", lines,
                              chart_id=f"curve-{norm}", x_eps=eps)


def _eps_values(eps: Any, labels: Sequence[str]) -> list[float]:
    """A curve's eps as numbers: its ``eps`` list, else its labels parsed (``"8/255"``), else 1, 2, ..."""
    if isinstance(eps, list | tuple) and eps and all(_is_number(e) and math.isfinite(e) for e in eps):
        return [float(e) for e in eps]
    try:
        return [parse_eps(label) for label in labels]
    except ValueError:
        return [float(i + 1) for i in range(len(labels))]


def _masking(masking: Any) -> str:
    if not isinstance(masking, Mapping):
        return NOT_RUN
    checks = masking.get("checks") or []
    rows = []
    for check in checks:
        if not isinstance(check, Mapping):
            continue
        values = check.get("values") or {}
        values_html = (
            "<br>".join(_check_value(str(k), v) for k, v in values.items())
            if isinstance(values, Mapping)
            else _readable(values)
        )
        rows.append([_e(check.get("name", MISSING)), _marker(check_status(check)),
                     _e(check.get("evidence") or ""), values_html])
    overall = f'<p>Overall: {_marker(masking.get("status"))}</p>'
    if not rows:
        return overall + '<p class="not-run">No checks recorded.</p>'
    return overall + _table(["check", "status", "evidence", "values"], rows, numeric_from=4)


def check_status(check: Mapping[str, Any]) -> Any:
    """A masking check's status as shown: ``n/a`` where it tested nothing (0 samples attacked), even
    if the result calls that a pass."""
    values = check.get("values")
    attacked = values.get("attacked") if isinstance(values, Mapping) else None
    if check.get("status") == "pass" and _is_number(attacked) and attacked == 0:
        return NOT_APPLICABLE
    return check.get("status")


def _check_value(key: str, value: Any) -> str:
    """One entry of a check's values as text: ``survivors = 3``, ``by eps: linf:8/255 = 2, ...``."""
    fraction = _is_fraction_key(key) or key == "curve"  # a curve is robust accuracy per eps
    name = _e(key.replace("_", " "))
    if isinstance(value, Mapping | list | tuple):
        return f"{name}: {_readable(value, fraction)}"
    return f"{name} = {_readable(value, fraction)}"


def _readable(value: Any, fraction: bool = False) -> str:
    """Escaped text for a value of any JSON shape: no Python braces, brackets or quotes."""
    if isinstance(value, Mapping):
        return ", ".join(f"{_e(k)} = {_readable(v, fraction or _is_fraction_key(str(k)))}"
                         for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(_readable(v, fraction) for v in value) or "none"
    return _pct(value) if fraction and _is_number(value) else _num(value)


def _duration(seconds: Any) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _gate(gate: Any) -> str:
    if not isinstance(gate, Mapping):
        return NOT_RUN
    verdict = gate.get("verdict")
    head = f'<p>Verdict: {_marker(verdict) if verdict is not None else "no gate given"}</p>'
    lines = gate.get("lines") or []
    if not lines:
        return head
    rows = [
        [
            f"<code>{_e(line.get('expression', MISSING))}</code>",
            _num(line.get("value")),
            _marker({True: "pass", False: "fail"}.get(line.get("passed"))),
            _e(line.get("detail") or ""),
        ]
        for line in lines
    ]
    return head + _table(["expression", "value", "result", "detail"], rows, numeric_from=1)


def _per_class(result: Mapping[str, Any]) -> str:
    per_class: list[Any] = list(result.get("per_class") or [])
    robust_accuracy = result.get("robust_accuracy")
    overall: Mapping[str, Any] = robust_accuracy if isinstance(robust_accuracy, Mapping) else {}
    if not per_class and not overall and result.get("clean_accuracy") is None:
        return NOT_RUN
    eps_labels = list(overall)
    for entry in per_class:
        eps_labels.extend(k for k in entry.get("robust_accuracy") or {} if k not in eps_labels)
    rows = []
    for entry in per_class:
        robust = entry.get("robust_accuracy") or {}
        name = entry.get("name")
        rows.append(
            [_num(entry.get("class")), _e(name) if name is not None else MISSING, _num(entry.get("n")),
             _shade(entry.get("clean_accuracy")), *(_shade(robust.get(label)) for label in eps_labels)]
        )
    rows.append(
        ["<strong>all</strong>", "", _num(result.get("n")), _shade(result.get("clean_accuracy")),
         *(_shade(overall.get(label)) for label in eps_labels)]
    )
    head = ["class", "name", "n", "clean", *(_e(label) for label in eps_labels)]
    note = "" if per_class else '<p class="not-run">Per-class breakdown not run.</p>'
    return note + _table(head, rows, numeric_from=2)


def _minimal(minimal: Any) -> str:
    if not isinstance(minimal, Mapping) or not minimal:
        return NOT_RUN
    keys: list[str] = []
    for stats in minimal.values():
        keys.extend(k for k in (stats or {}) if k not in keys)
    rows = [
        [_e(attack), *((_pct if _is_fraction_key(k) else _num)((stats or {}).get(k)) for k in keys)]
        for attack, stats in minimal.items()
    ]
    return _table(["attack", *(_e(k.replace("_", " ")) for k in keys)], rows)


def _detector(detector: Any, bands: Mapping[str, Any] | None = None) -> str:
    if not isinstance(detector, Mapping):
        return NOT_RUN
    rates = detector.get("detection_rate") or {}
    reject = detector.get("detect_reject_accuracy") or {}
    adaptive = detector.get("adaptive_detect_reject_accuracy") or {}
    run: Mapping[str, Any] = detector["adaptive"] if isinstance(detector.get("adaptive"), Mapping) else {}
    head = (
        f"<p>Threshold {_num(detector.get('threshold'))}, false-positive rate on clean inputs "
        f"{_pct(detector.get('fpr'))}.</p>"
        "<p><strong>Oblivious</strong>: the suite's worst-case examples, made by attacks that do not know "
        "the detector (detection rate and the first detect-and-reject accuracy). "
        "<strong>Adaptive</strong>: an attack on the model and the detector jointly (squeeze-adaptive, "
        "BPDA through the squeezers; Carlini &amp; Wagner 2017, Tramer et al. 2020), or the oblivious "
        "example where that already passes the detector: the figure to trust. "
        + (f"It ran {_num(run.get('steps'))} steps on {_num(run.get('sample_eps_attacked'))} sample-eps "
           f"pairs in {_num(run.get('seconds'))} s.</p>" if adaptive else "It did not run.</p>")
    )
    labels = list(rates) + [k for k in [*reject, *adaptive] if k not in rates]
    # ``bands`` is ``result["intervals"]`` already (``_bands`` would look for "intervals" inside it)
    rate_bands, reject_bands, adaptive_bands = (
        found if isinstance(found := (bands or {}).get(name), Mapping) else {}
        for name in ("detection_rate", "detect_reject_accuracy", "adaptive_detect_reject_accuracy"))
    rows = [[_e(label), _pct(rates.get(label)), _ci(rate_bands.get(label)), _pct(reject.get(label)),
             _ci(reject_bands.get(label)), _pct(adaptive.get(label)), _ci(adaptive_bands.get(label))]
            for label in dict.fromkeys(labels)]
    head_row = ["eps", "detection rate (oblivious)", "95% interval", "detect-and-reject accuracy (oblivious)",
                "95% interval", "detect-and-reject accuracy (adaptive)", "95% interval"]
    return head + (_table(head_row, rows) if rows else "")


def _transfer(transfer: Any, bands: Mapping[str, Any] | None = None) -> str:
    if not transfer:
        return NOT_RUN
    rows = [
        [
            _e(entry.get("surrogate", MISSING)),
            _e(entry.get("eps_label", MISSING)),
            _pct(entry.get("success_rate")),
            _ci((bands or {}).get(entry.get("surrogate"))),
        ]
        for entry in transfer
    ]
    return _table(["surrogate", "eps", "success rate", "95% interval"], rows, numeric_from=2)


def _class_name(classes: Sequence[str], index: Any) -> str:
    i = int(index)
    return classes[i] if 0 <= i < len(classes) else str(i)


def _samples(samples: ReportSamples | None, classes: Sequence[str]) -> str:
    if samples is None or samples.x.shape[0] == 0:
        return NOT_RUN
    lo, hi = samples.bounds
    rows = []
    for i in range(samples.x.shape[0]):
        x, x_adv = samples.x[i], samples.x_adv[i]
        peak = float(np.abs(np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).max())
        factor = (hi - lo) / 2 / peak if peak > 0 else 0.0
        true = _class_name(classes, samples.labels[i])
        clean = _class_name(classes, samples.clean_pred[i])
        adv = _class_name(classes, samples.adv_pred[i])
        images = [
            (png_data_uri(x, samples.bounds), "clean", f"clean: {true}"),
            (png_data_uri(x_adv, samples.bounds), "adversarial", f"adversarial: {adv}"),
            (
                png_data_uri(amplify_perturbation(x, x_adv, samples.bounds), samples.bounds),
                f"perturbation ×{factor:.3g}" if peak > 0 else "perturbation (none)",
                f"perturbation, max |delta| {peak:.3g}",
            ),
        ]
        width, height = _display_px(x)
        figures = "".join(
            f'<figure><img src="{uri}" alt="{_e(alt)}" width="{width}" height="{height}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
            for uri, caption, alt in images
        )
        if int(samples.clean_pred[i]) != int(samples.labels[i]):
            outcome = '<span class="wrong">wrong before the attack</span>'
        elif int(samples.adv_pred[i]) != int(samples.labels[i]):
            outcome = '<span class="fooled">fooled</span>'
        else:
            outcome = '<span class="held">held</span>'
        caption = (
            f"true: <strong>{_e(true)}</strong> · clean prediction: <strong>{_e(clean)}</strong> · "
            f"adversarial prediction: <strong>{_e(adv)}</strong> {outcome}"
        )
        rows.append(f'<div class="sample"><div class="images">{figures}</div><p>{caption}</p></div>')
    intro = (
        f"<p>Worst-case adversarial examples at <code>{_e(samples.eps_label)}</code>. The perturbation is "
        "amplified so its largest change reaches black or white; mid-grey is no change.</p>"
    )
    return intro + '<div class="samples">' + "\n".join(rows) + "</div>"


def _upscale(h: int, w: int, min_px: int) -> int:
    """The whole factor that brings the longer side to at least ``min_px``."""
    return max(1, math.ceil(min_px / max(h, w)))


def _display_px(image: np.ndarray) -> tuple[int, int]:
    """Width and height the upscaled PNG of a ``(C, H, W)`` image has."""
    channels, h, w = (int(d) for d in image.shape)
    w = w if channels in (1, 3) else channels * w  # channels side by side (``display_layout``)
    factor = _upscale(h, w, MIN_IMAGE_PX)
    return w * factor, h * factor


_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
  background: #fafafa; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 12px; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin: 14px 0 10px; }
section, header { background: #fff; border: 1px solid #e4e4e4; border-radius: 6px; padding: 4px 18px 14px;
  margin-bottom: 18px; }
header { padding-top: 16px; }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 8px 18px;
  margin: 0; }
.summary dt { font-size: 0.8em; color: #666; text-transform: uppercase; letter-spacing: 0.04em; }
.summary dd { margin: 0; font-weight: 600; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 0.92em; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.cell { display: inline-block; min-width: 4em; padding: 0 4px; border-radius: 3px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; font-size: 0.9em;
  white-space: nowrap; }
.badge.pass { background: #d7f2dc; color: #125c24; }
.badge.warn { background: #fff0c2; color: #6b4b00; }
.badge.fail { background: #fadad7; color: #8a1c12; }
.badge.unknown { background: #eceff3; color: #40474f; }
.badge.na { background: #eceff3; color: #40474f; }
.not-run { color: #777; font-style: italic; }
figure { margin: 0; }
.chart { margin: 8px 0; }
.chart svg { max-width: 100%; height: auto; display: block; }
.chart figcaption { display: none; }
.ci { color: #555; font-size: 0.9em; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 14px; }
.sample { border: 1px solid #eee; border-radius: 4px; padding: 8px; }
.sample p { margin: 6px 0 0; font-size: 0.88em; }
.images { display: flex; gap: 8px; }
.images figure { text-align: center; width: min-content; }
.images img { image-rendering: pixelated; border: 1px solid #ccc; display: block; }
.images figcaption { font-size: 0.75em; color: #555; }
.fooled { color: #8a1c12; font-weight: 600; }
.held { color: #125c24; font-weight: 600; }
.wrong { color: #6b4b00; font-weight: 600; }
code { font-size: 0.92em; }
"""
