"""The alerts kept in Redis: those firing now and the history of changes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError
from redis.asyncio import Redis

from mediator.storage.connection import text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from mediator.storage.leases import Leases
from topics.events import AlertEvent, AlertState

__all__ = ["AlertRecords", "active_alerts", "alert_history"]

log = logging.getLogger("mediator.alerts")


async def active_alerts(redis: Redis, keys: Keys) -> dict[str, AlertEvent]:
    """The alerts firing now, by alert id (entries that no longer decode are skipped)."""
    raw = await redis.hgetall(keys.alerts("active"))
    out = {}
    for alert_id, doc in raw.items():
        try:
            out[text(alert_id)] = AlertEvent.model_validate_json(doc)
        except ValidationError as exc:
            log.warning("stored alert %s does not decode: %s", text(alert_id), exc)
    return out


async def alert_history(redis: Redis, keys: Keys, limit: int = 100) -> list[AlertEvent]:
    """Alerts fired and resolved, newest first."""
    raw = await redis.lrange(keys.alerts("history"), 0, max(0, limit - 1))
    out = []
    for doc in raw:
        try:
            out.append(AlertEvent.model_validate_json(doc))
        except ValidationError:
            continue
    return out


class AlertRecords:
    """The evaluating replica's side: its lease, the alerts firing, and their changes."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.leases = Leases(redis)

    async def lead(self, replica: str, ttl_ms: int) -> bool:
        """Take or keep the evaluation lease for `replica` (one evaluates at a time)."""
        with redis_errors("taking the alert lease"):
            return await self.leases.hold(self.keys.alerts("lease"), replica, ttl_ms)

    async def active(self) -> dict[str, AlertEvent]:
        """The alerts firing now, by alert id."""
        with redis_errors("reading the alerts firing"):
            return await active_alerts(self.redis, self.keys)

    async def refresh(self, firing: Sequence[AlertEvent]) -> None:
        """Update alerts that keep firing to what they say now (value and message)."""
        with redis_errors("refreshing alerts"):
            await self.redis.hset(
                self.keys.alerts("active"),
                mapping={alert.alert_id: alert.model_dump_json() for alert in firing},
            )

    async def record(self, changes: Sequence[AlertEvent], history: int) -> None:
        """Apply fired and resolved alerts to the active set, and add them to the history
        (kept to its `history` newest), in one transaction."""
        with redis_errors("recording alerts"):
            async with self.redis.pipeline(transaction=True) as pipe:
                for change in changes:
                    doc = change.model_dump_json()
                    if change.state is AlertState.FIRING:
                        pipe.hset(self.keys.alerts("active"), change.alert_id, doc)
                    else:
                        pipe.hdel(self.keys.alerts("active"), change.alert_id)
                    pipe.lpush(self.keys.alerts("history"), doc)
                pipe.ltrim(self.keys.alerts("history"), 0, history - 1)
                await pipe.execute()
