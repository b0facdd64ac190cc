"""Reading the registry of service instances (written by `mediator.runtime.registry`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.storage.connection import text
from mediator.storage.keys import Keys
from topics.events import HealthStatus

__all__ = ["InstanceView", "read_registry"]


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the registry holds it."""

    service: str
    instance: str
    status: str
    last_seen_ms: int
    beat: dict[str, Any]
    #: Marked down because its heartbeats stopped (not because it left cleanly).
    dead: bool = False

    @property
    def up(self) -> bool:
        return self.status == HealthStatus.UP

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "status": self.status,
            "last_seen_ms": self.last_seen_ms,
            **{k: v for k, v in self.beat.items() if k not in ("type", "service", "instance")},
        }


async def read_registry(
    redis: Redis, keys: Keys, services: Iterable[str] | None = None
) -> dict[str, list[InstanceView]]:
    """Every instance of every service (or of ``services``), as Redis holds them."""
    if services is None:
        services = {text(s) for s in await redis.smembers(keys.services)}
    names = sorted(services)
    async with redis.pipeline(transaction=False) as pipe:
        for service in names:
            docs, status, _, seen, _, dead = keys.registry(service)
            pipe.hgetall(docs)
            pipe.hgetall(status)
            pipe.zrange(seen, 0, -1, withscores=True)
            pipe.smembers(dead)
        replies = await pipe.execute()
    found: dict[str, list[InstanceView]] = {}
    for index, service in enumerate(names):
        docs, status, seen, dead = replies[4 * index : 4 * index + 4]
        statuses = {text(k): text(v) for k, v in status.items()}
        last = {text(k): int(v) for k, v in seen}
        gone = {text(m) for m in dead}
        views = []
        for raw_instance, raw_doc in docs.items():
            instance = text(raw_instance)
            try:
                beat = orjson.loads(raw_doc)
            except orjson.JSONDecodeError:
                continue  # written by the script from a validated event: never expected
            views.append(
                InstanceView(
                    service,
                    instance,
                    statuses.get(instance, "down"),
                    last.get(instance, 0),
                    beat,
                    instance in gone,
                )
            )
        found[service] = sorted(views, key=lambda v: v.instance)
    return found
