"""What `mediator services` shows: every service the registry or the breakers know, its
instances as their heartbeats describe them, its breaker and its parked backlog."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from mediator.ops.control import breaker_states
from mediator.storage.connection import text
from mediator.storage.keys import Keys
from mediator.storage.parked import parked_counts
from mediator.storage.registry import read_registry
from mediator.storage.slots import Slots

__all__ = ["collect_keys", "collect_services", "format_keys", "format_services"]

#: Concurrency keys shown (those with the longest queues first).
KEYS_SHOWN = 20


async def collect_services(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Service -> {breaker, parked, instances: [...]}, read from Redis; the ages of the
    last heartbeats are on Redis's clock, as their times are."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    registry = await read_registry(redis, keys)
    breakers = await breaker_states(redis, keys)
    flows = await flow_states(redis, keys)
    names = sorted(set(registry) | set(breakers) | set(flows))
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
        if name in flows:
            found[name]["flow"] = flows[name]
    return found


async def flow_states(redis: Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Service -> its flow-control limit as the release loop last recorded it (limits,
    commands in flight, queue length), for the services that have one."""
    found: dict[str, dict[str, Any]] = {}
    per_instance: dict[str, dict[str, int]] = {}
    async for raw in redis.scan_iter(match=keys.limit("*")[1], count=500):
        key = text(raw)
        scope = key[key.index("{") + 1 : key.rindex("}")]
        inflight, state = keys.limit(scope)
        service, _, instance = scope.partition("@")
        if instance:  # a per-instance limit's permits
            per_instance.setdefault(service, {})[instance] = int(await redis.zcard(inflight))
            continue
        fields = {text(k): text(v) for k, v in (await redis.hgetall(state)).items()}
        found[service] = {
            "max_in_flight": int(fields.get("max") or 0) or None,
            "rate": float(fields.get("rate") or 0) or None,
            "in_flight": int(await redis.zcard(inflight)),
            "queued": int(fields.get("queued") or 0),
        }
    for service, counts in per_instance.items():
        if service in found:
            found[service]["instances"] = dict(sorted(counts.items()))
    return found


async def collect_keys(redis: Redis, keys: Keys, limit: int = KEYS_SHOWN) -> dict[str, Any]:
    """The concurrency keys with runs holding or waiting for their slots: totals per
    workflow, and the `limit` keys with the longest queues (then the longest waits), each
    with its runs in progress, queued, and how long its oldest has waited (Redis clock)."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    # Idle keys (nothing held or waiting) stay indexed until the upkeep drops them.
    states = [s for s in await Slots(redis, keys).known() if s.held or s.queued]
    workflows: dict[str, dict[str, Any]] = {}
    for state in states:
        doc = workflows.setdefault(
            state.workflow, {"keys": 0, "running": 0, "queued": 0, "oldest_wait_ms": None}
        )
        doc["keys"] += 1
        doc["running"] += state.held
        doc["queued"] += state.queued
        if state.oldest_ms is not None:
            wait = max(0, now_ms - state.oldest_ms)
            doc["oldest_wait_ms"] = max(doc["oldest_wait_ms"] or 0, wait)
    busiest = sorted(states, key=lambda s: (-s.queued, s.oldest_ms or now_ms, s.workflow, s.key))[
        :limit
    ]
    return {
        "workflows": workflows,
        "keys": [
            {
                "workflow": s.workflow,
                "key": s.key,
                "limit": s.limit,
                "running": s.held,
                "queued": s.queued,
                "oldest_wait_ms": None if s.oldest_ms is None else max(0, now_ms - s.oldest_ms),
            }
            for s in busiest
        ],
    }


def format_keys(found: dict[str, Any]) -> str:
    """Concurrency keys as text: a line per workflow, then the busiest keys."""
    if not found["workflows"]:
        return ""
    lines = ["concurrency keys:"]
    for name, doc in sorted(found["workflows"].items()):
        lines.append(
            f"  {name}: {doc['keys']} keys, {doc['running']} running, {doc['queued']} queued"
            + _wait(doc["oldest_wait_ms"])
        )
    for key in found["keys"]:
        lines.append(
            f"    {key['workflow']} {key['key']!r}: running {key['running']}/{key['limit']}, "
            f"queued {key['queued']}" + _wait(key["oldest_wait_ms"])
        )
    return "\n".join(lines)


def _wait(ms: int | None) -> str:
    return "" if ms is None else f", oldest waiting {ms / 1000:.1f}s"


def _flow_line(flow: dict[str, Any] | None) -> str:
    if not flow:
        return ""
    cap = flow["max_in_flight"] or "-"
    rate = f"{flow['rate']:g}/s" if flow["rate"] else "-"
    line = f", in flight {flow['in_flight']}/{cap}, rate {rate}, queued {flow['queued']}"
    if flow.get("instances"):
        line += (
            " (per instance: " + ", ".join(f"{i} {n}" for i, n in flow["instances"].items()) + ")"
        )
    return line


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
            + _flow_line(doc.get("flow"))
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
