"""Field types the settings share.

Durations follow one convention: the unit is in the name (``lease_ms``, ``retention_s``),
and the value is a number in that unit or a duration with its own (``"500ms"``,
``"30s"``, ``"2m"``, ``"1h"``), as in the environment, where every value is a string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator

from mediator.core.durations import parse_duration_ms

__all__ = [
    "DurationMs",
    "DurationS",
    "comma_separated",
    "renamed_durations",
    "seconds_or_duration_ms",
]

_NUMBER = re.compile(r"[+-]?\d+(\.\d*)?")


def comma_separated(value: Any) -> Any:
    """A list setting written as one string (``a,b``, as in the environment) split into its
    parts; any other value as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _with_unit(value: str) -> int:
    """Milliseconds of a duration string that names its unit."""
    millis = parse_duration_ms(value)
    if millis is None or _NUMBER.fullmatch(value.strip()):
        msg = f"{value!r} is not a duration (e.g. 500ms, 30s, 2m, 1h)"
        raise ValueError(msg)
    return millis


def _ms(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.lstrip("+-").isdigit() else _with_unit(text)
    return value


def _s(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return float(text) if _NUMBER.fullmatch(text) else _with_unit(text) / 1000
    return value


#: A duration in milliseconds: a number of them, or a duration string.
DurationMs = Annotated[int, BeforeValidator(_ms)]
#: A duration in seconds: a number of them, or a duration string.
DurationS = Annotated[float, BeforeValidator(_s)]


def seconds_or_duration_ms(value: Any) -> int:
    """Milliseconds of a duration as the workflow language writes them (``"60s"``,
    ``"500ms"``; a bare number is seconds)."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        millis = parse_duration_ms(value)
        if millis is not None:
            return millis
    msg = f"{value!r} is not a duration (e.g. 60s, 500ms, 2m, or seconds as a number)"
    raise ValueError(msg)


def renamed_durations(data: Any, names: Mapping[str, str]) -> Any:
    """Settings given under a duration's earlier name (no unit in it: a number is seconds,
    as in the workflow language) moved to its name with a unit, in milliseconds."""
    if not isinstance(data, dict) or not any(old in data for old in names):
        return data
    data = dict(data)
    for old, new in names.items():
        if old in data:
            if new in data:
                msg = f"{old} and {new} are one setting (give {new})"
                raise ValueError(msg)
            data[new] = seconds_or_duration_ms(data.pop(old))
    return data
