"""Sentences that state a finding, computed from the numbers they describe (so they cannot go stale).

`curve_shape` names the shape of a curve over depth ("rises", "falls", "U", "inverted U", "flat", "mixed")
with a stated tolerance (`binomial_tolerance`: a few standard errors of the rates it compares); `percent` and `number` format values for people. Used by chapters 1 to 3.
"""

from __future__ import annotations

import math
from typing import Sequence


def turning_legs(y: Sequence[float], tol: float) -> list[int]:
    """Directions (+1 up, -1 down) of the legs of y once moves of at most `tol` are ignored (a zig-zag filter).

    A new leg starts only when y moves more than `tol` away from the running extreme of the current leg, so a
    slow rise in small steps still counts as a rise, and a wiggle smaller than `tol` is not a turn.
    """
    values = [float(v) for v in y if not math.isnan(float(v))]
    legs: list[int] = []
    if not values:
        return legs
    low = high = extreme = values[0]
    for v in values[1:]:
        direction = legs[-1] if legs else 0
        if direction == 0:
            low, high = min(low, v), max(high, v)
            if v > low + tol:
                legs.append(+1)
                extreme = high
            elif v < high - tol:
                legs.append(-1)
                extreme = low
        elif direction > 0:
            if v > extreme:
                extreme = v
            elif v < extreme - tol:
                legs.append(-1)
                extreme = v
        else:
            if v < extreme:
                extreme = v
            elif v > extreme + tol:
                legs.append(+1)
                extreme = v
    return legs


def curve_shape(y: Sequence[float], tol: float) -> str:
    """The shape of y in words: "flat", "rises", "falls", "inverted U", "U" or "mixed (n turns)".

    tol: the smallest change that counts, in y's units (see `turning_legs`). Needs 3 points for U shapes.
    """
    values = [float(v) for v in y if not math.isnan(float(v))]
    if len(values) < 2:
        return "too few points"
    legs = turning_legs(values, tol)
    if not legs:
        return "flat"
    if len(legs) == 1:
        return "rises" if legs[0] > 0 else "falls"
    if len(legs) == 2:
        return "inverted U" if legs[0] > 0 else "U"
    return f"mixed (changes direction {len(legs) - 1} times)"


def binomial_tolerance(rates: Sequence[float], n: int, n_se: float) -> float:
    """`n_se` binomial standard errors of a rate at the curve's mean level, with n observations per point."""
    values = [float(v) for v in rates if not math.isnan(float(v))]
    p = sum(values) / len(values) if values else math.nan
    return n_se * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def shape_words(shape: str) -> str:
    """A `curve_shape` as the verb phrase of a sentence: 'rises', 'is flat', 'has a U shape', ..."""
    return {"flat": "is flat", "U": "has a U shape", "inverted U": "has an inverted-U shape",
            "too few points": "has too few points to tell"}.get(shape, shape if not shape.startswith("mixed")
                                                                 else "is " + shape)


def percent(x: float, digits: int = 1) -> str:
    """0.1234 -> '12.3%'; NaN -> 'n/a'."""
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def number(x: float, digits: int = 2) -> str:
    """1500000 -> '1,500,000'; 0.912 -> '0.91'; NaN -> 'n/a'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if float(x).is_integer() and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    """a / b as '2.3x', or 'n/a' when b is 0 or missing."""
    if b is None or math.isnan(b) or b == 0 or math.isnan(a):
        return "n/a (the null rate is 0)"
    return f"{a / b:.1f}x"
