"""Reading the parked queues: the steps each service's open breaker holds back."""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from mediator.storage.keys import Keys

__all__ = ["parked_counts"]


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
