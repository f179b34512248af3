"""How figures are printed: one percent formatter for the report, the demo figure and every table."""

from __future__ import annotations

import math


def percent_number(value: float, digits: int = 2) -> str:
    """``100 * value`` with ``digits`` decimals, and more where rounding would lie: a value that is not exactly 1
    never prints as 100 (0.99996 -> ``99.996``), nor a value that is not exactly 0 as 0 (3e-5 -> ``0.003``)."""
    value = float(value) + 0.0  # -0.0 -> 0.0
    scaled = 100 * value
    d = max(int(digits), 0)
    while True:
        text = f"{scaled:.{d}f}"
        shown = float(text)
        if ((value == 0 or shown != 0) and (value == 1 or shown != 100)) or d >= max(digits, 17):
            break
        d += 1
    if shown == 0 and value != 0:  # smaller than 17 decimals show
        return f"{scaled:.2e}"
    if shown == 100 and value != 1:  # within a rounding error of 1
        return "< 100" if value < 1 else "> 100"
    return text


def pct(value: float | None, digits: int = 2) -> str:
    """The report's one percent formatter (see :func:`percent_number`); ``–`` when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{percent_number(value, digits)} %"


def pp(value: float | None, digits: int = 2) -> str:
    """A difference of two rates in percentage points, by the same rule as :func:`pct`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{percent_number(value, digits)} pp"
