"""95% confidence intervals of the audit's proportions (accuracies, success and detection rates).

Wilson's score interval (Wilson 1927; recommended over the normal approximation by Brown, Cai and
DasGupta 2001, "Interval estimation for a binomial proportion"): for ``k`` successes in ``n``
trials, ``p = k / n`` and ``z`` the 97.5% normal quantile,

    (p + z^2 / 2n  -/+  z * sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n).

Unlike ``p -/+ z sqrt(p (1 - p) / n)`` it stays inside [0, 1] and is not empty at 0/n or n/n,
which is where a robust accuracy often sits. Torch-free and stdlib only: the gate imports it.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.959964
DIGITS = 4
BOUNDS = ("lower", "upper")


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval of ``k`` successes in ``n > 0`` trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(k: int, n: int) -> dict[str, Any] | None:
    """``{"k", "n", "lower", "upper"}`` (95%, bounds rounded outwards to 4 digits so that a gate on
    a bound never reads a tighter interval than the data gives); None when ``n`` is 0."""
    if n <= 0:
        return None
    lower, upper = wilson(k, n)
    step = 10**DIGITS
    # the 1e-9 absorbs float noise in the scaling (0.49 * 1e4 is 4899.999...)
    return {"k": int(k), "n": int(n), "lower": math.floor(lower * step + 1e-9) / step,
            "upper": min(1.0, math.ceil(upper * step - 1e-9) / step)}


def text(entry: Any) -> str:
    """``"95% CI 0.4902-0.9433, n=10"``, or "" for anything that is not an interval."""
    if not isinstance(entry, dict) or not all(isinstance(entry.get(b), int | float) for b in BOUNDS):
        return ""
    return f"95% CI {entry['lower']:.4f}-{entry['upper']:.4f}, n={entry.get('n', '?')}"


def difference(k1: int, n1: int, k2: int, n2: int, z: float = Z) -> tuple[float, float]:
    """95% interval of ``k1/n1 - k2/n2`` from the two Wilson intervals: Newcombe's hybrid score
    interval (Newcombe 1998, "Interval estimation for the difference between independent
    proportions: comparison of eleven methods", method 10),

        d - sqrt((p1 - l1)^2 + (u2 - p2)^2),   d + sqrt((u1 - p1)^2 + (p2 - l2)^2).

    It treats the two samples as independent; on the same images (a baseline audit on the same
    data) the two rates are positively correlated, so the interval is wider than a paired test's
    and a difference it calls significant is one."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def significant(first: Any, second: Any) -> bool | None:
    """Whether two rates (intervals ``{k, n, ...}`` as ``interval`` makes them) differ at 95%: the
    ``difference`` interval excludes 0. None when either lacks its counts."""
    counts = []
    for entry in (first, second):
        if not isinstance(entry, dict):
            return None
        k, n = entry.get("k"), entry.get("n")
        if not isinstance(k, int | float) or not isinstance(n, int | float) or not 0 <= k <= n or n <= 0:
            return None
        counts += [int(k), int(n)]
    lower, upper = difference(*counts)
    return lower > 0 or upper < 0
