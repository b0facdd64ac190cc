"""Signals by correlation key (`Keys.correlation`): which run a key's `wait` step
subscribed it for, and the signals sent for it before one did. Subscribing and routing are
one script each, on the key's own hash slot, so a signal is either routed to the
subscribed run or kept for the next subscriber, never lost between the two."""

from __future__ import annotations

from redis.asyncio import Redis

from mediator.core.signals import INBOX_TTL_MS, MAX_INBOX
from mediator.storage.connection import lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys, correlation_digest

__all__ = ["Correlations"]

_SUBSCRIBE = lua_source("signal_subscribe.lua")
_ROUTE = lua_source("signal_route.lua")


class Correlations:
    """Routes signals sent by correlation key."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self._subscribe = redis.register_script(_SUBSCRIBE)
        self._route = redis.register_script(_ROUTE)

    async def subscribe(self, event: str, key: str, workflow_id: str, ttl_ms: int) -> list[bytes]:
        """Send later signals `event` for `key` to `workflow_id` (for `ttl_ms`); the
        signals kept for it until now (JSON controls, oldest first)."""
        with redis_errors(f"subscribing {workflow_id} to signal {event} key {key!r}"):
            kept = await self._subscribe(keys=self._keys(event, key), args=[workflow_id, ttl_ms])
        return list(kept)

    async def route(self, event: str, key: str, signal: bytes) -> str | None:
        """The run subscribed to `event` for `key`; None when none is, and `signal` (a
        JSON control) was kept for the next (at most `MAX_INBOX` per key, `INBOX_TTL_MS`)."""
        with redis_errors(f"routing signal {event} key {key!r}"):
            run = await self._route(
                keys=self._keys(event, key), args=[signal, MAX_INBOX, INBOX_TTL_MS]
            )
        return text(run) if run else None

    def _keys(self, event: str, key: str) -> list[str]:
        return list(self.keys.correlation(correlation_digest(event, key)))
