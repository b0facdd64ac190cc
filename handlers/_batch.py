"""What every batch handler does around the runtime: offsets after commit, rewind on outage."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from faststream import ContextRepo
from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from faststream.middlewares import AckPolicy

from handlers.groups import group_name
from mediator.runtime.boundary import Boundary
from mediator.settings import KafkaSettings

__all__ = ["Offsets", "batch_subscription", "handle_batch", "subscribe", "undecoded"]


log = logging.getLogger("mediator.handlers")


async def undecoded(message: Any) -> None:
    """FastStream decoder that decodes nothing: the runtime parses the raw records itself,
    once, straight into the event models."""
    return None


#: The fetch wait, at least, of the subscriptions off every workflow's path (heartbeats,
#: operators' controls). A broker that holds each empty fetch for the whole wait (the
#: embedded one does) is asked every few milliseconds by a consumer with a short wait;
#: these two need not be that prompt, and two fewer consumers polling that fast halve
#: what an idle replica and its broker spend.
QUIET_FETCH_WAIT_MS = 100


def batch_subscription(
    settings: KafkaSettings, name: str, *, quiet: bool = False
) -> dict[str, Any]:
    """Options of every mediator subscriber: a batch consumer in its own group
    (``<group_id>.<name>``), offsets left to `Offsets`, bodies left undecoded; `quiet`: off
    the workflows' path (see `QUIET_FETCH_WAIT_MS`)."""
    wait_ms = settings.fetch_max_wait_ms
    return {
        "group_id": group_name(settings, name),
        "batch": True,
        "max_records": settings.max_batch_records,
        "batch_timeout_ms": settings.poll_timeout_ms,
        "fetch_max_wait_ms": max(wait_ms, QUIET_FETCH_WAIT_MS) if quiet else wait_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "auto_offset_reset": "earliest",
        "ack_policy": AckPolicy.MANUAL,
        "decoder": undecoded,
    }


def subscribe(
    broker: KafkaBroker,
    topics: str | Sequence[str],
    settings: KafkaSettings,
    name: str,
    handler: Callable[..., Awaitable[None]],
    *,
    quiet: bool = False,
) -> None:
    """Subscribe `handler` to `topics` (one consumer) with `batch_subscription`'s
    options, its polls waiting for records instead of sleeping between them
    (`_waiting_poll`)."""
    names = (topics,) if isinstance(topics, str) else tuple(topics)
    subscriber = broker.subscriber(*names, **batch_subscription(settings, name, quiet=quiet))
    subscriber(handler)
    subscriber.get_msg = _waiting_poll(settings)


def _waiting_poll(
    settings: KafkaSettings,
) -> Callable[[AIOKafkaConsumer], Awaitable[tuple[ConsumerRecord[Any, Any], ...]]]:
    """A batch subscriber's poll that returns as soon as records are fetched, and else
    after `poll_timeout_ms`, ready to poll again.

    FastStream's own batch poll sleeps its timeout again after an empty poll: a record
    arriving then waits out the sleep, and a short timeout (to keep that wait short)
    spins the loop hundreds of times a second per subscriber while idle. This one only
    waits in the consumer, which wakes it when records arrive."""
    timeout_ms, max_records = settings.poll_timeout_ms, settings.max_batch_records

    async def get_msg(consumer: AIOKafkaConsumer) -> tuple[ConsumerRecord[Any, Any], ...]:
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return tuple(itertools.chain.from_iterable(batches.values()))

    return get_msg


#: A consumer's offsets are committed at most this often. Each batch's would be one
#: OffsetCommit request per batch, which at low load (small batches) the replica and the
#: broker pay for per record. What a crash leaves uncommitted is redelivered and recognised.
COMMIT_EVERY_S = 0.05


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


async def handle_batch(
    context: ContextRepo,
    process: Callable[[Sequence[Any]], Awaitable[None]],
    offsets: Offsets,
    boundary: Boundary,
) -> None:
    """Run `process` on the records of the batch being handled behind the error boundary;
    mark their offsets once every record ended applied or dead-lettered, rewind (nack)
    after a transient failure. Nothing is raised into FastStream.

    The batch comes from FastStream's `context`, not from a ``KafkaMessage`` parameter of
    the handler: fast-depends resolves such a parameter with a synchronous function,
    which it runs in a worker thread, a thread hop for every batch."""
    message: KafkaMessage = context.get_local("message")
    raw = message.raw_message
    records = raw if isinstance(raw, tuple) else (raw,)
    if await boundary.run(records, process):
        offsets.mark(message.consumer, records)
    else:
        await message.nack()
