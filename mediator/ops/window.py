"""Reading a topic over a window of time, for the tools that look back (``recover``).

A window is ``[since, until)``: from the first record at or after `since` to the first at
or after `until` (or to the end of each partition when the read starts), so records
published while it runs (the tool's own included) are not read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from mediator.errors import BadTime, RecoverError

__all__ = ["Window", "parse_moment", "parse_time", "read_window", "window"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_POLL_MS = 200
_MAX_RECORDS = 500

#: ``[start, stop)`` offsets per partition.
Window = dict[TopicPartition, tuple[int, int]]
Records = Sequence[ConsumerRecord[bytes, bytes]]


def parse_time(text: str, *, now_ms: int) -> int:
    """Milliseconds since the epoch of ``text``: ISO-8601, or a duration before ``now_ms``."""
    match = _RELATIVE.match(text)
    if match is not None:
        return now_ms - round(float(match[1]) * _UNIT_MS[match[2]])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTime(text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def parse_moment(text: str | None, *, now_ms: int) -> int | None:
    """A time filter as people write it: epoch milliseconds, an ISO-8601 time, or an age
    before ``now_ms`` (``10m``, ``2h``); None if not given. Raises `BadTime`."""
    if not text or not text.strip():
        return None
    if text.strip().isdigit():
        return int(text)
    return parse_time(text, now_ms=now_ms)


async def window(
    consumer: AIOKafkaConsumer, topic: str, since_ms: int, until_ms: int | None
) -> Window:
    """``[start, stop)`` offsets of every partition of ``topic`` (empty ranges left out)."""
    # `topics()` asks for full metadata, which never creates a topic as a side effect.
    if topic not in await consumer.topics():
        msg = f"topic {topic!r} does not exist; check kafka.topic_prefix"
        raise RecoverError(msg)
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    ends = await _end_offsets(consumer, tps)
    starts = await _offsets_at(consumer, tps, since_ms, ends)
    stops = ends if until_ms is None else await _offsets_at(consumer, tps, until_ms, ends)
    return {tp: (starts[tp], stops[tp]) for tp in tps if starts[tp] < stops[tp]}


async def _end_offsets(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, now."""
    listed: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    # Tansu lists the base offset of the last batch + 1, short of the end when that batch
    # holds several records; the high watermark of a fetch is right on every broker. A
    # fetch from the listed end costs at most one fetch_max_wait_ms.
    consumer.assign(list(tps))
    for tp in tps:
        consumer.seek(tp, listed[tp])
    while any(consumer.highwater(tp) is None for tp in tps):
        await consumer.getmany(*tps, timeout_ms=_POLL_MS)
    return {tp: max(listed[tp], consumer.highwater(tp)) for tp in tps}


async def _offsets_at(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], ms: int, ends: dict[Any, int]
) -> dict[TopicPartition, int]:
    found = await consumer.offsets_for_times(dict.fromkeys(tps, ms))
    # No record at or after `ms`: Apache Kafka answers None, Tansu offset 0 and timestamp -1.
    return {
        tp: ends[tp] if hit is None or hit.timestamp < 0 else min(hit.offset, ends[tp])
        for tp, hit in found.items()
    }


async def read_window(
    consumer: AIOKafkaConsumer,
    span: Window,
    handle: Callable[[Records], Awaitable[None]],
    timeout_s: float,
) -> None:
    """Hand every record of `span` to `handle`, batch by batch, up to each partition's
    stop offset; `RecoverError` when the broker gives nothing for `timeout_s`."""
    if not span:
        return  # (aiokafka's consumer assigned no partition at all never stops)
    stops = {tp: stop for tp, (_, stop) in span.items()}
    consumer.assign(list(stops))
    for tp, (start, _) in span.items():
        consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while stops:
        batches = await consumer.getmany(*stops, timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
        records = [
            record
            for tp, batch in batches.items()
            for record in batch
            if record.offset < stops.get(tp, -1)
        ]
        if records:
            await handle(records)
            deadline = loop.time() + timeout_s
        for tp in list(stops):
            if await consumer.position(tp) >= stops[tp]:
                consumer.pause(tp)
                del stops[tp]
        if stops and loop.time() > deadline:
            behind = ", ".join(f"{tp.partition}" for tp in stops)
            topic = next(iter(stops)).topic
            msg = (
                f"no records from {topic} partitions {behind} within {timeout_s:g}s; "
                "the broker may be unavailable"
            )
            raise RecoverError(msg)
