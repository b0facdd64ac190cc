"""Flow-control permits in Redis (`Keys.limit`): one script call per limited service per
batch grants the commands that fit (`limit_acquire.lua`), one releases those answered,
and the release loop reads what room there is (`limit_status.lua`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from mediator.settings import ServiceLimit
from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys

__all__ = ["Granted", "Limits"]

_ACQUIRE = lua_source("limit_acquire.lua")
_STATUS = lua_source("limit_status.lua")


class Granted(frozenset[str]):
    """The command ids granted a permit by one call; `fresh`: those among them that held
    none before it (a recomputed transition is granted its permits again: those are not
    fresh, and are not its to give back)."""

    fresh: frozenset[str]

    def __new__(cls, granted: Sequence[str], fresh: Sequence[str]) -> Granted:
        made = super().__new__(cls, granted)
        made.fresh = frozenset(fresh)
        return made


class Limits:
    """Grants and releases the permits of services' flow-control limits."""

    def __init__(self, redis: Redis, keys: Keys, lease_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ms = lease_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._status = redis.register_script(_STATUS)

    async def acquire(
        self,
        service: str,
        limit: ServiceLimit,
        released: Sequence[str],
        new: Sequence[str],
        now_ms: int,
        done: Sequence[str] = (),
    ) -> Granted:
        """The command ids granted a permit: `released` (out of the queue) first, then
        `new` ones while nothing is queued, as far as the limit allows; the permits of the
        commands `done` (answered) are freed first, in the same call."""
        args = [
            now_ms,
            len(done),
            *done,
            limit.max_in_flight or 0,
            limit.rate or 0,
            limit.bucket,
            self.lease_ms,
            len(released),
            *released,
            *new,
        ]
        with redis_errors(f"taking flow-control permits of {service}"):
            granted, fresh = await self._acquire(keys=list(self.keys.limit(service)), args=args)
        return Granted([text(g) for g in granted], [text(g) for g in fresh])

    async def release(self, service: str, command_ids: Sequence[str]) -> None:
        """The commands `command_ids` were answered (or given up): their permits free."""
        with redis_errors(f"releasing flow-control permits of {service}"):
            await self.redis.zrem(self.keys.limit(service)[0], *command_ids)

    async def room(self, service: str, limit: ServiceLimit, queued: int, now_ms: int) -> int:
        """How many queued commands may go now (recording the queue's length)."""
        args = [now_ms, limit.rate or 0, limit.bucket, queued, limit.max_in_flight or 0]
        with redis_errors(f"reading the flow-control limit of {service}"):
            inflight, tokens = await self._status(keys=list(self.keys.limit(service)), args=args)
        slots = [queued]
        if limit.max_in_flight:
            slots.append(limit.max_in_flight - int(inflight))
        if limit.rate:
            slots.append(int(tokens))
        return max(0, min(slots))

    async def oldest(self, service: str, count: int) -> list[tuple[str, int]]:
        """The `count` oldest permits of `service`: (command id, when it was granted)."""
        with redis_errors(f"reading flow-control permits of {service}"):
            held = await self.redis.zrange(
                self.keys.limit(service)[0], 0, count - 1, withscores=True
            )
        return [(text(cid), int(score) - self.lease_ms) for cid, score in _pairs(held)]

    async def in_flight(self, services: Sequence[str]) -> dict[str, int]:
        """Commands holding a permit now, per service (lapsed ones included until pruned)."""
        with redis_errors("counting flow-control permits"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for service in services:
                    pipe.zcard(self.keys.limit(service)[0])
                counts = await pipe.execute()
        return dict(zip(services, (int(c) for c in counts), strict=True))


def _pairs(held: Any) -> list[tuple[bytes, float]]:
    """A ``ZRANGE ... WITHSCORES`` reply, typed."""
    return list(held)
