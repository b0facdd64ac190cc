"""The wall clock, as every ``*_ms`` field of the contract counts it."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """Milliseconds since the Unix epoch, as every ``*_ms`` field of the contract counts."""
    return time.time_ns() // 1_000_000
