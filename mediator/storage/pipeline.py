"""Pipelines on the hot path: commands sent in one write, their replies read under one
deadline.

redis-py's pipeline reads each reply under a deadline of its own (an asyncio timer armed
and cancelled per reply) and passes it through its response callbacks; for a batch's
commits (a script call per shard) and the outbox's clearing, that bookkeeping cost the
replica about as much CPU as building the commits. `pipelined` sends the same bytes on one
pooled connection and reads the replies under one deadline: as redis-py's timeout, it
fails a call that waits `socket_timeout` for its next reply, but it is one timer per call,
moved on as replies come. A connection lost or timed out is dropped and the whole
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
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["pipelined"]

Command = Sequence[Any]

#: A wait for the next reply fails after `socket_timeout` times between one and this.
_SLACK = 1.5


async def pipelined(
    redis: Any, commands: Sequence[Command], *, raise_on_error: bool = False
) -> list[Any]:
    """The raw reply of each of `commands`, or the `ResponseError` it got, in order; with
    `raise_on_error`, the first such error is raised instead (once every reply is read),
    as redis-py's ``execute()`` does."""
    if not commands:
        return []
    replies = await _replies(redis, commands)
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
    return replies


async def _replies(redis: Any, commands: Sequence[Command]) -> list[Any]:
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
    window = conn.socket_timeout
    loop = asyncio.get_running_loop()
    replies: list[Any] = []
    # The connection is this call's alone until it is released: its own timeout is lifted
    # meanwhile (redis-py would arm a timer for the write and for every reply) and the
    # deadline below bounds them instead.
    conn.socket_timeout = None
    try:
        async with asyncio.timeout(window and _SLACK * window) as deadline:
            await conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
                # As redis-py's timeout, the deadline bounds a wait for the next reply,
                # not the whole pipeline (Redis answers a long pipeline in parts, as it
                # reads it): between one and `_SLACK` windows. It is moved on at most
                # once per half window.
                due = deadline.when()
                if due is not None and window and due - loop.time() < window:
                    deadline.reschedule(loop.time() + _SLACK * window)
    except TimeoutError:
        # The replies still owed are on the socket: the connection is dropped (the read
        # cancelled by the deadline already did) and its pipeline may be sent again.
        await conn.disconnect(nowait=True)
        msg = f"Timeout reading {len(commands)} replies from Redis"
        raise RedisTimeoutError(msg) from None
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        if conn.socket_timeout is None:  # not changed meanwhile (a maintenance notice)
            conn.socket_timeout = window
    return replies


async def _by_redis_py(redis: Any, commands: Sequence[Command]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
