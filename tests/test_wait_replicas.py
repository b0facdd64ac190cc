"""`redis.wait_replicas`: Kafka offsets move only once Redis replicas hold the commit."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from mediator.cli.infra import HOST, EmbeddedRedis, wait_for_replica
from mediator.errors import StateUnavailable
from mediator.storage.keys import Keys
from mediator.storage.store import Commit, CommitOutcome, Store
from tests.engine_harness import NOW, started


@pytest.mark.slow
@pytest.mark.integration  # starts a primary and a replica of its own
async def test_a_commit_waits_for_the_replica_and_fails_transiently_without_it() -> None:
    async with EmbeddedRedis() as primary:
        async with EmbeddedRedis(args=["--replicaof", HOST, str(primary.port)]) as replica:
            await wait_for_replica(replica.url)
            redis = Redis.from_url(primary.url)
            try:
                store = Store(
                    redis, Keys("w", 4), retention_ms=60_000, wait_replicas=1, wait_timeout_ms=300
                )
                [ok] = await store.commit_many([Commit(started("wf-w1"), 0)], NOW)
                assert ok.outcome is CommitOutcome.COMMITTED
                copy = Redis.from_url(replica.url)
                try:
                    assert await copy.exists(store.keys.workflow("wf-w1")) == 1
                finally:
                    await copy.aclose()

                replica.pause()
                try:
                    with pytest.raises(StateUnavailable, match="only 0 of 1 Redis replicas"):
                        await store.commit_many([Commit(started("wf-w2"), 0)], NOW)
                finally:
                    replica.resume()
            finally:
                await redis.aclose()
