"""What the pages say about a model's audits: the headline robust accuracy of one audit, and the
history chart (robust accuracy per eps, one line per version). Input: the history store's audit
summaries (``HistoryStore.audits``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from contracts.gate import eps_key, parse_eps_key, parse_line
from contracts.specs import DEFAULT_CHECK_EPS

# Series one chart can tell apart by colour, dash and marker (contracts.charts): the newest.
MAX_VERSIONS = 7


def headline(audit: Mapping[str, Any]) -> dict[str, Any] | None:
    """The robust accuracy that sums an audit up: at the budget of its gate's first robust-accuracy
    line (what the release is judged at), else at the eps nearest the norm's check eps (0.1 for
    Linf, 1 for L2), else its first figure. ``{"key", "value", "low", "high"}`` or None."""
    figures: Mapping[str, Any] = audit.get("robust_accuracy") or {}
    parsed = {key: parse_eps_key(key) for key in figures}
    usable = {key: where for key, where in parsed.items() if where is not None}
    if not usable:
        return None
    chosen: str | None = None
    for line in audit.get("gate") or []:
        if not isinstance(line, Mapping) or line.get("metric", "robust_accuracy") != "robust_accuracy":
            continue
        try:
            gate = parse_line(str(line.get("expression", "")))
        except ValueError:
            continue
        if gate.metric == "robust_accuracy" and gate.norm is not None and gate.eps is not None:
            chosen = _nearest(usable, gate.norm, gate.eps)
            if chosen is not None:
                break
    if chosen is None:
        norm = next(iter(usable.values()))[0]
        chosen = _nearest(usable, norm, DEFAULT_CHECK_EPS.get(norm, 0.0)) or next(iter(usable))
    figure = figures.get(chosen) or {}
    if not isinstance(figure, Mapping):
        figure = {"value": figure}
    return {"key": chosen, "value": figure.get("value"), "low": figure.get("low"), "high": figure.get("high")}


def _nearest(usable: Mapping[str, tuple[str, float]], norm: str, eps: float) -> str | None:
    keys = [key for key, (n, _) in usable.items() if n == norm]
    return min(keys, key=lambda k: abs(usable[k][1] - eps)) if keys else None


def history_charts(name: str, audits: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One chart per norm: robust accuracy against eps, a line per version (its newest audit), from
    the clean accuracy at eps 0, with the 95% intervals as error bars. ``audits`` newest first.
    Drawn once per set of audits (matplotlib takes a good part of a second per chart on a busy
    machine) and kept while no newer audit of the model comes in."""
    latest: dict[Any, Mapping[str, Any]] = {}
    for audit in audits:
        latest.setdefault(audit.get("version"), audit)
    versions = sorted(latest, key=lambda v: (v is None, v))[-MAX_VERSIONS:]
    shown = [{k: latest[v].get(k) for k in ("id", "version", "suite", "n", "clean_accuracy",
                                            "robust_accuracy")} for v in versions]
    return [dict(chart) for chart in _charts(name, json.dumps(shown, sort_keys=True))]


@lru_cache(maxsize=256)
def _charts(name: str, shown_json: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    from contracts.charts import Series, accuracy_chart_svg  # matplotlib: on the first chart only

    by_norm: dict[str, list[Any]] = {}
    for audit in json.loads(shown_json):
        version = audit["version"]
        points: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
        for key, figure in (audit.get("robust_accuracy") or {}).items():
            where = parse_eps_key(key)
            if where is not None and isinstance(figure, Mapping):
                points.setdefault(where[0], []).append((where[1], figure))
        clean = audit.get("clean_accuracy")
        for norm, found in points.items():
            found.sort(key=lambda p: p[0])
            start = [clean] if clean is not None else []
            xs = [0.0] * len(start) + [eps for eps, _ in found]
            label = f"v{version}" if version is not None else "unversioned"
            by_norm.setdefault(norm, []).append(Series(
                f"{label} ({audit.get('suite') or 'custom'}, n={audit.get('n')})", xs,
                [*start, *(f.get("value") for _, f in found)],
                [None] * len(start) + [f.get("low") for _, f in found],
                [None] * len(start) + [f.get("high") for _, f in found]))
    charts = []
    for norm, series in by_norm.items():
        grid = sorted({x for line in series for x in line.x if x > 0})
        svg = accuracy_chart_svg(f"{name}: robust accuracy per version ({norm})", f"eps ({norm})", series,
                                 chart_id=f"history-{norm}", x_eps=grid)
        charts.append((("norm", norm), ("svg", svg), ("eps", ", ".join(eps_key(norm, e) for e in grid))))
    return tuple(charts)
