"""The outbox: messages committed with a transition, published to Kafka at least once.

A transition's commands and result are written to Redis in the same script as the state
(see `Store.commit_many`), each under a lease. The replica that committed publishes them
at once and deletes them when Kafka acknowledges; if it dies first, the lease expires and
any replica's sweeper claims and re-sends them. Consumers deduplicate by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from mediator.codec import now_ms
from mediator.errors import StateUnavailable
from mediator.store import Store

__all__ = ["Dispatcher", "Message", "frame", "unframe"]

log = logging.getLogger("mediator.outbox")


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message waiting in the outbox of `shard` under `id`."""

    shard: int
    id: str
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def frame(self) -> bytes:
        """How it is stored in Redis."""
        return frame(self.topic, self.key, self.value, self.headers)


def frame(
    topic: str, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]
) -> bytes:
    """One line of JSON (topic, key, headers) followed by the raw value."""
    head = orjson.dumps(
        [topic, key.decode() if key is not None else None, [[k, v.decode()] for k, v in headers]]
    )
    return head + b"\n" + value


def unframe(shard: int, message_id: str, data: bytes) -> Message:
    """The `Message` stored as `data`."""
    head, _, value = data.partition(b"\n")
    topic, key, headers = orjson.loads(head)
    return Message(
        shard=shard,
        id=message_id,
        topic=topic,
        key=key.encode() if key is not None else None,
        value=value,
        headers=[(k, v.encode()) for k, v in headers],
    )


class Dispatcher:
    """Publishes outbox messages and clears them once Kafka has them; sweeps leftovers."""

    def __init__(
        self,
        store: Store,
        producer: AIOKafkaProducer,
        *,
        sweep_interval_ms: int = 1000,
        sweep_batch: int = 500,
    ) -> None:
        self.store = store
        self.producer = producer
        self.sweep_interval_ms = sweep_interval_ms
        self.sweep_batch = sweep_batch
        self.published = 0
        self.swept = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the sweeper."""
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="outbox-sweeper")

    async def stop(self) -> None:
        """Stop sweeping and wait for publishes in flight (bounded)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._pending:
            await asyncio.wait(self._pending, timeout=10)

    async def send(self, messages: Sequence[Message]) -> None:
        """Hand `messages` to the producer now; clear them from Redis once acknowledged.

        Returns as soon as the producer holds them. Backpressure: if too many batches are
        still unacknowledged, waits for the oldest first.
        """
        if not messages:
            return
        futures = [
            await self.producer.send(m.topic, m.value, key=m.key, headers=m.headers)
            for m in messages
        ]
        task = asyncio.create_task(self._settle(messages, futures))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if len(self._pending) > 64:
            await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)

    async def send_now(self, messages: Sequence[Message]) -> None:
        """Publish messages that are not in the outbox and wait until Kafka has them all.

        Raises `KafkaError` if any failed, so the caller does not commit its offsets.
        """
        if not messages:
            return
        futures = [
            await self.producer.send(m.topic, m.value, key=m.key, headers=m.headers)
            for m in messages
        ]
        await asyncio.gather(*futures)
        self.published += len(messages)

    async def _settle(
        self, messages: Sequence[Message], futures: list[asyncio.Future[object]]
    ) -> None:
        results = await asyncio.gather(*futures, return_exceptions=True)
        done = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                # Left in the outbox: the sweeper re-sends it when the lease runs out.
                log.warning("publish to %s failed, will retry: %s", message.topic, result)
            elif message.shard >= 0:  # shard -1: sent directly, never stored
                done.append((message.shard, message.id))
        self.published += sum(1 for r in results if not isinstance(r, BaseException))
        try:
            await self.store.outbox_done(done)
        except StateUnavailable as exc:
            log.warning(
                "could not clear %d outbox entries (they will be re-sent): %s", len(done), exc
            )

    async def sweep_once(self) -> int:
        """Re-send every outbox entry whose lease expired; returns how many."""
        total = 0
        for shard in range(self.store.keys.shards):
            claimed = await self.store.claim_expired(shard, now_ms(), self.sweep_batch)
            if claimed:
                messages = [unframe(shard, mid, data) for mid, data in claimed]
                log.info("re-sending %d outbox messages of shard %d", len(messages), shard)
                await self.send(messages)
                total += len(messages)
        self.swept += total
        return total

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_ms / 1000)
            try:
                await self.sweep_once()
            except (StateUnavailable, KafkaError) as exc:
                log.warning("outbox sweep failed, retrying: %s", exc)
