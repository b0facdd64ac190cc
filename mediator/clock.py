"""The clocks the runtime reads: the wall clock, as every ``*_ms`` field of the contract
counts it, and a monotonic clock for elapsed time (leases, backoffs, grace periods).

Both are read through one replaceable source, so a simulation can run the real runtime on
a clock it drives (`use`); production never replaces it. The engine reads neither: time is
passed to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

__all__ = ["Clock", "SystemClock", "monotonic", "now_ms", "use"]


class Clock(Protocol):
    """Where the runtime's time comes from."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


_source: Clock = SystemClock()


def now_ms() -> int:
    """Milliseconds since the Unix epoch, as every ``*_ms`` field of the contract counts."""
    return _source.now_ms()


def monotonic() -> float:
    """Seconds on a monotonic clock, for elapsed time."""
    return _source.monotonic()


@contextlib.contextmanager
def use(clock: Clock) -> Iterator[Clock]:
    """Read time from `clock` until the block ends (simulations drive their own)."""
    global _source
    previous, _source = _source, clock
    try:
        yield clock
    finally:
        _source = previous
