"""Concurrency keys' slots in Redis (`Keys.concurrency`): one script call per key per
batch takes slots for the runs that start under it or queues them (`slot_acquire.lua`),
one frees the slots of runs that ended and hands them to the queue's head
(`slot_release.lua`), whose ``admit`` timers are then set due (`due_now.lua`).

A run is named in both sets by ``<run id>|<round>``: an operator's retry that queues the
run again waits under another name, so nothing granted to the earlier round admits it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.core.concurrency import run_member
from mediator.core.timers import SetTimer
from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys, concurrency_digest

__all__ = ["KeyState", "SlotKey", "Slots", "slot_member", "slot_score", "slot_timer"]

_ACQUIRE = lua_source("slot_acquire.lua")
_RELEASE = lua_source("slot_release.lua")
_DUE_NOW = lua_source("due_now.lua")

#: Queue scores: a priority rank apart is further than any two times of queueing.
_RANK = 10**13


#: One concurrency key in a batch: its scope (the workflow's name, or ``<workflow>.<step>``
#: for a step's key), its value, and its limit.
SlotKey = tuple[str, str, int]


#: How a run (in its round) is named in its key's sets.
slot_member = run_member


def slot_timer(member: str) -> SetTimer:
    """The timer that moves `member` on once it has a slot: a run's ``admit``
    (``<run id>|<round>``), or a step attempt's ``unpark`` (its command id,
    ``<run id>.<step>.<attempt>``)."""
    if "|" in member:
        wid, _, round_ = member.rpartition("|")
        return SetTimer("admit", wid, 0, "", int(round_ or 0))
    wid, _, rest = member.partition(".")
    step, _, attempt = rest.rpartition(".")
    return SetTimer("unpark", wid, 0, step, int(attempt or 0))


def slot_score(priority: int, queued_ms: int) -> int:
    """A queued run's place: higher priority first, then oldest first."""
    return (9 - priority) * _RANK + queued_ms


def queued_at(score: float) -> int:
    """When the run with queue score `score` was queued (ms)."""
    return int(score) % _RANK


@dataclass(frozen=True, slots=True)
class KeyState:
    """One concurrency key as the upkeep and the ops views see it."""

    digest: str
    workflow: str
    key: str
    limit: int
    held: int = 0
    queued: int = 0
    #: When the queue's oldest run was queued (ms; None: none waits).
    oldest_ms: int | None = None


class Slots:
    """Takes, frees and hands on concurrency keys' slots."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._due_now = redis.register_script(_DUE_NOW)
        #: Told the shards whose timer sets got a timer due now (their soonest delay, 0), so
        #: this replica's timer poller polls them at once (None: nobody listens).
        self.on_due: Callable[[Mapping[int, int]], None] | None = None

    async def acquire(
        self, scope: str, key: str, limit: int, runs: Sequence[tuple[str, int]], now_ms: int
    ) -> tuple[set[str], set[str]]:
        """Slots for `runs` (member, queue score) of one key: (granted now, held already);
        the others joined the key's queue."""
        return await self.acquire_many({(scope, key, limit): runs}, now_ms)

    async def acquire_many(
        self, wanted: Mapping[SlotKey, Sequence[tuple[str, int]]], now_ms: int
    ) -> tuple[set[str], set[str]]:
        """`acquire` for the runs (or attempts) of several keys (`SlotKey`), in one round
        trip: (granted now, held already), over every key."""
        granted: set[str] = set()
        already: set[str] = set()
        if not wanted:
            return granted, already
        with redis_errors(f"taking slots of {len(wanted)} concurrency keys"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for (scope, key, limit), runs in wanted.items():
                    digest = concurrency_digest(scope, key)
                    args: list[str | int] = [now_ms, limit]
                    for member, score in runs:
                        args += [member, score]
                    names = list(self.keys.concurrency(digest))
                    await self._acquire(keys=names, args=args, client=pipe)
                    doc = orjson.dumps([scope, key, limit])
                    pipe.hset(self.keys.concurrency_keys, digest, doc)
                replies = await pipe.execute()
        for got, held in replies[::2]:
            granted |= {text(m) for m in got}
            already |= {text(m) for m in held}
        return granted, already

    async def release(
        self, scope: str, key: str, limit: int, members: Sequence[str], now_ms: int
    ) -> list[str]:
        """Free the slots (or queue places) of `members`; the members granted the freed
        slots, whose timers (``admit``, or ``unpark`` for a step's attempt) are set due."""
        return await self.release_many({(scope, key, limit): members}, now_ms)

    async def release_many(self, freed: Mapping[SlotKey, Sequence[str]], now_ms: int) -> list[str]:
        """`release` for several keys, in one round trip (and one more to set the timers
        of the members granted the freed slots, if any)."""
        return await self._release_all(
            [(concurrency_digest(scope, key), limit, members)
             for (scope, key, limit), members in freed.items()],
            now_ms,
        )  # fmt: skip

    async def release_digest(
        self, digest: str, limit: int, members: Sequence[str], now_ms: int
    ) -> list[str]:
        """`release`, by the key's digest."""
        return await self._release_all([(digest, limit, members)], now_ms)

    async def _release_all(
        self, freed: Sequence[tuple[str, int, Sequence[str]]], now_ms: int
    ) -> list[str]:
        if not freed:
            return []
        with redis_errors(f"freeing slots of {len(freed)} concurrency keys"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for digest, limit, members in freed:
                    names = list(self.keys.concurrency(digest))
                    await self._release(keys=names, args=[now_ms, limit, *members], client=pipe)
                replies = await pipe.execute()
        admitted = [text(m) for reply in replies for m in reply]
        await self.admit(admitted)
        return admitted

    async def admit(self, members: Iterable[str]) -> None:
        """Set the timers of `members` due now (each in its run's shard): a run's
        ``admit`` timer, or the ``unpark`` timer of a step's queued attempt."""
        by_shard: dict[int, list[str]] = {}
        for member in members:
            timer = slot_timer(member)
            by_shard.setdefault(self.keys.shard_of(timer.workflow_id), []).append(timer.member)
        if not by_shard:
            return
        with redis_errors("setting admit timers"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, names in by_shard.items():
                    await self._due_now(keys=[self.keys.timers(shard)], args=names, client=pipe)
                await pipe.execute()
        if self.on_due is not None:
            self.on_due(dict.fromkeys(by_shard, 0))

    async def known(self, detail: bool = True) -> list[KeyState]:
        """Every key that has (or had, until the upkeep drops it) runs holding or waiting
        for its slots, with how many do and (with `detail`: the whole queue is read) when
        the oldest waiting one was queued."""
        with redis_errors("reading concurrency keys"):
            raw = await self.redis.hgetall(self.keys.concurrency_keys)
            found = []
            for digest, doc in sorted(raw.items()):
                workflow, key, limit = orjson.loads(doc)
                found.append(KeyState(text(digest), workflow, key, int(limit)))
            if not found:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for state in found:
                    held, queue = self.keys.concurrency(state.digest)
                    pipe.zcard(held)
                    pipe.zcard(queue)
                    pipe.zrange(queue, 0, -1 if detail else 0, withscores=True)
                replies = await pipe.execute()
        out = []
        for index, state in enumerate(found):
            held_n, queued_n, members = replies[3 * index : 3 * index + 3]
            oldest = min((queued_at(score) for _, score in members), default=None)
            out.append(
                KeyState(
                    state.digest, state.workflow, state.key, state.limit,
                    int(held_n), int(queued_n), oldest,
                )
            )  # fmt: skip
        return out

    async def holders(self, digest: str) -> list[tuple[str, int]]:
        """The runs holding the key's slots: (member, when granted)."""
        with redis_errors("reading a concurrency key's slots"):
            held = await self.redis.zrange(self.keys.concurrency(digest)[0], 0, -1, withscores=True)
        return [(text(m), int(score)) for m, score in _pairs(held)]

    async def forget(self, digest: str) -> bool:
        """Drop the key from the index if nothing holds or waits for its slots now (it is
        added again by the next run that starts under it); whether it was dropped."""
        held, queue = self.keys.concurrency(digest)
        with redis_errors("dropping an idle concurrency key"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(held, queue)
                pipe.hget(self.keys.concurrency_keys, digest)
                busy, doc = await pipe.execute()
            if busy or doc is None:
                return False
            await self.redis.hdel(self.keys.concurrency_keys, digest)
            if await self.redis.exists(held, queue):  # a run started under it meanwhile
                await self.redis.hset(self.keys.concurrency_keys, digest, doc)
                return False
        return True


def _pairs(held: Any) -> list[tuple[bytes, float]]:
    """A ``ZRANGE ... WITHSCORES`` reply, typed."""
    return list(held)
