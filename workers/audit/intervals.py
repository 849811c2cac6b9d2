"""95% Wilson intervals: they live in ``contracts.intervals`` (the client prints them too);
re-exported here for the workers' imports."""

from contracts.intervals import (  # noqa: F401 - re-exported
    BOUNDS,
    CONFIDENCE,
    DIGITS,
    Z,
    difference,
    interval,
    significant,
    text,
    wilson,
)

__all__ = [
    "CONFIDENCE",
    "Z",
    "DIGITS",
    "BOUNDS",
    "wilson",
    "interval",
    "text",
    "difference",
    "significant",
]
