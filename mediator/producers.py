"""Kafka producers of the project: one way to build, start and partition them."""

from __future__ import annotations

import asyncio
import random
import traceback
import zlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    UnknownProducerId,
)

from mediator.errors import IdempotenceUnsupported
from mediator.kafka import KafkaConnection, as_connection, client_options

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "DeferredProducer",
    "fits_a_batch",
    "idempotence_refused",
    "new_producer",
    "partition_for",
    "start_producer",
]


def partition_for(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """Partitioner for every producer of the project: CRC32 of the key.

    aiokafka's default hashes keys with a pure-Python murmur2, a measurable share of a
    busy mediator's CPU. Any stable hash keeps a key's messages in order; which partition
    a key maps to is not part of the contract.
    """
    if key is None:
        return random.choice(list(available or all_partitions))
    return all_partitions[zlib.crc32(key) % len(all_partitions)]


#: aiokafka keeps one batch per partition open and, once it is full, makes every further
#: send to that partition wait for it to be acknowledged; its default (16 KiB, about 40
#: small events) made hundreds of concurrent sends queue behind one broker round trip.
#: Kept well under a broker's default message.max.bytes (1 MiB).
MAX_BATCH_BYTES = 512 * 1024


#: Failures that say an idempotent producer's sequence numbers are out of step with the
#: broker's: only a new producer (a new producer id) gets past them.
OUT_OF_STEP = (OutOfOrderSequenceNumber, UnknownProducerId)

#: How long `DeferredProducer.renew` lets a new producer take to start.
RENEW_START_S = 30.0

#: aiokafka's default `max_request_size`.
DEFAULT_MAX_REQUEST_SIZE = 1_048_576
#: Room for a record's framing and its batch's header within `max_request_size`.
_FRAMING_BYTES = 512


def fits_a_batch(size: int, max_request_size: int) -> bool:
    """Whether a record of `size` bytes (key, value and headers) may go in a record batch
    its sender builds: the producer checks a record against its `max_request_size` only
    when it is given by `send`, so one near the limit goes that way, where a record over
    it is refused at once, as the producer would refuse it."""
    return size + _FRAMING_BYTES <= max_request_size


def new_producer(
    kafka: str | KafkaConnection,
    *,
    client_id: str,
    enable_idempotence: bool,
    linger_ms: int = 1,
    **options: Any,
) -> AIOKafkaProducer:
    """A producer as every part of the project uses one: acks from all in-sync replicas,
    CRC32 partitioning, a short linger, batches of up to `MAX_BATCH_BYTES` and never over
    `max_request_size` (so that bounds every batch the broker is sent, not only each
    record), the connection's transport security; `options` go to aiokafka as they are."""
    batch_bytes = min(MAX_BATCH_BYTES, options.get("max_request_size", MAX_BATCH_BYTES))
    return AIOKafkaProducer(
        **client_options(kafka),
        client_id=client_id,
        acks="all",
        enable_idempotence=enable_idempotence,
        partitioner=partition_for,
        linger_ms=linger_ms,
        **({"max_batch_size": batch_bytes} | options),
    )


class DeferredProducer:
    """A `new_producer` built when it is started, not before: aiokafka builds a producer
    only inside a running event loop, and an application must be importable outside one
    (``faststream run`` and ``faststream docs gen`` import it first). Everything else is
    the started producer's."""

    def __init__(self, kafka: str | KafkaConnection, **options: Any) -> None:
        self._kafka = kafka
        self._options = options
        self._producer: AIOKafkaProducer | None = None
        #: Producers put aside by `renew`, while they stop (flush); `stop` waits for them.
        self._retiring: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            msg = "the producer is not started"
            raise RuntimeError(msg)
        return self._producer

    async def start(self) -> None:
        self._stopped = False
        if self._producer is None:
            self._producer = new_producer(self._kafka, **self._options)
        await self._producer.start()

    async def stop(self) -> None:
        self._stopped = True
        if self._producer is not None:
            await self._producer.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def renew(self) -> None:
        """Put a new, started producer in place of the current one, then close the old
        (`_retire`: what it holds is flushed, each record getting its real outcome, and
        what it never took fails as closed, which the outbox retries). A new producer
        gets a new producer id, so its sequence numbers start again in step with the
        broker's. Nothing once stopped; the old producer is closed even if the caller
        is cancelled meanwhile (`stop` waits for it)."""
        if self._stopped:
            return
        fresh = new_producer(self._kafka, **self._options)
        try:
            # Bounded: an idempotent producer's start waits for its producer id for ever.
            async with asyncio.timeout(RENEW_START_S):
                await fresh.start()
        except BaseException:
            await asyncio.shield(fresh.stop())
            raise
        if self._stopped:  # stopped while the new one started
            await fresh.stop()
            return
        old, self._producer = self._producer, fresh
        if old is not None:
            # Not cancelled with the caller: `stop` waits for it.
            task = asyncio.create_task(_retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            await asyncio.shield(task)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        return await self.producer.send(topic, value, key, partition, timestamp_ms, headers=headers)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define (client, partitions_for, ...).
        return getattr(self.producer, name)


async def _retire(old: AIOKafkaProducer) -> None:
    """Stop a producer `renew` put aside. aiokafka's `add_batch` takes a batch after the
    producer began to close (it does not look again once it waited for the partition's
    batch before): one its sender did not take before it stopped would never be settled,
    so it is failed (transient: the outbox sends it again)."""
    await old.stop()
    accumulator = getattr(old, "_message_accumulator", None)
    if accumulator is not None:
        accumulator.fail_all(ProducerClosed())


# aiokafka.producer.sender: Sender._maybe_wait_for_pid -> _do_init_pid -> InitPIDHandler.
_INIT_PID_FRAMES = frozenset({"_maybe_wait_for_pid", "_do_init_pid"})


def idempotence_refused(exc: BaseException) -> bool:
    """Whether `exc` is a broker's answer to aiokafka's InitProducerId request.

    aiokafka raises the broker's error code as is (Tansu answers UnknownError), so the only
    sign of where it came from is the traceback: the producer-id handshake that an
    idempotent producer does on start.
    """
    current: BaseException | None = exc
    for _ in range(10):  # the error itself, or what a wrapper raised it from
        if current is None:
            break
        if isinstance(current, BrokerResponseError) and any(
            frame.f_code.co_name in _INIT_PID_FRAMES
            for frame, _ in traceback.walk_tb(current.__traceback__)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


async def start_producer(
    producer: AIOKafkaProducer, kafka: str | KafkaConnection, enable_idempotence: bool
) -> None:
    """Start `producer`; a broker refusing its idempotence raises `IdempotenceUnsupported`."""
    try:
        await producer.start()
    except KafkaError as exc:
        if enable_idempotence and idempotence_refused(exc):
            raise IdempotenceUnsupported(as_connection(kafka).bootstrap_servers, exc) from exc
        raise
