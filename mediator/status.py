"""What ops want to know, read from Redis across shards: counts and recent workflows."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from mediator.errors import StateUnavailable
from mediator.keys import Keys

__all__ = ["collect_status"]

STATUSES = ("running", "completed", "failed")


async def collect_status(redis: Redis, keys: Keys, *, limit: int = 10) -> dict[str, Any]:
    """Workflow counts by status, counters by workflow and service, the latest finished runs.

    Counts by status cover the retention window (finished runs expire); counters are
    cumulative since the key prefix was first used.
    """
    try:
        return await _collect(redis, keys, limit)
    except RedisError as exc:
        msg = f"cannot read status from Redis: {exc}"
        raise StateUnavailable(msg) from exc


async def _collect(redis: Redis, keys: Keys, limit: int) -> dict[str, Any]:
    shards = range(keys.shards)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            for status in STATUSES:
                pipe.zcard(keys.status_index(shard, status))
            pipe.hgetall(keys.counters(shard))
            pipe.zrevrange(keys.recent(shard), 0, limit - 1, withscores=True)
            pipe.zcard(keys.outbox_due(shard))
        replies = await pipe.execute()
    counts = dict.fromkeys(STATUSES, 0)
    counters: dict[str, int] = {}
    recent: list[tuple[float, str]] = []
    outbox = 0
    per_shard = len(STATUSES) + 3
    for shard in shards:
        chunk = replies[shard * per_shard : (shard + 1) * per_shard]
        for status, n in zip(STATUSES, chunk, strict=False):
            counts[status] += int(n)
        for name, value in chunk[len(STATUSES)].items():
            key = name.decode() if isinstance(name, bytes) else name
            counters[key] = counters.get(key, 0) + int(value)
        recent += [(score, _text(wid)) for wid, score in chunk[len(STATUSES) + 1]]
        outbox += int(chunk[len(STATUSES) + 2])
    recent.sort(reverse=True)
    return {
        "counts": counts,
        "workflows": _by_prefix(counters, "wf:"),
        "services": _by_prefix(counters, "svc:"),
        "outbox_pending": outbox,
        "recent": await _describe(redis, keys, [wid for _, wid in recent[:limit]]),
    }


async def _describe(redis: Redis, keys: Keys, workflow_ids: list[str]) -> list[dict[str, Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for wid in workflow_ids:
            pipe.hmget(keys.workflow(wid), "workflow", "status", "updated_ms")
        rows = await pipe.execute()
    out = []
    for wid, (name, status, updated) in zip(workflow_ids, rows, strict=True):
        if status is None:
            continue  # expired between the two reads
        out.append(
            {
                "workflow_id": wid,
                "workflow": _text(name),
                "status": _text(status),
                "finished_ms": int(updated),
            }
        )
    return out


def _by_prefix(counters: dict[str, int], prefix: str) -> dict[str, dict[str, int]]:
    grouped: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if not name.startswith(prefix):
            continue
        subject, _, measure = name[len(prefix) :].rpartition(":")
        grouped.setdefault(subject, {})[measure] = value
    return dict(sorted(grouped.items()))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
