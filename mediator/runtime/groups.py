"""Consumer groups across upgrades: a group that replaces others starts where they stopped.

Replicas before this version read the requests and the replies with two consumer groups,
``<group_id>.requests`` and ``<group_id>.replies``; they are now read by one,
``<group_id>.inbound``. A new group without committed offsets would start at the earliest
records retained (``auto_offset_reset``) and replay them all: replies are recognised and
ignored, but a request whose run's tombstone has expired would start that run again. So
before its first poll, each partition of the new group that has no committed offset is
given the one the old group committed for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from mediator.kafka import new_consumer
from mediator.settings import BackoffSettings, KafkaSettings

__all__ = ["INBOUND", "adopt_offsets", "group_name", "inbound_group", "previous_groups"]

log = logging.getLogger("mediator.consumers")

#: The name of the subscriber (and its group's suffix) that reads requests and replies.
INBOUND = "inbound"

#: Tries of the whole carry-over before the replica gives up starting.
ATTEMPTS = 5


def group_name(settings: KafkaSettings, name: str) -> str:
    """The consumer group of the mediator's subscriber `name`: ``<group_id>.<name>``."""
    return f"{settings.group_id}.{name}"


def inbound_group(settings: KafkaSettings) -> str:
    """The group that reads the requests and replies topics."""
    return group_name(settings, INBOUND)


def previous_groups(settings: KafkaSettings) -> dict[str, str]:
    """Topic -> the group that read it before `inbound_group` did."""
    topics = settings.topics
    return {
        topics.requests: group_name(settings, "requests"),
        topics.replies: group_name(settings, "replies"),
    }


async def adopt_offsets(
    settings: KafkaSettings,
    group: str,
    previous: Mapping[str, str],
    backoff: BackoffSettings | None = None,
) -> dict[TopicPartition, int]:
    """Commit to `group`, for each partition of `previous`'s topics where it has none,
    the offset that topic's previous group committed; returns what was carried over.

    A transient broker failure is retried with capped backoff; after `ATTEMPTS` the
    error is raised (the replica does not start rather than replay what was done)."""
    backoff = backoff or BackoffSettings()
    for attempt in itertools.count(1):
        try:
            return await _adopt(settings, group, previous)
        except KafkaError as exc:
            if attempt >= ATTEMPTS:
                raise
            delay = backoff.delay_ms(attempt)
            log.warning(
                "carrying consumer offsets over to %s failed (try %d), retrying in %d ms: %s",
                group,
                attempt,
                delay,
                exc,
            )
            await asyncio.sleep(delay / 1000)
    raise AssertionError  # the loop above only returns or raises


async def _adopt(
    settings: KafkaSettings, group: str, previous: Mapping[str, str]
) -> dict[TopicPartition, int]:
    new = _consumer(settings, group)
    await new.start()
    try:
        await new.topics()  # metadata of every topic, for their partitions
        missing = [
            TopicPartition(topic, partition)
            for topic in previous
            for partition in sorted(new.partitions_for_topic(topic) or ())
        ]
        missing = [tp for tp in missing if await new.committed(tp) is None]
        carried = await _committed(settings, previous, missing)
        if carried:
            new.assign(list(carried))
            await new.commit(carried)
            log.info(
                "consumer group %s starts where %s stopped: %d partitions",
                group,
                ", ".join(sorted(set(previous.values()))),
                len(carried),
            )
        return carried
    finally:
        await new.stop()


async def _committed(
    settings: KafkaSettings, previous: Mapping[str, str], partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The offsets the previous groups committed for `partitions` (those they have)."""
    found: dict[TopicPartition, int] = {}
    for old_group in sorted(set(previous.values())):
        mine = [tp for tp in partitions if previous[tp.topic] == old_group]
        if not mine:
            continue
        old = _consumer(settings, old_group)
        await old.start()
        try:
            for tp in mine:
                offset = await old.committed(tp)
                if offset is not None:
                    found[tp] = offset
        finally:
            await old.stop()
    return found


def _consumer(settings: KafkaSettings, group: str) -> AIOKafkaConsumer:
    """A consumer of `group` that never joins it: it only reads and writes offsets."""
    return new_consumer(
        settings,
        group_id=group,
        client_id=settings.client_id,
        enable_auto_commit=False,
    )
