"""The circuit breakers' hashes in Redis (the state machine is `mediator.runtime.breakers`).

Each service's breaker is one hash, written only by compare-and-set on its ``version``
(``breaker.lua``), so replicas that record outcomes at once never overwrite each other.
The set of services that ever had a step parked lives here too: the parked queues of
each are drained by whichever replica holds their drain lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys

__all__ = ["BreakerHashes"]

_SCRIPT = lua_source("breaker.lua")


class BreakerHashes:
    """Reads and compare-and-sets the breakers' hashes; lists services with parked steps."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._cas = redis.register_script(_SCRIPT)

    async def compare_and_set(
        self, service: str, version: int, fields: Sequence[Any], replica: str
    ) -> tuple[int, dict[Any, Any] | None]:
        """Write `fields` (state, counter, success, opened ms, probe-until ms) if the hash
        is still at `version`: (the new version, None); else (0, what the hash holds)."""
        with redis_errors(f"writing the breaker of {service}"):
            reply = await self._cas(
                keys=[self.keys.breaker(service)], args=[version, *fields, replica]
            )
        if int(reply[0]) == 1:
            return int(reply[1]), None
        flat = reply[1]
        return 0, dict(zip(flat[::2], flat[1::2], strict=True))

    async def read(self, services: Sequence[str]) -> list[dict[Any, Any]]:
        """The hash of each of `services` (empty where none was written)."""
        with redis_errors("reading the breakers"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in services:
                    pipe.hgetall(self.keys.breaker(name))
                return list(await pipe.execute())

    async def note_parking(self, service: str) -> None:
        """List `service` among the services with parked steps."""
        with redis_errors("listing a service with parked steps"):
            await self.redis.sadd(self.keys.parked_services, service)

    async def parking_services(self) -> set[str]:
        """Every service that ever had a step parked."""
        with redis_errors("listing services with parked steps"):
            return {text(s) for s in await self.redis.smembers(self.keys.parked_services)}
