"""Pipelines on the hot path: commands sent in one write, their replies read under one
deadline.

redis-py's pipeline reads each reply under a deadline of its own (an asyncio timer armed
and cancelled per reply) and passes it through its response callbacks; for a batch's
commits (a script call per shard) and the outbox's clearing, that bookkeeping cost the
replica more CPU than building the commits. `pipelined` sends the same bytes on one
pooled connection and reads every reply under one deadline, `socket_timeout`, as long as
redis-py allows for one reply. A connection lost or timed out is dropped and the whole
pipeline sent again as redis-py's pipeline does it (the client's `Retry`); what still
fails raises redis-py's `ConnectionError` or `TimeoutError`, which callers sort as Redis
unavailable. A command's own error reply (``NOSCRIPT``, a script's error) is returned in
its place, as ``execute(raise_on_error=False)`` does.

Replies are raw, without redis-py's response callbacks: callers use commands whose raw
replies they read (script calls, ``HGETALL`` as a flat list or a map, counts). A client
that does not pool plain connections (a Redis Cluster client) gets redis-py's pipeline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["pipelined"]

Command = Sequence[Any]


async def pipelined(redis: Any, commands: Sequence[Command]) -> list[Any]:
    """The raw reply of each of `commands`, or the `ResponseError` it got, in order."""
    if not commands:
        return []
    pool = getattr(redis, "connection_pool", None)
    if (
        not isinstance(redis, Redis)
        or not isinstance(pool, ConnectionPool)
        or not issubclass(pool.connection_class, Connection)
    ):
        return await _by_redis_py(redis, commands)
    conn: Connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        replies: list[Any] = await conn.retry.call_with_retry(
            lambda: _exchange(conn, commands), lambda _error: conn.disconnect()
        )
        return replies
    finally:
        await pool.release(conn)


async def _exchange(conn: Connection, commands: Sequence[Command]) -> list[Any]:
    await conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    try:
        async with asyncio.timeout(conn.socket_timeout):
            for _ in commands:
                try:
                    # No deadline per reply: the one around them all holds.
                    replies.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:
                    replies.append(exc)
    except TimeoutError:
        # The replies still owed are on the socket: the connection is dropped (the read
        # cancelled by the deadline already did) and its pipeline may be sent again.
        await conn.disconnect(nowait=True)
        msg = f"Timeout reading {len(commands)} replies from Redis"
        raise RedisTimeoutError(msg) from None
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    return replies


async def _by_redis_py(redis: Any, commands: Sequence[Command]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
