"""Durations as people write them in workflow files: ``1.5``, ``"250ms"``, ``"5s"``, ``"2m"``."""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["MAX_DURATION_MS", "parse_duration_ms"]

_UNITS_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration_ms(value: object) -> int | None:
    """Milliseconds for a duration, or None if the value is not one.

    Numbers are seconds. Strings carry an optional unit (ms, s, m, h; seconds if absent).
    Zero, negative, non-finite and absurdly long durations are not durations.
    """
    try:
        return _parse(value)
    except TypeError:  # unhashable: certainly not a duration
        return None


#: Longer than any timeout or backoff means: a year. Also keeps millisecond sums in int64.
MAX_DURATION_MS = 365 * 24 * 3600 * 1000


@lru_cache(maxsize=1024, typed=True)  # typed: True and 1 must not share an entry
def _parse(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            millis = float(value) * 1000.0
        except OverflowError:  # an int beyond float range
            return None
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            return None
        millis = float(match.group(1)) * _UNITS_MS[match.group(2) or "s"]
    else:
        return None
    # `millis >= 1` is false for NaN; infinity (YAML `.inf`) has no integer value.
    return round(millis) if 1 <= millis <= MAX_DURATION_MS else None
