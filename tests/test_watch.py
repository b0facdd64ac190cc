"""`mediator dev`'s narration of breakers and parked queues, read from a real Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from mediator.cli.watch import FaultWatch
from mediator.storage.keys import Keys


async def test_breaker_changes_and_backlogs_are_said_once_each(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 2)
    said: list[str] = []
    watch = FaultWatch(redis_client, keys, ["shipping"], said.append, backlog_every=0)

    async def breaker(state: str, counter: int) -> None:
        await redis_client.hset(
            keys.breaker("shipping"), mapping={"state": state, "counter": counter}
        )

    await breaker("closed", 1)
    await watch.look()
    assert said == []
    await breaker("open", 3)
    await redis_client.zadd(keys.parked(0, "shipping"), {"a": 1, "b": 2})
    await redis_client.zadd(keys.parked(1, "shipping"), {"c": 3})
    await watch.look()
    await watch.look()  # nothing changed: nothing said
    await breaker("half-open", 3)
    await watch.look()
    await breaker("open", 4)
    await watch.look()
    await breaker("closed", 0)
    await watch.look()
    for shard in (0, 1):  # each in its own hash slot
        await redis_client.delete(keys.parked(shard, "shipping"))
    await watch.look()
    assert said == [
        "  ! breaker shipping OPEN (3 failures): its commands park instead of being sent",
        "  ! parked shipping: 3 steps waiting",
        "  ! breaker shipping half-open: one probe goes out",
        "  ! breaker shipping OPEN again: the probe failed (4 failures): "
        "its commands park instead of being sent",
        "  ! breaker shipping closed; parked steps drain (3 now)",
        "  ! parked shipping: drained",
    ]


async def test_a_growing_backlog_is_said_at_most_once_per_interval(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 1)
    said: list[str] = []
    watch = FaultWatch(redis_client, keys, ["shipping"], said.append, backlog_every=3600)
    for n in range(5):
        await redis_client.zadd(keys.parked(0, "shipping"), {f"m{n}": n})
        await watch.look()
    await redis_client.delete(keys.parked(0, "shipping"))
    await watch.look()
    assert said == ["  ! parked shipping: 1 step waiting", "  ! parked shipping: drained"]


class _CutShort:
    """A Redis client whose reads wait, and which, cancelled mid-read, raises a Redis
    error of its own, as a client closing its connection on a cancelled read may."""

    waits = True

    async def smembers(self, key: str) -> set[bytes]:
        if not self.waits:
            return set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            msg = "connection closed by the cancelled read"
            raise RedisConnectionError(msg) from None
        return set()


async def test_the_watch_stops_when_cancelled_mid_look() -> None:
    # `mediator dev` waited for ever on its Ctrl-C when the cancel reached the watch while
    # a look waited on Redis: the error it surfaced as was taken for a look that failed.
    redis = _CutShort()
    watch = FaultWatch(redis, Keys("t", 1), ["shipping"], print)  # type: ignore[arg-type]
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:  # let a second cancel land outside the look, so the test itself can end
        redis.waits = False
        task.cancel()
        await asyncio.wait({task}, timeout=2)
    assert done, "the watch ran on after its cancel"
    assert task.cancelled()
