"""Concurrency keys' slots in Redis (`Keys.concurrency`): one script call per key per
batch takes slots for the runs that start under it or queues them (`slot_acquire.lua`),
one frees the slots of runs that ended and hands them to the queue's head
(`slot_release.lua`), whose ``admit`` timers are then set due (`due_now.lua`).

A run is named in both sets by ``<run id>|<round>``: an operator's retry that queues the
run again waits under another name, so nothing granted to the earlier round admits it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.core.timers import SetTimer
from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys, concurrency_digest

__all__ = ["KeyState", "Slots", "slot_member", "slot_score"]

_ACQUIRE = lua_source("slot_acquire.lua")
_RELEASE = lua_source("slot_release.lua")
_DUE_NOW = lua_source("due_now.lua")

#: Queue scores: a priority rank apart is further than any two times of queueing.
_RANK = 10**13


def slot_member(workflow_id: str, round_: int) -> str:
    """How a run (in its round) is named in its key's sets."""
    return f"{workflow_id}|{round_}"


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

    async def acquire(
        self, workflow: str, key: str, limit: int, runs: Sequence[tuple[str, int]], now_ms: int
    ) -> tuple[set[str], set[str]]:
        """Slots for `runs` (member, queue score) of one key: (granted now, held already);
        the others joined the key's queue."""
        digest = concurrency_digest(workflow, key)
        args: list[str | int] = [now_ms, limit]
        for member, score in runs:
            args += [member, score]
        with redis_errors(f"taking slots of concurrency key {key!r} of {workflow}"):
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._acquire(
                    keys=list(self.keys.concurrency(digest)), args=args, client=pipe
                )
                pipe.hset(self.keys.concurrency_keys, digest, orjson.dumps([workflow, key, limit]))
                reply, _ = await pipe.execute()
        granted, already = reply
        return {text(m) for m in granted}, {text(m) for m in already}

    async def release(
        self, workflow: str, key: str, limit: int, members: Sequence[str], now_ms: int
    ) -> list[str]:
        """Free the slots (or queue places) of `members`; the members granted the freed
        slots, whose ``admit`` timers are set due at once."""
        digest = concurrency_digest(workflow, key)
        return await self.release_digest(digest, limit, members, now_ms, f"{key!r} of {workflow}")

    async def release_digest(
        self, digest: str, limit: int, members: Sequence[str], now_ms: int, label: str
    ) -> list[str]:
        """`release`, by the key's digest."""
        with redis_errors(f"freeing slots of concurrency key {label}"):
            admitted = await self._release(
                keys=list(self.keys.concurrency(digest)), args=[now_ms, limit, *members]
            )
        names = [text(m) for m in admitted]
        await self.admit(names)
        return names

    async def admit(self, members: Iterable[str]) -> None:
        """Set the ``admit`` timers of the runs `members` due now (each in its shard)."""
        by_shard: dict[int, list[str]] = {}
        for member in members:
            wid, _, round_ = member.rpartition("|")
            timer = SetTimer("admit", wid, 0, "", int(round_ or 0))
            by_shard.setdefault(self.keys.shard_of(wid), []).append(timer.member)
        for shard, names in by_shard.items():
            with redis_errors("setting admit timers"):
                await self._due_now(keys=[self.keys.timers(shard)], args=names)

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
