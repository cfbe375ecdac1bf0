"""Lengths of time as people read them, for the estimates that training and certification print."""
from __future__ import annotations

import math

DAY = 86_400.0


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h', '4.2 days', '1,234 years': two significant figures or so, never a false digit
    of precision for an estimate."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * DAY:
        return f"{seconds / DAY:,.1f} days"
    return f"{seconds / (365.25 * DAY):,.0f} years"
