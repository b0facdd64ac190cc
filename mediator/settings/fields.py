"""Field types the settings share."""

from __future__ import annotations

from typing import Any

__all__ = ["comma_separated"]


def comma_separated(value: Any) -> Any:
    """A list setting written as one string (``a,b``, as in the environment) split into its
    parts; any other value as it is."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
