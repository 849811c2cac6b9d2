"""The CI gate of a robustness audit: threshold lines such as ``robust_accuracy@linf:8/255 >= 0.4``,
parsed (the gateway validates them before it queues anything) and evaluated against an audit result.

Torch-free and stdlib only: the gateway and the ``adversa audit`` command import it.

A line is ``<metric>[@<norm>[:<eps>]][.lower|.upper] <op> <value>``. A metric that the result does
not hold (an eps outside the sweep, a section that did not run) makes its line fail: a gate never
passes on missing data. ``.lower`` and ``.upper`` compare a bound of the rate's 95% Wilson interval
(``result["intervals"]``, see ``workers.audit.intervals``) instead of the rate itself:
``robust_accuracy@linf:8/255.lower >= 0.4`` passes only when the sample is large enough to say so.

A regression gate compares with an earlier audit, the audit's ``baseline``:
``robust_accuracy@linf:8/255 >= baseline - 0.01``, ``clean_accuracy >= baseline``. The gateway
resolves the baseline when the audit is submitted and hands its figures to the merge
(``baseline_metrics``); the line's verdict holds both values, their difference and whether the
difference is ``significant``: outside the noise of the two Wilson intervals (Newcombe's interval of
the difference excludes 0, ``workers.audit.intervals.difference``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contracts.intervals import BOUNDS, significant
from contracts.intervals import text as interval_text

NORMS = ("linf", "l2")
OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne,
}
OP_CHARS = frozenset("<>=!")
MASKING_VALUES = ("pass", "warn")
# Two budgets are the same when they agree to EPS_REL_TOL (the gateway checks gate lines against the
# grid so); a label in a result reads back within KEY_REL_TOL of its budget, so a line that the
# gateway accepted finds its entry within the sum of both.
EPS_REL_TOL = 1e-6
KEY_REL_TOL = 1e-7

# metric -> what follows the "@": None (nothing), "norm" (``@l2``) or "norm:eps" (``@linf:8/255``)
METRICS: dict[str, str | None] = {
    "clean_accuracy": None,
    "robust_accuracy": "norm:eps",
    "detect_reject_accuracy": "norm:eps",
    "adaptive_detect_reject_accuracy": "norm:eps",
    "median_perturbation": "norm",
    "masking_checks": None,
    "transfer_success_rate": "norm:eps",
}
RATES = frozenset({"clean_accuracy", "robust_accuracy", "detect_reject_accuracy",
                   "adaptive_detect_reject_accuracy", "transfer_success_rate"})
# Detect-and-reject accuracy (classified correctly or rejected by the model's detector) under the
# suite's attacks, which do not know the detector (oblivious), and under the adaptive attack on model
# and detector jointly (``workers.attacks.squeeze_adaptive``): the first overstates what the detector
# stops; gate on the second.
DETECTOR_METRICS = ("detect_reject_accuracy", "adaptive_detect_reject_accuracy")
SYNTAX = "expected `<metric>[@<norm>:<eps>][.lower|.upper] <op> <value>`"
_BASELINE = re.compile(r"^baseline(?:\s*([+-])\s*(.*))?$", re.IGNORECASE)
_SUFFIX = re.compile(r"\.\s*([A-Za-z_]\w*)\s*$")  # a word after the last dot: never part of an eps
EXAMPLES = {
    "clean_accuracy": "clean_accuracy >= 0.9",
    "robust_accuracy": "robust_accuracy@linf:8/255 >= 0.4",
    "detect_reject_accuracy": "detect_reject_accuracy@linf:0.1 >= 0.6",
    "adaptive_detect_reject_accuracy": "adaptive_detect_reject_accuracy@linf:0.1 >= 0.3",
    "median_perturbation": "median_perturbation@l2 >= 0.5",
    "masking_checks": "masking_checks == pass",
    "transfer_success_rate": "transfer_success_rate@linf:0.1 <= 0.3",
}


@dataclass(frozen=True)
class GateLine:
    """One parsed threshold. ``value`` is a float for numeric metrics, ``"pass"``/``"warn"`` for
    ``masking_checks``. ``bound``: ``"lower"``/``"upper"`` to compare that bound of the 95%
    interval instead of the rate."""

    expression: str
    metric: str
    norm: str | None
    eps: float | None
    op: str
    value: float | str
    bound: str | None = None
    baseline: bool = False  # compare with the baseline audit's figure plus ``value``

    @property
    def key(self) -> str:
        """The left-hand side without a bound: ``robust_accuracy@linf:8/255``, ``clean_accuracy``."""
        if self.norm is None:
            return self.metric
        where = self.norm if self.eps is None else eps_key(self.norm, self.eps)
        return f"{self.metric}@{where}"


class GateError(ValueError):
    """A gate line that does not parse; ``index`` is its 0-based position."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"gate line {index}: {message}")
        self.index = index
        self.message = message


def parse_eps(text: str) -> float:
    """``"8/255"`` -> 8/255, ``"0.1"`` -> 0.1; finite and > 0, else ValueError."""
    raw = text.strip()
    numerator, slash, denominator = raw.partition("/")
    try:
        eps = float(numerator) / float(denominator) if slash else float(raw)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected eps as a number or a fraction like 8/255, got {raw!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"expected eps > 0, got {raw!r}")
    return eps


def eps_key(norm: str, eps: float) -> str:
    """The canonical label of a budget in audit results, used by the merge, the gate and the
    gateway alike: ``linf:8/255`` when eps is k/255 for an integer k (within ``KEY_REL_TOL``) and
    no short decimal spells it, else the shortest decimal that reads back as eps (``linf:0.1``,
    ``l2:1``, ``linf:0.123456789``). A label always parses back to its eps within
    ``KEY_REL_TOL``: a gate line copied from a report measures what the report showed."""
    decimal = _shortest_decimal(eps)
    if len(decimal.replace("0.", "", 1)) <= 4 and float(decimal) == eps:
        return f"{norm}:{decimal}"
    scaled = eps * 255
    k = round(scaled)
    if k >= 1 and abs(scaled - k) <= KEY_REL_TOL * k:
        return f"{norm}:{k}/255"
    return f"{norm}:{decimal}"


def _shortest_decimal(eps: float) -> str:
    """The fewest significant digits (at least 6) that read back as ``eps`` within 1e-12 relative:
    ``0.1 * 3`` is ``0.3``, ``0.123456789`` keeps its nine digits."""
    for digits in range(6, 18):
        text = f"{eps:.{digits}g}"
        if math.isclose(float(text), eps, rel_tol=1e-12):
            return text
    return repr(eps)


def match_eps(eps: float, candidates: Sequence[float], rel_tol: float = EPS_REL_TOL) -> int | None:
    """The index of the candidate budget closest to ``eps`` if it is within ``rel_tol`` of it, else
    None: budgets are matched by value, never by their spelling (``8/255`` is ``0.0313725490196``)."""
    best = min(range(len(candidates)), key=lambda i: abs(candidates[i] - eps), default=None)
    if best is None or not math.isclose(candidates[best], eps, rel_tol=rel_tol):
        return None
    return best


def parse_eps_key(key: str) -> tuple[str, float] | None:
    """``"linf:8/255"`` -> ("linf", 8/255); None for anything else."""
    norm, colon, eps = key.partition(":")
    if not colon or norm.strip() not in NORMS:
        return None
    try:
        return norm.strip(), parse_eps(eps)
    except ValueError:
        return None


def _split_op(text: str) -> tuple[str, str, str]:
    start = next((i for i, c in enumerate(text) if c in OP_CHARS), None)
    if start is None:
        raise ValueError(f"{SYNTAX} with <op> one of {', '.join(OPS)}, got {text!r} (no operator)")
    end = start
    while end < len(text) and text[end] in OP_CHARS:
        end += 1
    op = text[start:end]
    if op not in OPS:
        raise ValueError(f"expected an operator among {', '.join(OPS)}, got {op!r} in {text!r}")
    return text[:start].strip(), op, text[end:].strip()


def _parse_target(metric: str, suffix: str | None, text: str) -> tuple[str | None, float | None]:
    needs = METRICS[metric]
    example = EXAMPLES[metric]
    if needs is None:
        if suffix is not None:
            raise ValueError(f"{metric} takes no @<norm>, e.g. `{example}`, got {text!r}")
        return None, None
    if suffix is None or not suffix:
        what = "@<norm>" if needs == "norm" else "@<norm>:<eps>"
        raise ValueError(f"{metric} needs {what}, e.g. `{example}`, got {text!r}")
    norm, colon, eps_text = (part.strip() for part in suffix.partition(":"))
    norm = norm.lower()
    if norm not in NORMS:
        raise ValueError(f"expected a norm among {', '.join(NORMS)} after '@', got {norm!r} in {text!r}")
    if needs == "norm":
        if colon:
            raise ValueError(f"{metric} takes @<norm> only (no eps), e.g. `{example}`, got {text!r}")
        return norm, None
    if not colon or not eps_text:
        raise ValueError(f"{metric} needs an eps after the norm ({norm}:<eps>), e.g. `{example}`, "
                         f"got {text!r}")
    try:
        return norm, parse_eps(eps_text)
    except ValueError as exc:
        raise ValueError(f"{exc} in {text!r}") from None


def _parse_value(metric: str, op: str, raw: str, text: str) -> float | str:
    if not raw:
        raise ValueError(f"{SYNTAX}, got {text!r} (no value after {op!r})")
    if metric == "masking_checks":
        if op not in ("==", "!="):
            raise ValueError(f"masking_checks compares with == or != only, got {op!r} in {text!r}")
        word = raw.strip("'\"").lower()
        if word not in MASKING_VALUES:
            raise ValueError(f"expected masking_checks {op} pass or warn, got {raw!r} in {text!r}")
        return word
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number after {op!r}, got {raw!r} in {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number after {op!r}, got {raw!r} in {text!r}")
    if metric in RATES and not 0 <= value <= 1:
        raise ValueError(f"expected a fraction in [0, 1] for {metric} (0.4, not 40), got {raw!r} in {text!r}")
    if value < 0:
        raise ValueError(f"expected a number >= 0 for {metric}, got {raw!r} in {text!r}")
    return value


def parse_line(text: str) -> GateLine:
    """Parse one threshold line; ValueError saying what was expected and what came."""
    expression = text.strip()
    if not expression:
        raise ValueError(f"{SYNTAX}, got an empty line")
    left, op, raw_value = _split_op(expression)
    if not left:
        raise ValueError(f"{SYNTAX}, got {expression!r} (no metric before {op!r})")
    bound = None
    if found := _SUFFIX.search(left):
        bound = found.group(1).lower()
        if bound not in BOUNDS:
            raise ValueError(f"expected .lower or .upper (a bound of the 95% interval) after the metric, "
                             f"got .{found.group(1)} in {expression!r}")
        left = left[:found.start()].strip()
    name, at, suffix = (part.strip() for part in left.partition("@"))
    name = name.lower()
    if name not in METRICS:
        raise ValueError(f"expected a metric among {', '.join(METRICS)}, got {name!r} in {expression!r}")
    if bound is not None and name not in RATES:
        raise ValueError(f"expected .{bound} on a rate ({', '.join(sorted(RATES))}); {name} has no "
                         f"interval, got {expression!r}")
    norm, eps = _parse_target(name, suffix if at else None, expression)
    offset = _parse_baseline(name, bound, op, raw_value, expression)
    if offset is not None:
        return GateLine(expression, name, norm, eps, op, offset, bound, baseline=True)
    value = _parse_value(name, op, raw_value, expression)
    return GateLine(expression, name, norm, eps, op, value, bound)


def _parse_baseline(metric: str, bound: str | None, op: str, raw: str, text: str) -> float | None:
    """The offset of ``baseline [+|- <value>]`` (0 for a bare ``baseline``), None for a plain value."""
    found = _BASELINE.match(raw.strip())
    if found is None:
        return None
    if metric == "masking_checks":
        raise ValueError(f"expected pass or warn after {op!r} (masking_checks has no baseline), got {text!r}")
    if bound is not None:
        raise ValueError(f"expected no .{bound} in a baseline comparison (it compares the two estimates and "
                         f"says whether their difference is significant), got {text!r}")
    sign, number = found.group(1), (found.group(2) or "").strip()
    if sign is None:
        return 0.0
    try:
        offset = float(number)
    except ValueError:
        raise ValueError(f"expected a number after 'baseline {sign}', got {number!r} in {text!r}") from None
    if not math.isfinite(offset) or offset < 0:
        raise ValueError(f"expected a finite number >= 0 after 'baseline {sign}', got {number!r} in {text!r}")
    if metric in RATES and offset > 1:
        raise ValueError(f"expected a fraction in [0, 1] after 'baseline {sign}' (0.01, not 1), got {number!r} "
                         f"in {text!r}")
    return offset if sign == "+" else -offset


def parse_gate(lines: Sequence[str]) -> list[GateLine]:
    """Parse every line; GateError naming the first (0-based) that does not parse."""
    if isinstance(lines, str):
        raise TypeError("expected a sequence of gate lines, got one string")
    parsed = []
    for index, text in enumerate(lines):
        try:
            parsed.append(parse_line(text))
        except ValueError as exc:
            raise GateError(index, str(exc)) from None
    return parsed


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float | str) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _by_eps(table: Any, norm: str, eps: float) -> tuple[str, Any] | None:
    """The entry of ``{"linf:8/255": v, ...}`` whose budget is (norm, eps), matched by value."""
    if not isinstance(table, Mapping):
        return None
    keys = [(key, parsed[1]) for key in table if (parsed := parse_eps_key(str(key))) and parsed[0] == norm]
    hit = match_eps(eps, [value for _, value in keys], EPS_REL_TOL + KEY_REL_TOL)
    return None if hit is None else (str(keys[hit][0]), table[keys[hit][0]])


# (value or None, where it came from / why it is missing, the rate's 95% interval if the result has it)
Measured = tuple[float | str | None, str, Mapping[str, Any] | None]


def _band(result: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    """``result["intervals"][path[0]][path[1]]...``, None where any step is missing."""
    node: Any = result.get("intervals")
    for step in path:
        node = node.get(step) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _eps_entry(result: Mapping[str, Any], metric: str, table: Any, norm: str, eps: float,
               measured: str) -> Measured:
    """``table``'s value at ``norm:eps`` (a per-eps rate of ``metric``) with its interval; where it
    is missing, why, with the grid it does hold (``measured``: a template for that grid)."""
    hit = _by_eps(table, norm, eps)
    if hit is None:
        grid = ", ".join(map(str, table)) if isinstance(table, Mapping) and table else "nothing"
        return None, f"{metric} has no entry for {eps_key(norm, eps)} {measured.format(grid)}", None
    value = _number(hit[1])
    if value is None:
        return None, f"{metric}[{hit[0]}] is not a number", None
    return value, "", _band(result, metric, hit[0])


def _measure(line: GateLine, result: Mapping[str, Any]) -> Measured:
    metric, norm, eps = line.metric, line.norm, line.eps
    if metric == "clean_accuracy":
        value = _number(result.get("clean_accuracy"))
        if value is not None:
            return value, "", _band(result, "clean_accuracy")
        if result.get("labels") == "predicted":
            return None, ("clean_accuracy is null: the inputs came without labels, so predictions had "
                          "nothing to be compared with (send labels, or gate on robust_accuracy)"), None
        return None, "clean_accuracy is not in the result (or is null)", None
    if metric == "masking_checks":
        section = result.get("masking_checks")
        if not isinstance(section, Mapping) or (status := section.get("status")) not in MASKING_VALUES:
            return None, "the result has no masking_checks status", None
        warned = [str(c.get("name")) for c in section.get("checks") or []
                  if isinstance(c, Mapping) and c.get("status") == "warn"]
        return status, f" (warnings: {', '.join(warned)})" if warned else "", None
    assert norm is not None
    if metric == "median_perturbation":
        section = result.get("minimal")
        if not isinstance(section, Mapping) or not section:
            return None, "the minimal-perturbation section did not run", None
        field = f"median_{norm}"
        found = [(v, str(attack)) for attack, entry in section.items() if isinstance(entry, Mapping)
                 if (v := _number(entry.get(field))) is not None]
        if not found:
            return None, f"no minimal-perturbation attack reported {field}", None
        value, attack = min(found)
        return value, f" ({attack})", None
    assert eps is not None
    if metric == "robust_accuracy":
        return _eps_entry(result, metric, result.get(metric), norm, eps, "(the sweep measured {})")
    if metric in DETECTOR_METRICS:
        detector = result.get("detector")
        if not isinstance(detector, Mapping):
            return None, "the detector section did not run (no calibrated detector?)", None
        if not detector.get(metric) and metric == "adaptive_detect_reject_accuracy":
            return None, ("the adaptive attack on the detector did not run (an audit from before it "
                          "existed?)"), None
        return _eps_entry(result, metric, detector.get(metric), norm, eps, "(measured {})")
    # transfer_success_rate: the most successful surrogate at that budget (by the bound, for a bound)
    runs = result.get("transfer")
    if not isinstance(runs, list) or not runs:
        return None, "the transfer section did not run (no surrogates given?)", None
    measured: list[tuple[Mapping[str, Any], float]] = [
        (run, parsed[1]) for run in runs if isinstance(run, Mapping)
        if (parsed := parse_eps_key(str(run.get("eps_label", "")))) and parsed[0] == norm]
    at = match_eps(eps, [value for _, value in measured], EPS_REL_TOL + KEY_REL_TOL)
    found = [] if at is None else [
        (rate, str(run.get("surrogate"))) for run, value in measured
        if value == measured[at][1] and (rate := _number(run.get("success_rate"))) is not None]
    if not found:
        labels = ", ".join(sorted({str(r.get("eps_label")) for r in runs if isinstance(r, Mapping)}))
        return None, f"no transfer run at {eps_key(norm, eps)} (measured {labels or 'nothing'})", None
    bands = [(rate, surrogate, _band(result, "transfer_success_rate", surrogate)) for rate, surrogate in found]
    if line.bound is not None:
        value, surrogate, band = max(bands, key=lambda b: (_bound(b[2], line.bound), b[0]))
    else:
        value, surrogate, band = max(bands, key=lambda b: (b[0], b[1]))
    return value, f" (surrogate {surrogate})", band


def _bound(band: Mapping[str, Any] | None, bound: str | None) -> float:
    value = _number(band.get(bound)) if band is not None and bound is not None else None
    return -math.inf if value is None else value


def evaluate_line(line: GateLine, result: Mapping[str, Any],
                  baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The line's verdict: ``value`` is what was compared (the bound for a ``.lower``/``.upper``
    line), ``estimate`` the measured rate, ``interval`` its 95% interval (None if not a rate).
    ``baseline``: a ``workers.specs.Baseline`` as a dict, for lines that compare with it."""
    if line.baseline:
        return _compare(line, result, baseline)
    value, note, band = _measure(line, result)
    interval = None if band is None else {k: band.get(k) for k in ("lower", "upper", "n")}
    row = {"expression": line.expression, "metric": line.metric, "bound": line.bound, "value": None,
           "estimate": value, "interval": interval, "threshold": line.value, "passed": False}
    if value is None:
        return {**row, "detail": f"not measured: {note}"}
    ci = interval_text(band)
    measured = f"{_fmt(value)}{note}"
    if line.bound is not None:
        compared = _number(band.get(line.bound)) if band is not None else None
        if compared is None:
            return {**row, "detail": f"not measured: the result has no 95% interval for {line.metric} "
                                     f"(measured {measured})"}
        measured = f"{line.bound} bound {_fmt(compared)} (estimate {measured}; {ci})"
        value = compared
    elif ci:
        measured = f"{measured} ({ci})"
    passed = bool(OPS[line.op](value, line.value))
    if passed:
        detail = f"measured {measured} {line.op} {_fmt(line.value)}"
    else:
        detail = f"measured {measured}, expected {line.op} {_fmt(line.value)}"
    return {**row, "value": value, "passed": passed, "detail": detail}


def _interval(band: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if band is None else {k: band.get(k) for k in ("lower", "upper", "n")}


def _compare(line: GateLine, result: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> dict[str, Any]:
    """A line against the baseline: ``value`` and ``baseline_value`` are the two estimates,
    ``difference`` value - baseline value, ``threshold`` baseline value + the line's offset, and
    ``significant`` whether the difference exceeds the noise of the two 95% Wilson intervals (None
    for a figure without one)."""
    value, note, band = _measure(line, result)
    metrics = baseline.get("metrics") if isinstance(baseline, Mapping) else None
    entry = metrics.get(line.key) if isinstance(metrics, Mapping) else None
    reference = None if entry is None else _number(entry.get("value"))
    where = "" if baseline is None else f"audit {baseline.get('audit')} of {baseline.get('model')}"
    about = None if baseline is None else {
        "audit": baseline.get("audit"), "model": baseline.get("model"), "value": reference,
        "interval": _interval(entry.get("interval") if entry else None)}
    row: dict[str, Any] = {
        "expression": line.expression, "metric": line.metric, "bound": None, "value": None, "estimate": value,
        "interval": _interval(band), "threshold": None, "passed": False, "baseline": about,
        "baseline_value": reference, "difference": None, "significant": None}
    if baseline is None:
        return {**row, "detail": "not measured: the line compares with `baseline`, but the audit named none"}
    if entry is None or reference is None:
        return {**row, "detail": f"not measured: the baseline ({where}) has no {line.key}"}
    if not isinstance(value, float):
        return {**row, "detail": f"not measured: {note}" if value is None else f"not a number: {value}"}
    threshold = round(reference + float(line.value), 10)
    difference = round(value - reference, 6)
    noise = significant(band, entry.get("interval"))
    passed = bool(OPS[line.op](value, threshold))
    ci, base_ci = interval_text(band), interval_text(entry.get("interval"))
    verdict = ("significant at 95%" if noise else "within the noise at 95%") if noise is not None else \
        "no interval to judge the noise"
    detail = (f"measured {_fmt(value)}{note}{f' ({ci})' if ci else ''}, baseline {_fmt(reference)} ({where}"
              f"{f'; {base_ci}' if base_ci else ''}), difference {difference:+.4g} ({verdict}); "
              f"{'' if passed else 'expected '}{line.op} {_fmt(threshold)}")
    return {**row, "value": value, "threshold": threshold, "difference": difference, "significant": noise,
            "passed": passed, "detail": detail}


def baseline_metrics(lines: Sequence[GateLine], result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures of a baseline audit's ``result`` that ``lines`` compare with, keyed by
    ``GateLine.key`` (``{"value", "interval", "note"}``); GateError naming the first line whose
    figure the baseline lacks."""
    metrics: dict[str, dict[str, Any]] = {}
    for index, line in enumerate(lines):
        if not line.baseline or line.key in metrics:
            continue
        value, note, band = _measure(line, result)
        if not isinstance(value, float):
            raise GateError(index, f"expected the baseline audit to hold {line.key}, but "
                                   f"{note if value is None else f'it is {value!r}'}")
        interval = None if band is None else {k: band[k] for k in ("k", "n", "lower", "upper") if k in band}
        metrics[line.key] = {"value": value, "interval": interval, "note": note}
    return metrics


def evaluate_gate(lines: Sequence[GateLine], result: Mapping[str, Any],
                  baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"verdict": "pass" | "fail", "lines": [...]}``; the verdict is pass only if every line
    passed (no lines: pass). ``baseline``: see ``evaluate_line``."""
    evaluated = [evaluate_line(line, result, baseline) for line in lines]
    return {"verdict": "pass" if all(e["passed"] for e in evaluated) else "fail", "lines": evaluated}


def metric_keys(result: Mapping[str, Any]) -> list[str]:
    """The gate expressions' left-hand sides that this result can answer."""
    keys = []
    if _number(result.get("clean_accuracy")) is not None:
        keys.append("clean_accuracy")
    robust = result.get("robust_accuracy")
    if isinstance(robust, Mapping):
        keys += [f"robust_accuracy@{k}" for k in robust]
    minimal = result.get("minimal")
    if isinstance(minimal, Mapping):
        for norm in NORMS:
            if any(isinstance(e, Mapping) and _number(e.get(f"median_{norm}")) is not None
                   for e in minimal.values()):
                keys.append(f"median_perturbation@{norm}")
    masking = result.get("masking_checks")
    if isinstance(masking, Mapping) and masking.get("status") in MASKING_VALUES:
        keys.append("masking_checks")
    detector = result.get("detector")
    for metric in DETECTOR_METRICS:
        if isinstance(detector, Mapping) and isinstance(detector.get(metric), Mapping):
            keys += [f"{metric}@{k}" for k in detector[metric]]
    transfer = result.get("transfer")
    if isinstance(transfer, list):
        labels = dict.fromkeys(str(r["eps_label"]) for r in transfer
                               if isinstance(r, Mapping) and r.get("eps_label"))
        keys += [f"transfer_success_rate@{label}" for label in labels]
    return keys
