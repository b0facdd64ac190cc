"""`redis.mode`: the settings a mode needs, and a Redis of the other kind refused at start
with what to set (real servers: the session's Redis and Redis Cluster)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mediator.cli.infra import EmbeddedRedis, EmbeddedRedisCluster
from mediator.errors import ConfigurationError
from mediator.settings import RedisSettings
from mediator.storage.connection import check_mode, connect_to, describe


def test_sentinel_mode_needs_sentinels_given_as_host_and_port() -> None:
    with pytest.raises(ValidationError, match=r"needs the Sentinels' addresses"):
        RedisSettings(mode="sentinel")
    with pytest.raises(ValidationError, match=r"a Sentinel is host:port, not 'sentinel-1'"):
        RedisSettings(mode="sentinel", sentinels=["sentinel-1"])
    ok = RedisSettings(mode="sentinel", sentinels=["s1:26379", "[::1]:26380"])
    assert ok.sentinel_addresses() == [("s1", 26379), ("::1", 26380)]
    assert describe(ok) == "sentinel mymaster via s1:26379, [::1]:26380"
    with pytest.raises(ValidationError):
        RedisSettings(mode="replicated")  # type: ignore[arg-type]


async def test_a_cluster_node_spoken_to_as_one_redis_is_refused(
    redis_cluster: EmbeddedRedisCluster,
) -> None:
    redis = connect_to(RedisSettings(url=redis_cluster.url))
    try:
        with pytest.raises(ConfigurationError, match=r"is a Redis Cluster node: set redis\.mode"):
            await check_mode(redis)
    finally:
        await redis.aclose()


async def test_one_redis_spoken_to_as_a_cluster_is_refused(redis_server: EmbeddedRedis) -> None:
    redis = connect_to(RedisSettings(url=redis_server.url, mode="cluster"))
    try:
        with pytest.raises(ConfigurationError, match="is not a Redis Cluster node"):
            await check_mode(redis)
    finally:
        await redis.aclose()
