"""What `mediator services` shows: every service the registry or the breakers know, its
instances as their heartbeats describe them, its breaker and its parked backlog."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from mediator.ops.control import breaker_states
from mediator.storage.keys import Keys
from mediator.storage.parked import parked_counts
from mediator.storage.registry import read_registry

__all__ = ["collect_services", "format_services"]


async def collect_services(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Service -> {breaker, parked, instances: [...]}, read from Redis; the ages of the
    last heartbeats are on Redis's clock, as their times are."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    registry = await read_registry(redis, keys)
    breakers = await breaker_states(redis, keys)
    names = sorted(set(registry) | set(breakers))
    parked = await parked_counts(redis, keys, names) if names else {}
    found: dict[str, Any] = {}
    for name in names:
        instances = []
        for view in registry.get(name, []):
            doc = view.as_dict()
            doc["age_ms"] = max(0, now_ms - view.last_seen_ms) if view.last_seen_ms else None
            instances.append(doc)
        found[name] = {
            "breaker": breakers.get(name, {"state": "closed", "failures": 0}),
            "parked": parked.get(name, 0),
            "instances": instances,
        }
    return found


def format_services(services: dict[str, Any]) -> str:
    """A plain-text table per service."""
    if not services:
        return "no service has sent a heartbeat or tripped a breaker yet"
    lines = []
    for name, doc in services.items():
        breaker = doc["breaker"]
        up = sum(1 for i in doc["instances"] if i["status"] == "up")
        lines.append(
            f"{name}: {up}/{len(doc['instances'])} up, breaker {breaker['state']}"
            f" ({breaker['failures']} failures), parked {doc['parked']}"
        )
        for i in doc["instances"]:
            age = "never" if i["age_ms"] is None else f"{i['age_ms'] / 1000:.1f}s ago"
            latency = "-" if i.get("latency_ms") is None else f"{i['latency_ms']:.1f}ms"
            lines.append(
                f"  {i['instance']:<28} {i['status']:<9} seen {age:<10}"
                f" load {i.get('load', 0):g}/{i.get('capacity', 1)}"
                f"  partitions {','.join(map(str, i.get('partitions', []))) or '-'}"
                f"  answered {i.get('answered', 0)} errors {i.get('errors', 0)} mean {latency}"
                + (f"  v{i['version']}" if i.get("version") else "")
            )
    return "\n".join(lines)
