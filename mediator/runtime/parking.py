"""Breaker upkeep on every replica: refresh the shared breaker states, and drain the
parked queues of services whose breaker closed, oldest first, at a bounded rate.

A step parked while its service's breaker was open waits, as the name of its ``unpark``
timer, in the service's parked queue (one sorted set per shard, scored by when it was
parked). Once the breaker is closed, one replica at a time (a short lease per service)
moves at most ``circuit_breaker.drain_rate`` of them per second, oldest first across
shards, into the timer sets, due at once: the timer poller of any replica then sends
their commands through the ordinary commit path. So a backlog drains as a steady stream,
not a stampede, and a step that timed out while parked is simply a stale timer. While a
breaker is open past its recovery timeout, the oldest parked step is released alone: it
becomes the probe, so a backlog with no new traffic still finds out the service is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis

from mediator.clock import now_ms
from mediator.runtime.breakers import Breakers
from mediator.runtime.periodic import Periodic
from mediator.settings import BackoffSettings
from mediator.storage.keys import Keys
from mediator.storage.parked import ParkedQueues

__all__ = ["BreakerUpkeep"]

log = logging.getLogger("mediator.parking")


class BreakerUpkeep(Periodic):
    """Refreshes breaker mirrors and drains parked queues, every ``refresh_ms``."""

    name = "breaker-upkeep"
    label = "breaker upkeep"
    failed = "breaker upkeep failed"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        breakers: Breakers,
        services: Callable[[], Iterable[str]],
        replica: str,
        backoff: BackoffSettings | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.queues = ParkedQueues(redis, keys)
        self.breakers = breakers
        self.services = services
        self.replica = replica
        self._credit: dict[str, float] = {}
        self.released = 0
        #: Services with a flow-control limit: their queue drains as the limit allows.
        self.limited: frozenset[str] = frozenset()

    @property
    def interval_s(self) -> float:
        return self.breakers.settings.refresh_ms / 1000

    async def tick(self) -> int:
        """Refresh every breaker, then release what closed breakers allow; how many.
        Services no loaded definition names are drained too, if steps were ever parked
        for them (runs still on an older stored plan)."""
        services = sorted({*self.services(), *await self.breakers.parking_services()})
        await self.breakers.refresh(services)
        released = 0
        now = now_ms()
        rate = self.breakers.settings.drain_rate
        for service in services:
            gate = self.breakers.gate(service, now)
            if gate == "probe":
                # Open past its recovery timeout: release the oldest parked step alone; its
                # command, sent by whichever replica fires it, is the one probe.
                if await self._lead(service):
                    released += await self._release(service, 1)
                continue
            if gate != "send" or service in self.limited:
                # (A limited service's queue is released by its limit: `runtime.flow`.)
                self._credit.pop(service, None)
                continue
            # Credit accrues at `drain_rate` per second, and is capped at one second's.
            credit = min(rate, self._credit.get(service, 0.0) + rate * self.interval_s)
            budget = int(credit)
            self._credit[service] = credit
            if budget < 1 or not await self._lead(service):
                continue
            moved = await self._release(service, budget)
            self._credit[service] = credit - moved
            released += moved
        self.released += released
        return released

    async def _lead(self, service: str) -> bool:
        """Hold the drain lease of `service` (one replica drains it at a time)."""
        ttl = max(100, int(self.breakers.settings.refresh_ms * 3))
        return await self.queues.lead(service, self.replica, ttl)

    async def _release(self, service: str, budget: int) -> int:
        """Move the `budget` oldest parked steps of `service` to the timer sets."""
        moved = await self.queues.release(service, budget)
        if moved:
            log.info("parked steps of %s: %d released", service, moved)
        return moved

    async def round(self) -> float:
        """One tick. A tick that fails leaves breaker states as last read; nothing parked
        is lost: it waits for the next."""
        await self.tick()
        return self.interval_s
