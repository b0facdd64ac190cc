"""What ops want to know, read from Redis across shards: counts and recent workflows.

Readers must use the shard count the key prefix was laid out with, which `med:meta`
records (a `mediator dev` deployment may use another count than the settings say):
`stored_keys` gives the right `Keys`.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from mediator.core.state import loads
from mediator.errors import StateUnavailable
from mediator.storage.connection import text
from mediator.storage.errors import REDIS_ERRORS
from mediator.storage.keys import Keys

__all__ = ["collect_status", "format_stats", "stored_keys"]

STATUSES = ("running", "completed", "failed")


async def stored_keys(redis: Redis, prefix: str, default_shards: int) -> Keys:
    """Keys for `prefix` with the shard count recorded in its meta hash, else `default_shards`.

    The meta hash is written when the first replica starts; before that nothing is stored
    under the prefix, so the configured count is as good as any.
    """
    keys = Keys(prefix, default_shards)
    try:
        stored = await redis.hget(keys.meta, "shards")
    except REDIS_ERRORS as exc:
        msg = f"cannot read the key layout from Redis: {exc}"
        raise StateUnavailable(msg) from exc
    if stored is None:
        return keys
    try:
        shards = int(stored)
    except ValueError:
        shards = 0
    if shards < 1:
        msg = f"{keys.meta} holds shards={text(stored)!r}, not a shard count; fix or delete it"
        raise StateUnavailable(msg)
    return Keys(prefix, shards)


async def collect_status(redis: Redis, keys: Keys, *, limit: int = 10) -> dict[str, Any]:
    """Workflow counts by status, counters by workflow and service, the latest finished runs.

    Counts by status cover the retention window (finished runs expire); counters are
    cumulative since the key prefix was first used. ``stats`` holds the deployment-wide
    counters (dead letters, unknown-workflow replies, outbox retries) as stored.
    """
    try:
        return await _collect(redis, keys, limit)
    except REDIS_ERRORS as exc:
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
        pipe.hgetall(keys.stats)
        replies = await pipe.execute()
    stats = {text(name): _number(value) for name, value in replies.pop().items()}
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
        recent += [(score, text(wid)) for wid, score in chunk[len(STATUSES) + 1]]
        outbox += int(chunk[len(STATUSES) + 2])
    recent.sort(reverse=True)
    return {
        "counts": counts,
        "workflows": _by_prefix(counters, "wf:"),
        "services": _by_prefix(counters, "svc:"),
        "outbox_pending": outbox,
        "shards": keys.shards,
        "stats": dict(sorted(stats.items())),
        "recent": await _describe(redis, keys, [wid for _, wid in recent[:limit]]),
    }


async def _describe(redis: Redis, keys: Keys, workflow_ids: list[str]) -> list[dict[str, Any]]:
    async with redis.pipeline(transaction=False) as pipe:
        for wid in workflow_ids:
            pipe.hmget(keys.workflow(wid), "workflow", "status", "updated_ms", "state")
        rows = await pipe.execute()
    out = []
    for wid, (name, status, updated, blob) in zip(workflow_ids, rows, strict=True):
        if status is None:
            continue  # expired between the two reads
        out.append(
            {
                "workflow_id": wid,
                "workflow": text(name),
                "status": text(status),
                "finished_ms": int(updated),
                "error": _error_message(blob),
            }
        )
    return out


def _error_message(blob: bytes | None) -> str | None:
    """The message of a finished run's error, if it failed (None if it did not, or its
    state no longer decodes)."""
    if blob is None:
        return None
    try:
        error = loads(blob).error
    except (ValueError, TypeError, KeyError):
        return None
    return error["message"] if error is not None else None


def _by_prefix(counters: dict[str, int], prefix: str) -> dict[str, dict[str, int]]:
    grouped: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        if not name.startswith(prefix):
            continue
        subject, _, measure = name[len(prefix) :].rpartition(":")
        grouped.setdefault(subject, {})[measure] = value
    return dict(sorted(grouped.items()))


def format_stats(stats: dict[str, int | float]) -> str:
    """One line for the deployment-wide counters, whatever fields exist.

    A field ``name:detail`` is listed in parentheses after ``name``:
    ``dead letters 3 (invalid 2, too_large 1)  replies (unknown_workflow 5)``.
    """
    groups: dict[str, tuple[list[int | float], list[str]]] = {}
    for field, value in sorted(stats.items()):
        name, _, detail = field.partition(":")
        total, details = groups.setdefault(name, ([], []))
        if detail:
            details.append(f"{detail} {value}")
        else:
            total.append(value)
    parts = []
    for name, (total, details) in groups.items():
        label = name.replace("_", " ")
        if total:
            label += f" {total[0]}"
        if details:
            label += f" ({', '.join(details)})"
        parts.append(label)
    return "  ".join(parts)


def _number(value: bytes | str) -> int | float:
    # Counters are HINCRBY integers (HINCRBYFLOAT for a float); a field someone wrote by
    # hand that is no number reads as 0 rather than failing the whole report.
    written = text(value)
    try:
        return int(written)
    except ValueError:
        try:
            return float(written)
        except ValueError:
            return 0
