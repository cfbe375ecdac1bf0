"""Checks of values a user gives (options, API arguments), each refused in one line that names the limit,
before any arithmetic or allocation uses them."""
from __future__ import annotations

import math
from numbers import Integral, Real

from rrcm.errors import UserError

MAX_SEED = 2**63 - 1  # seeds are derived and packed as signed 64-bit integers


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high] (no upper limit when high is None); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low:,}, {high:,}]" if high is not None else f">= {low:,}"
        raise UserError(f"{name} must be {bound}, got {value:,}")
    return int(value)


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the interval from low to high (open at an end where told)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise UserError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
    return value
