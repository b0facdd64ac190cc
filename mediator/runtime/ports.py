"""The ports the runtime layer talks through: what it needs of Kafka and of Redis.

`Runtime` and `Dispatcher` depend on these Protocols, not on aiokafka or redis-py (the
batch boundary takes plain callables), so their failure paths can be driven by small fakes
in fast tests as well as by the real broker and Redis in the integration tests.
`AIOKafkaProducer`, `Store` and `Dispatcher` satisfy them as they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from mediator.storage.keys import Keys

if TYPE_CHECKING:
    from mediator.core.state import WorkflowState
    from mediator.runtime.messages import Message
    from mediator.storage.store import Claimed, Commit, CommitResult

__all__ = ["BatchBuilder", "BatchingProducer", "OutboxStore", "Producer", "Publisher", "StateStore"]


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

    async def partitions_for(self, topic: str) -> set[int]:
        """The partitions `topic` has (from the cluster's metadata)."""
        ...


class BatchBuilder(Protocol):
    """A record batch its caller fills (aiokafka's `BatchBuilder`)."""

    def append(
        self,
        *,
        timestamp: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> object | None:
        """Add one record; None if the batch is full (its first record always fits)."""
        ...

    def close(self) -> None:
        """Take no more records: those the producer's `send` would add included."""
        ...


class BatchingProducer(Producer, Protocol):
    """A producer that also takes record batches its caller built (aiokafka's does): the
    outbox hands it the transition stream's records that way, a third of a `send`'s CPU
    per record."""

    def create_batch(self) -> BatchBuilder:
        """An empty batch."""
        ...

    async def send_batch(
        self, batch: BatchBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[object]:
        """Queue `batch` for `partition` of `topic` once the partition's batch before it
        went out; the future resolves when the broker acknowledged the whole batch."""
        ...


class Renewable(Protocol):
    """A producer that can be made again (`mediator.producers.DeferredProducer`): a new
    client, with a new producer id, in the old one's place."""

    async def renew(self) -> None:
        """Start a new client, put it in place, then close the old one."""
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


class StateStore(Protocol):
    """The part of the Redis store the runtime uses (`mediator.storage.store.Store`)."""

    keys: Keys
    #: Entries kept in each run's audit log; 0: commits carry no audit entries.
    audit_limit: int

    async def load_many(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowState | None]:
        """The stored state of each workflow, None where there is none."""
        ...

    async def commit_many(self, commits: Sequence[Commit], now_ms: int) -> list[CommitResult]:
        """Commit transitions atomically, each under its revision check."""
        ...

    async def count(self, deltas: dict[str, int]) -> None:
        """Add to the deployment-wide counters."""
        ...

    async def control_outcomes(self, outcomes: Mapping[str, tuple[bool, str]], now_ms: int) -> None:
        """Record what became of operators' controls (the first outcome of each stays)."""
        ...

    #: After `claim_timers`: for each shard it polled, in how many ms the earliest timer
    #: left there falls due (None: none left).
    timer_waits: dict[int, int | None]
    #: After `claim_timers`: the shards whose claim failed, with the error (nothing of
    #: theirs was claimed; the other shards' timers were).
    timer_failures: dict[int, Exception]

    async def claim_timers(
        self, limit: int, lease_ms: int, shards: Sequence[int] | None = None
    ) -> dict[int, list[Claimed]]:
        """Claim the timers that fell due in `shards` (default: all), per shard, with how
        late each is (ms)."""
        ...

    async def timers_done(self, done: Sequence[tuple[int, Claimed]]) -> None:
        """Remove timers that fired and changed nothing (unless re-armed since)."""
        ...

    async def park_timer(self, shard: int, timer: Claimed, reason: str, now_ms: int) -> bool:
        """Set aside a timer that cannot be applied, with the reason."""
        ...

    async def reroute_instance(self, prefix: str, batch: int = 1000) -> int:
        """Turn the attempts in flight on one instance into reroute timers due now."""
        ...


class Publisher(Protocol):
    """What the runtime hands messages to (`mediator.runtime.outbox.Dispatcher`)."""

    async def send(self, messages: Sequence[Message], since: float | None = None) -> None:
        """Publish outbox messages; failures are sorted per message, never raised."""
        ...

    async def send_now(self, messages: Sequence[Message]) -> None:
        """Publish direct messages and wait; raises on a transient failure."""
        ...
