"""Narrates the fault machinery for `mediator dev`: breakers opening, probing and closing,
and parked backlogs growing and draining, read from the state every replica shares in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio import Redis

from mediator.ops.control import breaker_states
from mediator.storage.errors import REDIS_ERRORS
from mediator.storage.keys import Keys
from mediator.storage.parked import parked_counts

__all__ = ["FaultWatch"]


class FaultWatch:
    """Polls breakers and parked queues; says what changed, in a line each."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        services: Iterable[str],
        echo: Callable[[str], None],
        *,
        interval: float = 0.2,
        backlog_every: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.services = sorted(services)
        self.echo = echo
        self.interval = interval
        self.backlog_every = backlog_every
        self._states: dict[str, str] = {}
        self._parked: dict[str, int] = {}
        self._said_backlog: dict[str, float] = {}

    async def run(self) -> None:
        """Until cancelled; a Redis error skips one look. A cancel that arrives while a
        look waits on Redis can surface as a Redis error (redis-py cuts the read short and
        raises its own): the watch stops then too, rather than swallow it and run on."""
        task = asyncio.current_task()
        while True:
            try:
                await self.look()
            except (*REDIS_ERRORS, OSError):
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
            await asyncio.sleep(self.interval)

    async def look(self) -> None:
        """Compare the breakers and parked queues with the previous look."""
        breakers = await breaker_states(self.redis, self.keys)
        parked = await parked_counts(self.redis, self.keys, self.services)
        for service, doc in breakers.items():
            self._breaker(service, doc, parked.get(service, 0))
        now = time.monotonic()
        for service, count in parked.items():
            self._backlog(service, count, now)

    def _breaker(self, service: str, doc: dict[str, Any], parked: int) -> None:
        state = doc["state"]
        before = self._states.get(service, "closed")
        self._states[service] = state
        if state == before:
            return
        if state == "open":
            again = " again: the probe failed" if before == "half-open" else ""
            self.echo(
                f"  ! breaker {service} OPEN{again} ({doc['failures']} failures): "
                "its commands park instead of being sent"
            )
        elif state == "half-open":
            self.echo(f"  ! breaker {service} half-open: one probe goes out")
        else:
            backlog = f"; parked steps drain ({parked} now)" if parked else ""
            self.echo(f"  ! breaker {service} closed{backlog}")

    def _backlog(self, service: str, count: int, now: float) -> None:
        before = self._parked.get(service, 0)
        if count == before:
            return
        if count == 0:
            self.echo(f"  ! parked {service}: drained")
        elif (said := self._said_backlog.get(service)) is None or now - said >= self.backlog_every:
            self.echo(f"  ! parked {service}: {count} step{'' if count == 1 else 's'} waiting")
        else:
            return  # said recently; the count is kept at what was said
        self._parked[service] = count
        self._said_backlog[service] = now
