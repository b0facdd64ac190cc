"""The registry of service instances in Redis, fed by heartbeats.

Each service's registry lives under one hash tag (`Keys.registry`): the last heartbeat of
every instance, its status, when it will be down unless heard from again, and when it was
last heard from, all on Redis's clock. Any replica applies heartbeats (they arrive through
one consumer group) and every replica sweeps for instances whose heartbeats stopped; the
sweep is one script, so each death is reported by exactly one replica. An instance is
marked down only on evidence: its deadline is before the health topic's watermark (see
`mediator.runtime.liveness`), never merely because time passed while the mediator stalled.
Every replica keeps a local view, refreshed on the same period, for routing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from mediator import clock
from mediator.runtime.liveness import Marker
from mediator.runtime.periodic import Periodic
from mediator.runtime.stats import RuntimeStats
from mediator.settings import BackoffSettings, DiscoverySettings
from mediator.storage.keys import Keys
from mediator.storage.registry import InstanceView, RegistryHashes
from topics.events import HealthEvent, HealthStatus

__all__ = ["Change", "Registry", "RegistryUpkeep"]

log = logging.getLogger("mediator.registry")


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
        self.hashes = RegistryHashes(redis, keys)
        self.settings = settings
        self.view: dict[str, list[InstanceView]] = {}
        #: Heartbeats ignored as stale: replayed, overtaken, or of an earlier boot.
        self.stale = 0
        #: Bumped by every `refresh`: routing re-derives what it keeps per view.
        self.generation = 0

    async def apply(
        self,
        beats: Sequence[HealthEvent],
        marks: Mapping[int, int] | None = None,
        read: Mapping[int, tuple[int, int]] | None = None,
    ) -> list[Change]:
        """Record heartbeats (in order), then how far the health topic has been read:
        `read` (partition -> first and last offset of the batch) and `marks` (partition ->
        time of the latest marker in it, which came after `beats`); the status changes the
        heartbeats bring."""
        changes = await self._beats(beats) if beats else []
        marks = marks or {}
        read = dict(read or {})
        for partition in marks:
            read.setdefault(partition, (0, 0))
        if read:
            entries = [
                (partition, first, last, marks.get(partition, 0))
                for partition, (first, last) in sorted(read.items())
            ]
            if await self.hashes.mark(self.settings.after_loss_ms, entries):
                log.warning(
                    "Redis lost heartbeats it had taken (a failover?): no instance is marked "
                    "down for %d ms, until each has been heard from again",
                    self.settings.after_loss_ms,
                )
        return changes

    async def _beats(self, beats: Sequence[HealthEvent]) -> list[Change]:
        settings = self.settings

        def ttl(beat: HealthEvent) -> int:
            return settings.missed_heartbeats * beat.interval_ms + settings.grace_ms

        replies = await self.hashes.beats(beats, ttl)
        changes = []
        for beat, (was, now, status) in zip(beats, replies, strict=True):
            if status == "stale":
                self.stale += 1
                log.debug(
                    "stale heartbeat of %s (boot %s, seq %s) ignored",
                    beat.instance,
                    beat.boot,
                    beat.seq,
                )
                continue
            if was == status:
                continue
            if status == HealthStatus.DOWN.value:
                what = "left"
            elif was in ("", HealthStatus.DOWN.value):
                what = "joined" if was == "" else "back up"
            else:
                what = status
            changes.append(Change(beat.service, beat.instance, what, now))
        for change in changes:
            log.info("instance %s of %s %s", change.instance, change.service, change.what)
        return changes

    async def watermark(self) -> tuple[int, int]:
        """How far (ms, Redis clock) every partition of the health topic has been read:
        the least time of the markers read from them (0 until each has had one); and
        until when no one is marked down (after a loss of Redis writes; 0: no hold)."""
        marks = await self.hashes.watermark()
        partitions = marks.get("partitions", 0)
        hold = marks.get("hold_until", 0)
        if not partitions:
            return 0, hold
        return min(marks.get(str(p), 0) for p in range(partitions)), hold

    async def sweep(self, services: Iterable[str] | None = None) -> list[Change]:
        """Mark down every instance (of every service, or of ``services``) whose deadline
        is before the health topic's watermark; the deaths this call found."""
        services = sorted(await self.known() if services is None else services)
        if not services:
            return []
        # Without a watermark (no marker read yet) nobody is marked down; the sweep still
        # forgets instances down for long.
        watermark, hold = await self.watermark()
        swept = await self.hashes.sweep(
            services,
            limit=1000,
            forget_after_ms=self.settings.forget_after_ms,
            watermark_ms=watermark,
            hold_until_ms=hold,
        )
        deaths = [
            Change(service, instance, "down", now)
            for service, now, dead in swept
            for instance in dead
        ]
        for death in deaths:
            log.warning(
                "instance %s of %s is down: no heartbeat for %d intervals",
                death.instance,
                death.service,
                self.settings.missed_heartbeats,
            )
        return deaths

    async def refresh(self, services: Iterable[str] | None = None) -> None:
        """Re-read the instances of every service (or of ``services``) into `view`."""
        found = await self.hashes.read(services)
        self.view = found if services is None else {**self.view, **found}
        self.generation += 1

    async def drain(self, service: str, instance: str, on: bool = True) -> str | None:
        """Stop routing new commands to `instance` (an operator's drain; `on` False undoes
        it). Its status now, or None if the registry does not know it."""
        status = await self.hashes.drain(service, instance, on)
        if not status:
            return None
        log.info(
            "instance %s of %s %s by an operator",
            instance,
            service,
            "drained" if on else "undrained",
        )
        return status

    async def known(self) -> set[str]:
        """Every service that has heartbeated."""
        return await self.hashes.services()

    def instances(self, service: str) -> list[InstanceView]:
        return self.view.get(service, [])


#: How often the upkeep looks for commands still recorded on instances marked down.
CATCH_UP_S = 5.0


class RegistryUpkeep(Periodic):
    """Writes the health topic's markers (when it holds their lease), sweeps for dead
    instances and refreshes the local view, every ``sweep_ms``."""

    name = "registry-upkeep"
    label = "registry upkeep"
    failed = "registry upkeep failed"

    def __init__(
        self,
        registry: Registry,
        stats: RuntimeStats,
        backoff: BackoffSettings | None = None,
        marker: Marker | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.registry = registry
        self.stats = stats
        #: Writes the markers that make silence evidence; None: another process does.
        self.marker = marker
        #: Called with each sweep's deaths (the router hands on their commands).
        self.on_deaths: list[Callable[[Sequence[Change]], Awaitable[object]]] = []
        #: Called every `CATCH_UP_S`: hands on what a failed call of `on_deaths` left.
        self.catch_up: Callable[[], Awaitable[object]] | None = None
        self._deaths: list[Change] = []
        self._caught_up = float("-inf")
        #: Rounds in a row whose markers could not be written.
        self.mark_failures = 0

    async def _mark(self) -> None:
        """Write the markers. A failure (the broker or Redis away, no right to write the
        health topic) is logged and the round goes on: without new markers no one is
        marked down, and routing still follows the registry."""
        assert self.marker is not None
        try:
            await self.marker.tick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.mark_failures += 1
            if self.mark_failures in (1, 10) or self.mark_failures % 100 == 0:
                log.warning(
                    "health-topic markers not written (%d rounds in a row): %s; no instance "
                    "is marked down meanwhile",
                    self.mark_failures,
                    exc,
                )
        else:
            self.mark_failures = 0

    async def round(self) -> float:
        if self.marker is not None:
            await self._mark()
        services = await self.registry.known()
        self._deaths += await self.registry.sweep(services)
        await self.registry.refresh(services)  # before handing on: route around the dead
        if self._deaths:
            self.stats.instances_down += len(self._deaths)
            deaths, self._deaths = self._deaths, []
            for listener in self.on_deaths:
                await listener(deaths)
        now = clock.monotonic()
        if self.catch_up is not None and now - self._caught_up >= CATCH_UP_S:
            self._caught_up = now
            await self.catch_up()
        return self.registry.settings.sweep_ms / 1000
