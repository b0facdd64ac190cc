"""Leases in Redis: one replica at a time does a piece of work (drains a service's parked
queue, evaluates alerts), taking the lease when it is free and keeping it while it renews
it within its time to live."""

from __future__ import annotations

from redis.asyncio import Redis

from mediator.storage.connection import lua_source

__all__ = ["Leases"]


class Leases:
    """Takes and renews leases (`lease.lua`: atomic, so a lease that ran out and went to
    another holder is never extended for it)."""

    def __init__(self, redis: Redis) -> None:
        self._hold = redis.register_script(lua_source("lease.lua"))

    async def hold(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take or renew the lease `key` for `holder`; whether `holder` has it now."""
        return int(await self._hold(keys=[key], args=[holder, ttl_ms])) == 1
