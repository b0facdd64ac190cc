"""Timers on a Redis Cluster whose primaries fail one by one: a primary that refuses the
claim (here it is out of memory) holds up the timers of its own shards alone, and one
that dies with no replica fails the claims within the call deadline, not minutes later."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from mediator.cli.infra import EmbeddedRedisCluster
from mediator.errors import StateUnavailable
from mediator.settings import RedisSettings
from mediator.storage.cluster import ClusterClient
from mediator.storage.connection import connect_to
from mediator.storage.keys import Keys
from mediator.storage.store import Store
from tests.helpers import wait_for


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


@pytest.mark.integration  # a cluster of its own: one of its primaries is killed
async def test_a_cluster_call_fails_within_its_deadline_while_a_slot_has_no_primary() -> None:
    # A primary with no replica dies: its slots have no primary, and the cluster client
    # would retry a pipeline to them for minutes. The call fails, as Redis unavailable,
    # once `call_timeout_s` has passed; when the primary is back, calls answer again.
    async with EmbeddedRedisCluster(replicas=0) as cluster:
        settings = RedisSettings(url=cluster.url, mode="cluster", call_timeout_s=6)
        redis = connect_to(settings)
        try:
            keys = Keys("ct:", 16)
            store = Store(redis, keys, retention_ms=60_000)
            await store.claim_timers(100, 5_000)
            victim = cluster.nodes[0]
            victim.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(StateUnavailable, match="call_timeout_s"):
                for _ in range(3):  # the first call may meet the dead primary's reset alone
                    await asyncio.wait_for(store.claim_timers(100, 5_000), 60)
            assert loop.time() - started < 2 * 6 + 5
            await victim.restart()
            await wait_for(lambda: _claims(store), what="the claims to answer again", timeout=30)
        finally:
            await redis.aclose()


async def _claims(store: Store) -> bool:
    try:
        await store.claim_timers(100, 5_000)
    except StateUnavailable:
        return False
    return not store.timer_failures
