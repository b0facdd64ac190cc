"""The alerts kept in Redis: those firing now and the history of changes."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from redis.asyncio import Redis

from mediator.storage.connection import text
from mediator.storage.keys import Keys
from topics.events import AlertEvent

__all__ = ["active_alerts", "alert_history"]

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
