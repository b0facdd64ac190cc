"""The parked queues: the steps each service's open breaker holds back, one sorted set
per shard and service, scored by when each was parked (the drain's pace and order are
`mediator.runtime.parking`'s)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping

from redis.asyncio import Redis

from mediator.storage.connection import lua_source
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from mediator.storage.leases import Leases

__all__ = ["ParkedQueues", "parked_counts", "parked_oldest"]

_UNPARK = lua_source("unpark.lua")


async def parked_counts(redis: Redis, keys: Keys, services: Iterable[str]) -> dict[str, int]:
    """How many steps wait in each service's parked queue (every shard)."""
    names = sorted(services)
    async with redis.pipeline(transaction=False) as pipe:
        for service in names:
            for shard in range(keys.shards):
                pipe.zcard(keys.parked(shard, service))
        sizes = await pipe.execute()
    counts = {}
    for index, service in enumerate(names):
        counts[service] = sum(sizes[index * keys.shards : (index + 1) * keys.shards])
    return counts


async def parked_oldest(redis: Redis, keys: Keys, services: Iterable[str]) -> dict[str, int]:
    """When the step that has waited longest in each service's parked queue was parked
    (Redis clock, ms); services whose queue is empty are left out."""
    names = sorted(services)
    async with redis.pipeline(transaction=False) as pipe:
        for service in names:
            for shard in range(keys.shards):
                pipe.zrange(keys.parked(shard, service), 0, 0, withscores=True)
        heads = await pipe.execute()
    oldest: dict[str, int] = {}
    for index, service in enumerate(names):
        scores = [
            int(score)
            for head in heads[index * keys.shards : (index + 1) * keys.shards]
            for _, score in head
        ]
        if scores:
            oldest[service] = min(scores)
    return oldest


class ParkedQueues:
    """Releases parked steps, oldest first across shards, under a drain lease per service."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.leases = Leases(redis)
        self._unpark = redis.register_script(_UNPARK)
        #: Told the shards whose timer sets got released steps' timers, due now (their
        #: soonest delay, 0), so this replica's timer poller polls them at once.
        self.on_due: Callable[[Mapping[int, int]], None] | None = None

    async def lead(self, service: str, replica: str, ttl_ms: int) -> bool:
        """Take or keep the drain lease of `service` for `replica` (one drains at a time)."""
        with redis_errors(f"taking the drain lease of {service}"):
            return await self.leases.hold(self.keys.drain(service), replica, ttl_ms)

    async def release(self, service: str, budget: int) -> int:
        """Move the `budget` oldest parked steps of `service` (across shards) into their
        shards' timer sets, due at once; how many moved."""
        shards = range(self.keys.shards)
        with redis_errors(f"reading the parked queues of {service}"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.zrange(self.keys.parked(shard, service), 0, budget - 1, withscores=True)
                heads = await pipe.execute()
        oldest = heapq.nsmallest(
            budget,
            (
                (score, shard, member)
                for shard, head in zip(shards, heads, strict=True)
                for member, score in head
            ),
        )
        by_shard: dict[int, list[bytes]] = {}
        for _, shard, member in oldest:
            by_shard.setdefault(shard, []).append(member)
        moved = 0
        for shard, members in by_shard.items():
            keys = [
                self.keys.parked(shard, service),
                self.keys.timers(shard),
                self.keys.released(shard, service),
            ]
            with redis_errors(f"releasing parked steps of {service}"):
                moved += int(await self._unpark(keys=keys, args=members))
        if moved and self.on_due is not None:
            self.on_due(dict.fromkeys(by_shard, 0))
        return moved

    async def oldest(self, services: Iterable[str]) -> dict[str, int]:
        """When each service's longest-waiting parked step was parked (ms, Redis clock)."""
        with redis_errors("reading the parked queues' oldest entries"):
            return await parked_oldest(self.redis, self.keys, services)

    async def counts(self, services: Iterable[str]) -> dict[str, int]:
        """How many steps wait in each service's parked queue (every shard)."""
        with redis_errors("counting parked steps"):
            return await parked_counts(self.redis, self.keys, services)
