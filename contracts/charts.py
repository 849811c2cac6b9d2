"""Robust-accuracy charts as inline SVG, drawn by matplotlib (its SVG backend; no browser, no torch).

One function draws every accuracy-against-eps chart the project shows: the audit report's curves
(one series per attack and the worst case) and the web page's model history (one series per model
version). The eps axis is numeric and starts at 0, so uneven grids (1/255 ... 0.3) keep their spacing,
and the clean accuracy sits at eps 0. Every series has its own colour, dash pattern and hollow marker
shape, so that series which coincide (the worst case always coincides with some attack) all stay
visible and read without colour; the emphasised series (the worst case) is drawn wide and pale
beneath the others. 95% intervals are error bars.

matplotlib is imported on first use: importing this module costs nothing, so the gateway starts as
fast as before and pays the import (about a second) on its first chart only. It lives in ``contracts``
because both sides draw with it (``workers.audit.report``, ``service.ui.summary``); the client
distribution never imports it.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Okabe-Ito colours (told apart with the common colour-vision deficiencies), yellow left out as too
# pale on white; then dash patterns and hollow marker shapes, so no series depends on colour alone.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#7f7f7f")
DASHES: tuple[Any, ...] = ("-", (0, (6, 2)), (0, (1.5, 1.5)), (0, (7, 2, 1.5, 2)), (0, (3, 1.5)),
                           (0, (1, 3)), (0, (10, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
EMPHASIS_COLOR = "#222222"
# rcParams are process-wide and savefig reads them: one chart at a time (the gateway renders in a
# thread pool). Rendering is CPU-bound under the GIL anyway.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Series:
    """One line: ``y`` (fractions in [0, 1]; None or NaN: no point) at ``x`` (eps), with optional
    95% interval bounds ``low``/``high`` per point, drawn as error bars. ``emphasis`` draws it
    wide, pale and dashed beneath the others (the worst case)."""

    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    low: Sequence[float | None] = field(default=())
    high: Sequence[float | None] = field(default=())
    emphasis: bool = False


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _label(text: str) -> str:
    """``text`` as matplotlib shows it literally: no mathtext between dollars, and a leading
    underscore (which hides a legend entry) kept visible."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _points(series: Series) -> tuple[list[float], list[float], list[float], list[float]]:
    """The plottable points: x, y, and the error bar's extent below and above y (0 where none)."""
    xs, ys, below, above = [], [], [], []
    for i, (x, y) in enumerate(zip(series.x, series.y, strict=False)):
        if not (_finite(x) and _finite(y)):
            continue
        low = series.low[i] if i < len(series.low) else None
        high = series.high[i] if i < len(series.high) else None
        xs.append(float(x))
        ys.append(float(y))  # type: ignore[arg-type]
        below.append(max(float(y) - float(low), 0.0) if _finite(low) else 0.0)  # type: ignore[arg-type]
        above.append(max(float(high) - float(y), 0.0) if _finite(high) else 0.0)  # type: ignore[arg-type]
    return xs, ys, below, above


def accuracy_chart_svg(title: str, x_title: str, series: Sequence[Series], *, chart_id: str,
                       x_eps: Sequence[float] = (), width_in: float = 7.4,
                       height_in: float = 3.4) -> str:
    """An ``<svg>`` element (no XML prologue, ready to inline in HTML) of robust accuracy (y, 0-100%)
    against eps (x, numeric, from 0). ``chart_id`` keeps the element ids of several charts on one
    page apart; each series is the group ``<g id="{chart_id}-series-{i}">`` in the order given, its
    name in the legend at the right, its 95% intervals (if any) ``<g id="{chart_id}-intervals-{i}">``.
    ``x_eps``: the grid's eps, marked on the axis (labelled with round numbers, since grids such as
    1/255, 2/255, 4/255 ... 0.3 crowd near 0)."""
    import matplotlib  # never pyplot: no global figure state, no backend to choose
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    safe_id = re.sub(r"[^A-Za-z0-9_-]", "-", chart_id)
    rc: dict[str, Any] = {"svg.fonttype": "none", "svg.hashsalt": safe_id, "font.size": 9,
                          "axes.titlesize": 11, "axes.titleweight": "bold", "font.family": "sans-serif"}
    with _LOCK, matplotlib.rc_context(rc):  # type: ignore[arg-type]
        figure = Figure(figsize=(width_in, height_in), dpi=100)
        FigureCanvasSVG(figure)
        ax = figure.add_subplot()
        x_max = 0.0
        plain = 0
        for i, line in enumerate(series):
            xs, ys, below, above = _points(line)
            if not xs:
                continue
            x_max = max(x_max, *xs)
            bars = [below, above] if any(below) or any(above) else None
            if line.emphasis:
                style: dict[str, Any] = dict(color=EMPHASIS_COLOR, linewidth=6, alpha=0.3,
                                             linestyle=(0, (4, 2)), marker="o", markersize=4,
                                             zorder=1, ecolor=EMPHASIS_COLOR, elinewidth=1.2, capsize=4)
            else:
                k = plain
                plain += 1
                colour = COLORS[k % len(COLORS)]
                style = dict(color=colour, linewidth=1.6, linestyle=DASHES[k % len(DASHES)],
                             marker=MARKERS[k % len(MARKERS)], markersize=6.5, markerfacecolor="none",
                             markeredgewidth=1.4, zorder=3 + k, ecolor=colour, elinewidth=1,
                             capsize=3)
            drawn = ax.errorbar(xs, ys, yerr=bars, label=_label(line.name), **style)
            drawn.lines[0].set_gid(f"{safe_id}-series-{i}")
            for bar in drawn.lines[2]:  # the 95% intervals: one vertical segment per point
                bar.set_gid(f"{safe_id}-intervals-{i}")
                if line.emphasis:
                    bar.set_alpha(0.8)
        ax.set_xlim(left=0, right=(x_max * 1.04) if x_max > 0 else 1.0)
        ax.set_ylim(-0.03, 1.03)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if x_eps:
            # Round numbers label the axis; short marks inside it show where the grid's eps lie.
            ax.set_xticks(sorted({float(x) for x in x_eps}), minor=True)
            ax.tick_params(axis="x", which="minor", direction="in", length=6, width=1, color="#777777")
        ax.grid(True, color="#e3e3e3", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.set_xlabel(_label(x_title))
        ax.set_ylabel("robust accuracy")
        ax.set_title(_label(title), loc="left")
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5,
                      handlelength=3.2)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return _inline(buffer.getvalue(), safe_id, title)


def _inline(svg: str, chart_id: str, title: str) -> str:
    """matplotlib's SVG document as an element for an HTML page: no prologue, no metadata, ids that
    do not clash with another chart's, an accessible name."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    # matplotlib numbers its own groups (figure_1, axes_1, line2d_3, ...) from 1 in every chart.
    svg = re.sub(r'id="((?:figure|axes|patch|matplotlib|xtick|ytick|line2d|text|legend|'
                 r'LineCollection|PathCollection|PolyCollection)[A-Za-z0-9_.]*)"',
                 rf'id="{chart_id}-\1"', svg)
    from html import escape

    return svg.replace("<svg ", f'<svg role="img" aria-label="{escape(title, quote=True)}" ', 1)
