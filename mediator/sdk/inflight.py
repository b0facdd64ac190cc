"""A worker's records in flight: the tasks running their commands, and the offsets that
may be committed once their replies are out. `InFlight` also declares what every part of a
`Worker` shares."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.errors import KafkaError

from mediator.core.signing import Keyring
from mediator.kafka import KafkaConnection
from mediator.sdk.offsets import OffsetTracker
from mediator.sdk.tally import Tally
from topics.events import (
    CommandEvent,
    HealthStatus,
)
from topics.names import Topics

__all__ = ["InFlight", "Queued"]

log = logging.getLogger("mediator.worker")

#: A reply waiting for the producer: its command, its bytes, and where the command was read.
Queued = tuple[CommandEvent, bytes, TopicPartition, int]


class InFlight:
    """What the parts of a `Worker` share, and its bookkeeping of records in flight."""

    service: str
    topics: Topics
    boot: str
    _seq: Iterator[int]
    instance: str
    group_id: str
    keys: Keyring | None
    legacy_signatures: bool
    expiry_grace_ms: int | None
    bootstrap_servers: str | KafkaConnection
    enable_idempotence: bool
    stop_timeout: float
    _consumer_options: dict[str, Any]
    _producer_options: dict[str, Any]
    stats: Counter[str]
    _actions: dict[str, tuple[Callable[..., Any], bool]]
    _idempotent: set[str]
    _limit: asyncio.Semaphore
    _dedup_size: int
    _max_records: int
    _max_in_flight: int
    _offsets: OffsetTracker[TopicPartition]
    _tasks: set[asyncio.Task[None]]
    _side_tasks: set[asyncio.Task[None]]
    _room: asyncio.Event
    heartbeat_interval: float | None
    weight: float
    version: str | None
    status: HealthStatus
    _capacity: int
    _tally: Tally
    _beats: asyncio.Task[None] | None
    _poll_timeout_ms: int
    _replies: OrderedDict[str, bytes]
    _by_key: OrderedDict[str, bytes]
    _keys_running: dict[str, str]
    _running: dict[str, asyncio.Future[bytes] | None]
    _consumer: AIOKafkaConsumer | None
    _producer: AIOKafkaProducer | None
    _task: asyncio.Task[None] | None
    #: Replies waiting for the producer, whether handing them over is scheduled, and the
    #: tasks handing their batches over (see `Replies`).
    _outgoing: list[Queued]
    _flush_due: bool
    _submits: set[asyncio.Future[Any]]

    def _done(self, tp: TopicPartition, offset: int) -> None:
        """The record at ``offset`` is dealt with: its offset may be committed."""
        self._offsets.done(tp, offset)
        self._room.set()

    def _spawn(self, work: Coroutine[Any, Any, None], tp: TopicPartition, offset: int) -> None:
        """Run ``work`` (about the record at ``offset``) as a task the worker waits for
        when stopping."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._ended, tp, offset))

    def _ended(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return  # stopped before its reply went out: not committed, consumed again later
        if task.exception() is not None:
            # A bug in handling, not an action's failure (those are error replies): logged,
            # and the partition's commits are not held by it.
            log.error(
                "command at %s[%d] offset %d failed: %r",
                tp.topic,
                tp.partition,
                offset,
                task.exception(),
            )
            self._done(tp, offset)

    async def _commit(self, partitions: Iterable[TopicPartition]) -> None:
        """Commit, per partition, the offsets whose commands all got their replies sent."""
        ready = self._offsets.committable(partitions)
        if not ready or self._consumer is None:
            return
        try:
            await self._consumer.commit(ready)
        except KafkaError as exc:
            # After a rebalance the new owner re-reads these; the dedup cache or the
            # mediator's own dedup absorbs the duplicates.
            log.warning("offset commit failed: %r", exc)

    async def _revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Before giving partitions up, commit what is done on them and stop tracking them."""
        lost = list(revoked)
        await self._commit(lost)
        self._offsets.drop(lost)
        self._room.set()
