"""What the broker accepts per topic: each topic's `max.message.bytes`, read at start.

A broker refuses a record batch over its topic's `max.message.bytes` whole, and the
records the producer gathered in it with it. The mediator bounds every batch it sends by
`limits.max_message_bytes` (the producer's `max_request_size`, and its batch size), so a
topic that takes less than that can refuse batches of commands that are each small; with
`kafka.enable_idempotence` on, aiokafka does not take back the sequence numbers of a
refused batch, and every later batch to that partition is refused as out of order until
the producer is made again (the outbox does that). Reading the limits at start says so
before it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from mediator.kafka import KafkaConnection, new_admin

__all__ = ["MAX_MESSAGE_BYTES", "too_small", "topic_size_limits", "warn_of_small_topics"]

log = logging.getLogger("mediator.kafka")

#: The topic setting (and the broker default it falls back to) a record batch must fit.
MAX_MESSAGE_BYTES = "max.message.bytes"


async def topic_size_limits(
    kafka: str | KafkaConnection, topics: Sequence[str], timeout_s: float = 10.0
) -> dict[str, int]:
    """Each topic's `max.message.bytes` as the broker describes it (the topic's own, or
    the broker's default); a topic it does not describe (missing, not allowed) is left
    out. Raises if the broker cannot be asked within `timeout_s`."""
    if not topics:
        return {}
    admin = new_admin(kafka, request_timeout_ms=int(timeout_s * 1000))
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            # Every setting of each topic: a broker that takes a list of names to describe
            # may not (Tansu drops the connection).
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
            )
    finally:
        await admin.close()
    return dict(_limits(responses))


def _limits(responses: Iterable[Any]) -> Iterable[tuple[str, int]]:
    for response in responses:
        for resource in response.resources:
            error_code, _message, _kind, name, entries = resource[:5]
            if error_code:
                continue
            for entry in entries:
                if entry[0] == MAX_MESSAGE_BYTES:
                    with contextlib.suppress(TypeError, ValueError):
                        yield name, int(entry[1])


def too_small(limits: dict[str, int], batch_bytes: int) -> list[tuple[str, int]]:
    """The topics (name, limit) whose limit is under `batch_bytes`, by name."""
    return sorted((name, size) for name, size in limits.items() if size < batch_bytes)


async def warn_of_small_topics(
    kafka: str | KafkaConnection,
    topics: Sequence[str],
    batch_bytes: int,
    setting: str = "limits.max_message_bytes",
) -> list[tuple[str, int]]:
    """Log a warning for each of `topics` that takes less than `batch_bytes`, the most a
    batch of ours can hold (`setting`, the producer's `max_request_size`); a broker that
    cannot say is logged and left alone: this never stops a start. Returns the topics
    warned of."""
    try:
        limits = await topic_size_limits(kafka, topics)
    except Exception as exc:
        log.info("could not read the topics' %s (%s); not checked", MAX_MESSAGE_BYTES, exc)
        return []
    small = too_small(limits, batch_bytes)
    for name, size in small:
        log.warning(
            "topic %s takes record batches of at most %d bytes (%s), under the %d of %s: "
            "the broker would refuse a batch over it whole (with idempotence on, the later "
            "ones to that partition too, until a new producer takes over). Set %s "
            "to %d or less, or raise the topic's %s",
            name,
            size,
            MAX_MESSAGE_BYTES,
            batch_bytes,
            setting,
            setting,
            size,
            MAX_MESSAGE_BYTES,
        )
    return small
