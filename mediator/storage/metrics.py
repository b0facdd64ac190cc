"""Metrics series in Redis: each replica adds its tallies to shared time buckets (one
pipeline per flush), and any reader sums a window of buckets (`mediator.core.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from mediator import clock
from mediator.core.metrics import GAUGES, Summary, summarize
from mediator.storage.connection import text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys

__all__ = ["MetricsStore"]

#: At most this many buckets are read for one series (a window over it is cut short).
MAX_BUCKETS = 2_000


class MetricsStore:
    """Reads and writes the metrics series of one key prefix."""

    def __init__(self, redis: Redis, keys: Keys, bucket_s: int, window_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.bucket_s = bucket_s
        #: Buckets expire this long after their start (plus one bucket).
        self.ttl_s = max(1, window_ms // 1000) + bucket_s

    async def write(self, series: Mapping[tuple[str, str, int], Mapping[str, int]]) -> None:
        """Add tallied fields to their buckets (``HINCRBY``, so replicas add up)."""
        if not series:
            return
        now_s = clock.now_ms() // 1000
        with redis_errors("writing metrics"):
            async with self.redis.pipeline(transaction=False) as pipe:
                names: dict[str, set[str]] = {}
                for (kind, name, bucket), fields in series.items():
                    key = self.keys.metric(kind, name, bucket)
                    for field, n in fields.items():
                        if field in GAUGES:
                            pipe.hset(key, field, n)
                        else:
                            pipe.hincrby(key, field, n)
                    pipe.expire(key, self.ttl_s)
                    names.setdefault(kind, set()).add(name)
                for kind, members in names.items():
                    # Scored by when last written: a name no longer written (an instance
                    # long gone) leaves the list once its buckets have expired.
                    listed = self.keys.metric_names(kind)
                    pipe.zadd(listed, dict.fromkeys(sorted(members), now_s))
                    pipe.zremrangebyscore(listed, "-inf", now_s - self.ttl_s)
                await pipe.execute()

    async def names(self, kind: str) -> list[str]:
        """Every series name of `kind` (``svc``, ``inst``, ``wf``)."""
        with redis_errors("listing metrics series"):
            members: list[Any] = await self.redis.zrange(self.keys.metric_names(kind), 0, -1)
        return sorted(text(m) for m in members)

    def _starts(self, since_s: int, until_s: int) -> list[int]:
        first = since_s - since_s % self.bucket_s
        starts = list(range(first, until_s + 1, self.bucket_s))
        return starts[-MAX_BUCKETS:]

    async def buckets(
        self, kind: str, names: list[str], since_s: int, until_s: int
    ) -> dict[str, list[tuple[int, dict[str, int]]]]:
        """Per series name, its buckets (start, fields) from `since_s` to `until_s`
        (epoch seconds), oldest first; buckets without data are left out."""
        starts = self._starts(since_s, until_s)
        if not names or not starts:
            return {name: [] for name in names}
        with redis_errors("reading metrics"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    for start in starts:
                        pipe.hgetall(self.keys.metric(kind, name, start))
                raw: list[Any] = await pipe.execute()
        out: dict[str, list[tuple[int, dict[str, int]]]] = {}
        at = 0
        for name in names:
            rows = []
            for start in starts:
                fields = raw[at]
                at += 1
                if fields:
                    rows.append((start, {text(k): int(v) for k, v in fields.items()}))
            out[name] = rows
        return out

    async def summaries(
        self, kind: str, names: list[str] | None, since_s: int, until_s: int
    ) -> dict[str, Summary]:
        """Each series of `kind` (all of them if `names` is None) summarised over the
        window from `since_s` to `until_s`."""
        chosen = await self.names(kind) if names is None else names
        rows = await self.buckets(kind, chosen, since_s, until_s)
        return {
            name: summarize((fields for _, fields in buckets), _covered(buckets, since_s, until_s))
            for name, buckets in rows.items()
        }


def _covered(buckets: list[tuple[int, dict[str, int]]], since_s: int, until_s: int) -> float:
    """The seconds of the window a series has data for: from its first bucket (or the
    window's start), so rates just after a start are over the time that exists, not
    diluted over the whole window."""
    first = min((start for start, _ in buckets), default=since_s)
    return float(max(1, until_s - max(since_s, first)))
