"""The registry of service instances in Redis, fed by heartbeats.

Each service's registry lives under one hash tag (`Keys.registry`): the last heartbeat of
every instance, its status, when it will be down unless heard from again, and when it was
last heard from, all on Redis's clock. Any replica applies heartbeats (they arrive through
one consumer group) and every replica sweeps for instances whose heartbeats stopped; the
sweep is one script, so each death is reported by exactly one replica. Every replica keeps
a local view, refreshed on the same period, for routing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from mediator import clock
from mediator.runtime.periodic import Periodic
from mediator.settings import BackoffSettings, DiscoverySettings
from mediator.storage.connection import lua_source, text
from mediator.storage.keys import Keys
from mediator.storage.registry import InstanceView, read_registry
from topics.events import HealthEvent, HealthStatus

__all__ = ["Change", "Registry", "RegistryUpkeep"]

log = logging.getLogger("mediator.registry")

_BEAT = lua_source("heartbeat.lua")
_SWEEP = lua_source("sweep.lua")
_DRAIN = lua_source("drain.lua")


@dataclass(frozen=True, slots=True)
class Change:
    """An instance's status changed: joined, back up, draining, left, or down."""

    service: str
    instance: str
    what: str
    at_ms: int


class Registry:
    """Applies heartbeats, sweeps for dead instances and keeps a local view."""

    def __init__(self, redis: Redis, keys: Keys, settings: DiscoverySettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._beat = redis.register_script(_BEAT)
        self._sweep = redis.register_script(_SWEEP)
        self._drain = redis.register_script(_DRAIN)
        self.view: dict[str, list[InstanceView]] = {}
        #: Bumped by every `refresh`: routing re-derives what it keeps per view.
        self.generation = 0

    async def apply(self, beats: Sequence[HealthEvent]) -> list[Change]:
        """Record heartbeats (in order); the status changes they bring."""
        if not beats:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for beat in beats:
                ttl = self.settings.missed_heartbeats * beat.interval_ms + self.settings.grace_ms
                await self._beat(
                    keys=self.keys.registry(beat.service),
                    args=[beat.instance, beat.model_dump_json(), beat.status.value, ttl],
                    client=pipe,
                )
            pipe.sadd(self.keys.services, *{b.service for b in beats})
            replies = await pipe.execute()
        changes = []
        for beat, (before, now, stored) in zip(beats, replies[: len(beats)], strict=True):
            was, status = text(before), text(stored)
            if was == status:
                continue
            if status == HealthStatus.DOWN.value:
                what = "left"
            elif was in ("", HealthStatus.DOWN.value):
                what = "joined" if was == "" else "back up"
            else:
                what = status
            changes.append(Change(beat.service, beat.instance, what, int(now)))
        for change in changes:
            log.info("instance %s of %s %s", change.instance, change.service, change.what)
        return changes

    async def sweep(self, services: Iterable[str] | None = None) -> list[Change]:
        """Mark down every instance (of every service, or of ``services``) whose heartbeats
        stopped; the deaths this call found."""
        services = sorted(await self.known() if services is None else services)
        if not services:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                await self._sweep(
                    keys=self.keys.registry(service),
                    args=[
                        1000,
                        self.settings.forget_after,
                        self.settings.startup_grace,
                        self.settings.missed_heartbeats,
                        self.settings.grace_ms,
                    ],
                    client=pipe,
                )
            replies = await pipe.execute()
        deaths = []
        for service, (now, *dead) in zip(services, replies, strict=True):
            for instance in dead:
                deaths.append(Change(service, text(instance), "down", int(now)))
        for death in deaths:
            log.warning(
                "instance %s of %s is down: no heartbeat for %d intervals",
                death.instance, death.service, self.settings.missed_heartbeats,
            )  # fmt: skip
        return deaths

    async def refresh(self, services: Iterable[str] | None = None) -> None:
        """Re-read the instances of every service (or of ``services``) into `view`."""
        found = await read_registry(self.redis, self.keys, services)
        self.view = found if services is None else {**self.view, **found}
        self.generation += 1

    async def drain(self, service: str, instance: str, on: bool = True) -> str | None:
        """Stop routing new commands to `instance` (an operator's drain; `on` False undoes
        it). Its status now, or None if the registry does not know it."""
        status = text(await self._drain(keys=self.keys.registry(service), args=[instance, int(on)]))
        if not status:
            return None
        log.info("instance %s of %s %s by an operator", instance, service,
                 "drained" if on else "undrained")  # fmt: skip
        return status

    async def known(self) -> set[str]:
        """Every service that has heartbeated."""
        return {text(s) for s in await self.redis.smembers(self.keys.services)}

    def instances(self, service: str) -> list[InstanceView]:
        return self.view.get(service, [])


#: How often the upkeep looks for commands still recorded on instances marked down.
CATCH_UP_S = 5.0


class RegistryUpkeep(Periodic):
    """Sweeps for dead instances and refreshes the local view, every ``sweep_ms``."""

    name = "registry-upkeep"
    label = "registry upkeep"
    failed = "registry upkeep failed"

    def __init__(
        self, registry: Registry, stats: Any, backoff: BackoffSettings | None = None
    ) -> None:
        super().__init__(backoff, log)
        self.registry = registry
        self.stats = stats
        #: Called with each sweep's deaths (the router hands on their commands).
        self.on_deaths: list[Callable[[Sequence[Change]], Awaitable[object]]] = []
        #: Called every `CATCH_UP_S`: hands on what a failed call of `on_deaths` left.
        self.catch_up: Callable[[], Awaitable[object]] | None = None
        self._deaths: list[Change] = []
        self._caught_up = 0.0
        self._started = 0.0

    def start(self) -> None:
        self._started = clock.monotonic()
        super().start()

    async def round(self) -> float:
        services = await self.registry.known()
        warming = clock.monotonic() - self._started < self.registry.settings.startup_grace / 1000
        if not warming:
            self._deaths += await self.registry.sweep(services)
        await self.registry.refresh(services)  # before handing on: route around the dead
        if self._deaths:
            self.stats["instances_down"] += len(self._deaths)
            deaths, self._deaths = self._deaths, []
            for listener in self.on_deaths:
                await listener(deaths)
        now = clock.monotonic()
        if self.catch_up is not None and not warming and now - self._caught_up >= CATCH_UP_S:
            self._caught_up = now
            await self.catch_up()
        return self.registry.settings.sweep_ms / 1000
