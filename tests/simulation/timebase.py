"""Simulated time: one clock for the runtime, Redis's ``TIME`` and expiry, and pybreaker.

The runtime reads `mediator.clock`; the store's scripts read Redis's clock (``TIME``);
pybreaker stamps when a breaker opened with `datetime.now`. Inside `SimClock.installed` all
three read the simulation's clock, which moves only when the scheduler moves it, so a seed
replays exactly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time as _time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis._helpers
import fakeredis._socket._base
import fakeredis.commands_mixins.server_mixin
import pybreaker

from mediator import clock

__all__ = ["START_MS", "SimClock"]

#: Where every simulation's clock starts (2027-01-15): a plain, recognisable epoch.
START_MS = 1_800_000_000_000

_FAKEREDIS_TIME_MODULES = (
    fakeredis._helpers,
    fakeredis._socket._base,
    fakeredis.commands_mixins.server_mixin,
)


class SimClock:
    """Milliseconds that move only by `advance`."""

    def __init__(self, start_ms: int = START_MS) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.ms / 1000

    def advance(self, delta_ms: int) -> None:
        self.ms += delta_ms

    @contextlib.contextmanager
    def installed(self) -> Iterator[SimClock]:
        """Make the runtime, fakeredis and pybreaker read this clock within the block."""
        sim = self
        fake_time = SimpleNamespace(
            **{name: getattr(_time, name) for name in dir(_time) if not name.startswith("_")}
        )
        fake_time.time = lambda: sim.ms / 1000

        class _SimDatetime(_dt.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> _SimDatetime:
                moment = _dt.datetime.fromtimestamp(sim.ms / 1000, tz or _dt.UTC)
                return cls(*moment.timetuple()[:6], moment.microsecond, tzinfo=moment.tzinfo)

        saved: list[tuple[Any, str, Any]] = [
            (module, "time", module.time) for module in _FAKEREDIS_TIME_MODULES
        ]
        saved.append((pybreaker, "datetime", pybreaker.datetime))
        try:
            for module in _FAKEREDIS_TIME_MODULES:
                module.time = fake_time  # type: ignore[attr-defined]
            pybreaker.datetime = _SimDatetime  # type: ignore[misc]
            with clock.use(self):
                yield self
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
