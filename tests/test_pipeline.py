"""`pipelined`: the hot path's pipelines, against real Redis servers (one paused, to see
that a deadline passed or a cancelled read never leaves a reply on a pooled connection for
the next call to take as its own)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mediator.cli.infra import EmbeddedRedis, EmbeddedRedisCluster
from mediator.storage.cluster import ClusterClient
from mediator.storage.commit import pairs
from mediator.storage.connection import PackedConnection, connect
from mediator.storage.pipeline import pipelined

FAILING_SCRIPT = "return redis.error_reply('ERR refused on purpose')"


def retrying_once(server: EmbeddedRedis, timeout_s: float) -> Redis:
    """A client of `server` whose calls time out after `timeout_s` and are sent again
    once, at once."""
    return Redis.from_url(
        server.url,
        socket_timeout=timeout_s,
        connection_class=PackedConnection,
        retry=Retry(NoBackoff(), 1),
    )


async def test_replies_are_redis_pys_raw_replies_and_errors_take_their_place(
    redis_server: EmbeddedRedis, key_prefix: str
) -> None:
    redis = connect(redis_server.url, timeout_s=5)
    try:
        key, counter, table = f"{key_prefix}:k", f"{key_prefix}:n", f"{key_prefix}:h"
        await redis.hset(table, mapping={"a": "1", "b": "2"})
        sha = await redis.script_load(FAILING_SCRIPT)
        commands = [
            ("SET", key, b"v"),
            ("GET", key),
            ("INCRBY", counter, 5),
            ("HGETALL", table),
            ("EVALSHA", "0" * 40, 0),
            ("EVALSHA", sha, 0),
            ("EVAL", "return {1, 'two', ARGV[1]}", 0, "three"),
        ]
        replies = await pipelined(redis, commands)
        assert replies[:3] == [True, b"v", 5] or replies[:3] == [b"OK", b"v", 5]
        assert pairs(replies[3]) == {b"a": b"1", b"b": b"2"}
        assert isinstance(replies[4], NoScriptError)
        assert isinstance(replies[5], ResponseError)
        assert "refused on purpose" in str(replies[5])
        assert replies[6] == [1, b"two", b"three"]
        # The connection went back to the pool in step: the next call reads its own.
        assert await pipelined(redis, [("GET", key), ("GET", counter)]) == [b"v", b"5"]
        assert await pipelined(redis, []) == []
        # Raised instead, as redis-py's execute() does, once every reply is read.
        with pytest.raises(NoScriptError):
            await pipelined(redis, [("EVALSHA", "0" * 40, 0), ("GET", key)], raise_on_error=True)
        assert await pipelined(redis, [("GET", key)]) == [b"v"]
    finally:
        await redis.aclose()


async def test_a_paused_redis_times_out_once_for_the_whole_pipeline_and_poisons_nothing(
    own_redis: EmbeddedRedis,
) -> None:
    redis = retrying_once(own_redis, timeout_s=0.5)
    try:
        await redis.set("k", "before")
        own_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await pipelined(redis, [("SET", "k", f"v{i}") for i in range(50)])
            elapsed = time.monotonic() - started
        finally:
            own_redis.resume()
        # Each attempt (the first and one retry) waited one socket timeout for its replies.
        assert 0.9 < elapsed < 3.0
        # The server ran what it had read once continued; the dropped connections' replies
        # never reach a later call.
        for _ in range(5):
            assert await pipelined(redis, [("GET", "k"), ("PING",)]) in (
                [b"v49", True],
                [b"v49", b"PONG"],
            )
    finally:
        await redis.aclose()


#: Spins for ARGV[1] loop turns (a script's clock stands still: it cannot wait on it).
BUSY_SCRIPT = """
local x = 0
for i = 1, tonumber(ARGV[1]) do x = x + i end
return redis.call('INCR', KEYS[1])
"""


async def test_the_deadline_bounds_the_wait_for_each_reply_not_the_whole_pipeline(
    own_redis: EmbeddedRedis,
) -> None:
    """Five calls of about 0.4 s each with a 1 s timeout: redis-py's pipeline waits for
    each reply in turn and succeeds; so must this, each call run once (a deadline over
    the whole lot would time out, send them all again, and time out again)."""
    redis = retrying_once(own_redis, timeout_s=1.0)
    try:
        turns = 1_000_000
        started = time.monotonic()
        await redis.eval(BUSY_SCRIPT, 1, "calibrating", turns)
        turns = int(turns * 0.4 / max(time.monotonic() - started, 0.001))
        filler = "x" * 20_000  # Redis reads a pipeline this large in parts
        commands = [("EVAL", BUSY_SCRIPT, 1, "runs", turns, filler) for _ in range(5)]
        started = time.monotonic()
        assert await pipelined(redis, commands) == [1, 2, 3, 4, 5]
        assert time.monotonic() - started > 1.0  # longer than one timeout in all
        assert await redis.get("runs") == b"5"
    finally:
        await redis.aclose()


async def test_a_pipeline_cancelled_mid_read_leaves_no_reply_behind(
    own_redis: EmbeddedRedis,
) -> None:
    redis = connect(own_redis.url, timeout_s=10, max_connections=1)
    try:
        await redis.set("k", "0")
        own_redis.pause()
        try:
            call = asyncio.create_task(pipelined(redis, [("INCR", "k")] * 20))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            own_redis.resume()
        # One connection in the pool: the next call gets it, or a new one if it was
        # dropped, and reads only its own replies.
        replies = await pipelined(redis, [("SET", "k", "x"), ("GET", "k")])
        assert replies[1] == b"x"
        assert await pipelined(redis, [("GET", "k")]) == [b"x"]
    finally:
        await redis.aclose()


async def test_a_cluster_client_gets_redis_pys_pipeline(
    redis_cluster: EmbeddedRedisCluster, key_prefix: str
) -> None:
    redis = ClusterClient.from_url(redis_cluster.url)
    try:
        key = f"{{{key_prefix}}}:k"
        replies = await pipelined(
            redis, [("SET", key, "v"), ("GET", key), ("EVAL", FAILING_SCRIPT, 1, key)]
        )
        assert replies[1] == b"v"
        assert isinstance(replies[2], ResponseError)
        assert "refused on purpose" in str(replies[2])
    finally:
        await redis.aclose()


async def test_a_sha_no_primary_knows_ends_as_noscript_on_a_cluster(
    redis_cluster: EmbeddedRedisCluster, key_prefix: str
) -> None:
    """The cluster pipeline loads the scripts and sends calls refused for NOSCRIPT again,
    once: a SHA never registered comes back as the error it is (it used to load and send
    again until the stack ran out)."""
    redis = ClusterClient.from_url(redis_cluster.url)
    try:
        key = f"{{{key_prefix}}}:k"
        replies = await pipelined(redis, [("EVALSHA", "0" * 40, 1, key), ("SET", key, "v")])
        assert isinstance(replies[0], NoScriptError)
        assert replies[1] in (True, b"OK")
        assert redis.script_reloads == 1
    finally:
        await redis.aclose()
