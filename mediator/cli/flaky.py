"""A demo action that misbehaves the way real dependencies do, so `mediator dev` shows the
fault handling at work: a share of calls fail with a retryable error, a few stall past their
step's timeout, and now and then an outage fails every call for a while (long enough for the
service's circuit breaker to open, park its commands, probe and close again)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mediator.sdk.worker import ActionError

__all__ = ["Flakiness", "Flaky"]

Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Flakiness:
    """How a flaky action misbehaves; times in seconds."""

    #: Share of calls outside an outage that fail with a retryable error.
    error_rate: float = 0.05
    #: Share of calls outside an outage that stall for ``stall`` before answering.
    stall_rate: float = 0.02
    stall: float = 4.0
    #: The first outage starts this long after the first call, then one every ``outage_every``.
    first_outage: float = 1.5
    outage_every: float = 30.0
    outage: float = 2.5


class Flaky:
    """Wraps an action with `Flakiness`; ``on_phase`` hears when an outage starts and ends."""

    def __init__(
        self,
        name: str,
        action: Action,
        flakiness: Flakiness,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.action = action
        self.flakiness = flakiness
        self._rng = rng or random.Random()
        self._clock = clock
        self._on_phase = on_phase
        self._first: float | None = None
        self._down = False

    def in_outage(self, now: float) -> bool:
        """Whether ``now`` falls in an outage (the schedule starts at the first call)."""
        if self._first is None:
            self._first = now
        f = self.flakiness
        since = now - self._first - f.first_outage
        return since >= 0 and since % f.outage_every < f.outage

    async def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        down = self.in_outage(self._clock())
        if down != self._down:
            self._down = down
            if self._on_phase is not None:
                self._on_phase(
                    f"{self.name}: outage, every call fails for {self.flakiness.outage:g}s"
                    if down
                    else f"{self.name}: outage over"
                )
        if down:
            msg = f"{self.name} is unavailable (503)"
            raise ActionError(msg, code="unavailable", retryable=True)
        roll = self._rng.random()
        if roll < self.flakiness.error_rate:
            msg = f"{self.name} is busy, try again"
            raise ActionError(msg, code="busy", retryable=True)
        if roll < self.flakiness.error_rate + self.flakiness.stall_rate:
            await asyncio.sleep(self.flakiness.stall)
        return await self.action(data)
