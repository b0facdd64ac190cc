"""The registry of service instances in Redis: heartbeats applied, instances swept and
drained, the health topic's watermark, and the registry read back (the rules are in
`mediator.runtime.registry`; the scripts here apply them atomically per service)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from mediator.storage.leases import Leases
from topics.events import HealthEvent, HealthStatus

__all__ = ["InstanceView", "RegistryHashes", "read_registry"]

_BEAT = lua_source("heartbeat.lua")
_SWEEP = lua_source("sweep.lua")
_DRAIN = lua_source("drain.lua")
_MARK = lua_source("mark.lua")


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the registry holds it."""

    service: str
    instance: str
    status: str
    last_seen_ms: int
    beat: dict[str, Any]
    #: Marked down because its heartbeats stopped (not because it left cleanly).
    dead: bool = False

    @property
    def up(self) -> bool:
        return self.status == HealthStatus.UP

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "status": self.status,
            "last_seen_ms": self.last_seen_ms,
            **{k: v for k, v in self.beat.items() if k not in ("type", "service", "instance")},
        }


async def read_registry(
    redis: Redis, keys: Keys, services: Iterable[str] | None = None
) -> dict[str, list[InstanceView]]:
    """Every instance of every service (or of ``services``), as Redis holds them."""
    if services is None:
        services = {text(s) for s in await redis.smembers(keys.services)}
    names = sorted(services)
    async with redis.pipeline(transaction=False) as pipe:
        for service in names:
            docs, status, _, seen, _, dead = keys.registry(service)
            pipe.hgetall(docs)
            pipe.hgetall(status)
            pipe.zrange(seen, 0, -1, withscores=True)
            pipe.smembers(dead)
        replies = await pipe.execute()
    found: dict[str, list[InstanceView]] = {}
    for index, service in enumerate(names):
        docs, status, seen, dead = replies[4 * index : 4 * index + 4]
        statuses = {text(k): text(v) for k, v in status.items()}
        last = {text(k): int(v) for k, v in seen}
        gone = {text(m) for m in dead}
        views = []
        for raw_instance, raw_doc in docs.items():
            instance = text(raw_instance)
            try:
                beat = orjson.loads(raw_doc)
            except orjson.JSONDecodeError:
                continue  # written by the script from a validated event: never expected
            views.append(
                InstanceView(
                    service,
                    instance,
                    statuses.get(instance, "down"),
                    last.get(instance, 0),
                    beat,
                    instance in gone,
                )
            )
        found[service] = sorted(views, key=lambda v: v.instance)
    return found


class RegistryHashes:
    """The registry's Redis side: one script call per heartbeat, sweep or drain, each
    confined to one service's hash tag."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._beat = redis.register_script(_BEAT)
        self._sweep = redis.register_script(_SWEEP)
        self._drain = redis.register_script(_DRAIN)
        self._mark = redis.register_script(_MARK)
        self._leases = Leases(redis)

    async def beats(
        self, beats: Sequence[HealthEvent], ttl: Callable[[HealthEvent], int]
    ) -> list[tuple[str, int, str]]:
        """Apply heartbeats in order (each instance is down `ttl(beat)` ms after it unless
        heard from again); per beat: its status before, Redis's time (ms) and its status
        now (``stale``: ignored as replayed, overtaken or of an earlier boot)."""
        with redis_errors("applying heartbeats"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for beat in beats:
                    await self._beat(
                        keys=self.keys.registry(beat.service),
                        args=[
                            beat.instance,
                            beat.model_dump_json(),
                            beat.status.value,
                            ttl(beat),
                            beat.boot or "",
                            -1 if beat.seq is None else beat.seq,
                            beat.ts_ms,
                        ],
                        client=pipe,
                    )
                pipe.sadd(self.keys.services, *sorted({b.service for b in beats}))
                replies = await pipe.execute()
        return [(text(was), int(now), text(status)) for was, now, status in replies[: len(beats)]]

    async def mark(self, after_loss_ms: int, read: Sequence[tuple[int, int, int, int]]) -> bool:
        """Record how far each partition of the health topic has been read (partition,
        first and last offset, time of its latest marker); True when Redis had lost
        heartbeats it took (then no one is marked down for `after_loss_ms`)."""
        args: list[int] = [after_loss_ms]
        for entry in read:
            args += entry
        with redis_errors("recording the health topic's watermark"):
            return bool(int(await self._mark(keys=[self.keys.health_watermark], args=args)))

    async def watermark(self) -> dict[str, int]:
        """The watermark hash: partition -> time of the last marker read, ``partitions``
        and ``hold_until``."""
        with redis_errors("reading the health topic's watermark"):
            raw = await self.redis.hgetall(self.keys.health_watermark)
        return {text(k): int(v) for k, v in raw.items()}

    async def sweep(
        self,
        services: Sequence[str],
        *,
        limit: int,
        forget_after_ms: int,
        watermark_ms: int,
        hold_until_ms: int,
    ) -> list[tuple[str, int, list[str]]]:
        """Mark down, per service, at most `limit` instances whose deadline is before
        `watermark_ms` (none while `hold_until_ms` is ahead) and forget those down for
        `forget_after_ms`; per service, Redis's time (ms) and the instances found dead."""
        args = [limit, forget_after_ms, watermark_ms, hold_until_ms]
        with redis_errors("sweeping the registry"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for service in services:
                    await self._sweep(keys=self.keys.registry(service), args=args, client=pipe)
                replies = await pipe.execute()
        return [
            (service, int(now), [text(i) for i in dead])
            for service, (now, *dead) in zip(services, replies, strict=True)
        ]

    async def drain(self, service: str, instance: str, on: bool) -> str:
        """Mark `instance` drained (or not); its status now, "" if unknown."""
        with redis_errors("draining an instance"):
            return text(
                await self._drain(keys=self.keys.registry(service), args=[instance, int(on)])
            )

    async def take_marker_lease(self, replica: str, ttl_ms: int) -> bool:
        """Take or keep the lease of writing the health topic's markers for `replica`."""
        with redis_errors("taking the marking lease"):
            return await self._leases.hold(self.keys.marker_lease, replica, ttl_ms)

    async def time_ms(self) -> int:
        """Redis's clock, in ms."""
        with redis_errors("reading Redis's clock"):
            seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def set_partitions(self, partitions: int) -> None:
        """Record how many partitions the health topic has (the watermark waits for each)."""
        with redis_errors("recording the health topic's partitions"):
            await self.redis.hset(self.keys.health_watermark, "partitions", partitions)

    async def services(self) -> set[str]:
        """Every service that has heartbeated."""
        with redis_errors("listing services"):
            return {text(s) for s in await self.redis.smembers(self.keys.services)}

    async def read(self, services: Iterable[str] | None = None) -> dict[str, list[InstanceView]]:
        """Every instance of every service (or of `services`)."""
        with redis_errors("reading the registry"):
            return await read_registry(self.redis, self.keys, services)
