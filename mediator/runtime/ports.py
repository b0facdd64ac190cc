"""The ports the runtime layer talks through: what it needs of Kafka and of Redis.

`Runtime`, `Dispatcher` and the batch boundary depend on these Protocols, not on aiokafka
or redis-py, so their failure paths can be driven by small fakes in fast tests as well as
by the real broker and Redis in the integration tests. `AIOKafkaProducer` and `Store`
satisfy them as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from mediator.storage.keys import Keys

__all__ = ["OutboxStore", "Producer"]


class Producer(Protocol):
    """The part of a Kafka producer the outbox uses (aiokafka's `AIOKafkaProducer`)."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        """Queue one record; the future resolves when the broker acknowledged it."""
        ...


class OutboxStore(Protocol):
    """The part of the Redis store the outbox uses (`mediator.store.Store`)."""

    keys: Keys
    lease_ms: int

    async def outbox_done(self, entries: Sequence[tuple[int, str]]) -> None:
        """Forget entries Kafka acknowledged (or that were dead-lettered)."""
        ...

    async def claim_expired(self, shard: int, limit: int) -> tuple[int, list[tuple[str, bytes]]]:
        """Take over entries whose lease ran out; the new lease deadline and the entries."""
        ...

    async def renew(
        self, shard: int, held: Sequence[tuple[str, int]], *, delay_ms: int | None = None
    ) -> tuple[int, list[bool]]:
        """Which entries this replica still holds; renew or re-schedule those."""
        ...
