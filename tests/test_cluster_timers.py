"""Timers on a Redis Cluster whose primaries fail one by one: a primary that refuses the
claim (here it is out of memory) holds up the timers of its own shards alone."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from mediator.cli.infra import EmbeddedRedisCluster
from mediator.errors import StateUnavailable
from mediator.settings import RedisSettings
from mediator.storage.cluster import ClusterClient
from mediator.storage.connection import connect_to
from mediator.storage.keys import Keys
from mediator.storage.store import Store


@pytest.mark.integration  # a cluster of its own: one of its primaries is made to refuse writes
async def test_a_primary_refusing_the_claim_holds_up_only_its_own_shards_timers() -> None:
    async with EmbeddedRedisCluster(replicas=0) as cluster:
        redis = connect_to(RedisSettings(url=cluster.url, mode="cluster"))
        assert isinstance(redis, ClusterClient)
        try:
            await redis.initialize()
            keys = Keys("ct:", 16)
            store = Store(redis, keys, retention_ms=60_000)
            for shard in range(keys.shards):
                await redis.zadd(keys.timers(shard), {f"deadline|r-{shard}": 0})
            victim = cluster.nodes[0]
            refusing = {
                shard
                for shard in range(keys.shards)
                if redis.get_node_from_key(keys.timers(shard)).port == victim.port
            }
            assert 0 < len(refusing) < keys.shards
            node = Redis(port=victim.port)
            try:
                await node.config_set("maxmemory-policy", "noeviction")
                await node.config_set("maxmemory", 1)  # every write there is refused: OOM

                claimed = await store.claim_timers(100, 5_000)
            finally:
                await node.config_set("maxmemory", 0)
                await node.aclose()
            healthy = set(range(keys.shards)) - refusing
            assert set(claimed) == healthy
            assert {t.name for batch in claimed.values() for t in batch} == {
                f"deadline|r-{shard}" for shard in healthy
            }
            assert set(store.timer_failures) == refusing
            assert all(isinstance(e, StateUnavailable) for e in store.timer_failures.values())
            assert "maxmemory" in str(store.timer_failures[min(refusing)])
            assert set(store.timer_waits) == healthy
            # Answering again, the shard's timers are claimed as any other's.
            again = await store.claim_timers(100, 5_000, sorted(refusing))
            assert set(again) == refusing and store.timer_failures == {}
        finally:
            await redis.aclose()
