"""The replica's consumer loops: fetch a batch, run it behind its error boundary, commit
its offsets once it is in Redis, or rewind to it after a transient failure.

Each subscription (`Subscription`: the requests and replies together, the controls, the
heartbeats) is one aiokafka consumer in its own group, ``<group_id>.<name>``, read by one
task. A poll returns as soon as records are fetched and else after `poll_timeout_ms`, so
a record arriving on an idle replica is handled at once and an idle loop costs one
wake-up per timeout. Offsets are committed only for batches whose every record ended
applied or dead-lettered (`Offsets`), in the background and coalesced, so the next batch
is fetched while the commit is in flight; a batch that failed transiently is rewound
(every partition in it back to its earliest record) and fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from mediator.kafka import new_consumer
from mediator.runtime.boundary import Boundary
from mediator.runtime.failures import is_transient
from mediator.runtime.groups import group_name
from mediator.settings import BackoffSettings, KafkaSettings

__all__ = ["QUIET_FETCH_WAIT_MS", "BatchConsumer", "Offsets", "Subscription"]

log = logging.getLogger("mediator.consumers")

#: The fetch wait, at least, of the subscriptions off every workflow's path (heartbeats,
#: operators' controls). A broker that holds each empty fetch for the whole wait (the
#: embedded one does) is asked every few milliseconds by a consumer with a short wait;
#: these two need not be that prompt, and two fewer consumers polling that fast halve
#: what an idle replica and its broker spend.
QUIET_FETCH_WAIT_MS = 100

#: A consumer's offsets are committed at most this often. Each batch's would be one
#: OffsetCommit request per batch, which at low load (small batches) the replica and the
#: broker pay for per record. What a crash leaves uncommitted is redelivered and recognised.
COMMIT_EVERY_S = 0.05

#: How long, past a poll's timeout, `BatchConsumer.halt` waits for the batch in hand.
HALT_WAIT_S = 10.0

Process = Callable[[Sequence[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one consumer reads and what handles its batches."""

    #: The subscription's name: its consumer group is ``<group_id>.<name>``, its error
    #: boundary logs and counts under it.
    name: str
    topics: tuple[str, ...]
    process: Process
    #: Off the workflows' path: fetches wait at least `QUIET_FETCH_WAIT_MS`.
    quiet: bool = False


class _Committer:
    """Commits one consumer's processed offsets in the background, coalescing batches."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.pending: dict[TopicPartition, int] = {}
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="offset-committer")

    def mark(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if offset > self.pending.get(tp, -1):
                self.pending[tp] = offset
        self.wakeup.set()

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            await self.commit_pending()
            await asyncio.sleep(COMMIT_EVERY_S)  # what is marked meanwhile goes as one

    async def commit_pending(self) -> None:
        self.wakeup.clear()
        offsets, self.pending = self.pending, {}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, IllegalStateError) as exc:
            # A rebalance took the partitions away: their new owner replays from the last
            # committed offset, and replays are idempotent.
            log.info("offset commit skipped (%s): %s", type(exc).__name__, exc)
        except Exception:
            # Never let the committer die silently: the records are redelivered at worst.
            log.exception("offset commit failed; the records will be redelivered")


class Offsets:
    """Processed offsets, committed without holding up the next batch.

    Only offsets of records whose transitions are in Redis are ever marked, so the
    at-least-once guarantee is the same as committing synchronously; the next batch is
    fetched and processed while the commit is in flight.
    """

    def __init__(self) -> None:
        self._committers: dict[int, _Committer] = {}

    def mark(self, consumer: AIOKafkaConsumer, records: Sequence[Any]) -> None:
        """The batch `records` of `consumer` is fully processed."""
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        committer = self._committers.get(id(consumer))
        if committer is None:
            committer = self._committers[id(consumer)] = _Committer(consumer)
        committer.mark(offsets)

    async def flush(self) -> None:
        """Commit everything marked, and stop the background committers."""
        for committer in self._committers.values():
            committer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer.task
            await committer.commit_pending()
        self._committers.clear()


def rewind(consumer: AIOKafkaConsumer, records: Sequence[Any]) -> None:
    """Seek every partition of the batch `records` back to its earliest record."""
    earliest: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        if record.offset < earliest.get(tp, record.offset + 1):
            earliest[tp] = record.offset
    for tp, offset in earliest.items():
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: its new owner reads it
            consumer.seek(tp, offset)


class BatchConsumer:
    """One subscription's consumer and the task that reads it."""

    def __init__(
        self,
        settings: KafkaSettings,
        subscription: Subscription,
        boundary: Boundary,
        offsets: Offsets,
        backoff: BackoffSettings | None = None,
    ) -> None:
        self.settings = settings
        self.subscription = subscription
        self.boundary = boundary
        self.offsets = offsets
        self.backoff = backoff or BackoffSettings()
        #: Polls that failed in a row (the broker away, a group being rebalanced).
        self.poll_failures = 0
        #: The kind of the last poll failure of the streak (a new kind is always logged).
        self._poll_error: type[Exception] | None = None
        #: Created by `start`, inside the running event loop.
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._halting = False

    def _new_consumer(self) -> AIOKafkaConsumer:
        settings, subscription = self.settings, self.subscription
        wait_ms = settings.fetch_max_wait_ms
        return new_consumer(
            settings,
            *subscription.topics,
            group_id=group_name(settings, subscription.name),
            client_id=settings.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=max(wait_ms, QUIET_FETCH_WAIT_MS) if subscription.quiet else wait_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
        )

    async def start(self) -> None:
        """Join the group (this can take seconds) and start reading."""
        self.consumer = self._new_consumer()
        self._halting = False
        await self.consumer.start()
        self._task = asyncio.create_task(
            self._read(self.consumer), name=f"consume-{self.subscription.name}"
        )

    async def halt(self) -> None:
        """Stop reading: the batch being handled is let finish (for at most
        `HALT_WAIT_S` past the poll's timeout), then the loop ends; the consumer stays
        in its group, so the offsets marked can still be committed."""
        task, self._task = self._task, None
        if task is None:
            return
        self._halting = True
        wait_s = self.settings.poll_timeout_ms / 1000 + HALT_WAIT_S
        try:
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            log.warning(
                "%s: the batch in hand did not finish within %.0f s; it will be redelivered",
                self.subscription.name,
                wait_s,
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Leave the group and close the consumer."""
        await self.halt()
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        timeout_ms, max_records = self.settings.poll_timeout_ms, self.settings.max_batch_records
        boundary, process = self.boundary, self.subscription.process
        while not self._halting:
            try:
                batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._poll_failed(exc)
                continue
            self.poll_failures, self._poll_error = 0, None
            records = tuple(itertools.chain.from_iterable(batches.values()))
            if not records:
                continue
            if await boundary.run(records, process):
                self.offsets.mark(consumer, records)
            else:
                rewind(consumer, records)

    async def _poll_failed(self, exc: Exception) -> None:
        """A poll that raised: logged and retried with capped backoff, whatever it was (a
        consumer cannot skip what it could not fetch); permanent causes (no right to read
        the topic) are logged as errors, so they are seen. A streak logs its first failure,
        every failure of a new kind, and then every hundredth."""
        self.poll_failures += 1
        delay = self.backoff.delay_ms(self.poll_failures)
        level = logging.WARNING if is_transient(exc) else logging.ERROR
        new_kind, self._poll_error = type(exc) is not self._poll_error, type(exc)
        if new_kind or self.poll_failures in (1, 10) or self.poll_failures % 100 == 0:
            log.log(
                level,
                "%s: fetching failed (%d in a row), retrying in %d ms: %s",
                self.subscription.name,
                self.poll_failures,
                delay,
                exc,
            )
        await asyncio.sleep(delay / 1000)
