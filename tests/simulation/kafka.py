"""A model of Kafka as the mediator sees it: partitioned logs, consumer groups with
positions and committed offsets, and a producer.

It keeps what the mediator relies on and nothing more: records stay in order per
partition and are never lost; a consumer reads from its position; only committed offsets
survive a rebalance or a crash, so what was read but not committed is read again
(redelivery); a rewind reads again what was committed too. The scheduler decides when any
of this happens.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.helpers import FakeBatch

__all__ = ["Group", "Log", "SimProducer", "SimRecord"]


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One record, shaped like aiokafka's `ConsumerRecord` where the runtime reads it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp: int


class Log:
    """Every topic's partitions."""

    def __init__(self, partitions: Callable[[str], int], now: Callable[[], int]) -> None:
        self._partitions = partitions
        self._now = now
        self.topics: dict[str, list[list[SimRecord]]] = {}

    def partitions(self, topic: str) -> int:
        return len(self._topic(topic))

    def _topic(self, topic: str) -> list[list[SimRecord]]:
        parts = self.topics.get(topic)
        if parts is None:
            parts = self.topics[topic] = [[] for _ in range(self._partitions(topic))]
        return parts

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> SimRecord:
        parts = self._topic(topic)
        if partition is None:
            partition = zlib.crc32(key or b"") % len(parts)
        log = parts[partition]
        record = SimRecord(
            topic, partition, len(log), key, value, tuple(headers or ()), self._now()
        )
        log.append(record)
        return record

    def read(self, topic: str, partition: int, offset: int, limit: int) -> list[SimRecord]:
        return self._topic(topic)[partition][offset : offset + limit]

    def end(self, topic: str, partition: int) -> int:
        return len(self._topic(topic)[partition])

    def records(self, topic: str) -> list[SimRecord]:
        return [r for part in self._topic(topic) for r in part]


@dataclass
class Group:
    """One consumer group over some topics: who owns each partition, where it reads and
    what it committed."""

    log: Log
    topics: tuple[str, ...]
    owner: dict[tuple[str, int], str] = field(default_factory=dict)
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)

    def partitions(self) -> list[tuple[str, int]]:
        return [(t, p) for t in self.topics for p in range(self.log.partitions(t))]

    def assign(self, members: Sequence[str]) -> None:
        """A rebalance: partitions dealt round-robin to `members`; everyone reads on from
        the committed offsets (what was read and not committed is read again)."""
        self.owner.clear()
        for index, tp in enumerate(self.partitions()):
            if members:
                self.owner[tp] = members[index % len(members)]
            self.position[tp] = self.committed.get(tp, 0)

    def owned(self, member: str) -> list[tuple[str, int]]:
        return [tp for tp in self.partitions() if self.owner.get(tp) == member]

    def backlog(self, member: str) -> list[tuple[str, int]]:
        """The partitions `member` owns with records it has not read."""
        return [tp for tp in self.owned(member) if self.position.get(tp, 0) < self.log.end(*tp)]

    def fetch(self, member: str, limit: int) -> list[SimRecord]:
        records: list[SimRecord] = []
        for topic, partition in self.backlog(member):
            records += self.log.read(topic, partition, self.position.get((topic, partition), 0),
                                     limit - len(records))  # fmt: skip
            if len(records) >= limit:
                break
        return records

    def advance(self, records: Sequence[SimRecord]) -> None:
        """`records` were processed: read on past them."""
        for record in records:
            tp = (record.topic, record.partition)
            self.position[tp] = max(self.position.get(tp, 0), record.offset + 1)

    def commit(self, member: str) -> None:
        for tp in self.owned(member):
            self.committed[tp] = self.position.get(tp, 0)

    def rewind(self, tp: tuple[str, int], to: int) -> None:
        self.position[tp] = max(0, min(to, self.position.get(tp, 0)))


#: Bytes of values a batch of the simulated producer holds: two or three events.
BATCH_BYTES = 600


class SimProducer:
    """The outbox's producer port: waits at its owner's gate (a replica can stall there,
    between committing and publishing), then appends, a record or a batch of them. Like
    aiokafka, it refuses a partition the topic does not have with an `AssertionError`.
    Batches hold few records (`BATCH_BYTES` of values), so that an entry of the
    transition stream often spans several."""

    def __init__(self, log: Log, gate: Callable[[str], Any]) -> None:
        self.log = log
        self._gate = gate

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.log.partitions(topic)))

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        await self._gate("publish")
        if partition is not None:
            assert 0 <= partition < self.log.partitions(topic), "Unrecognized partition"
        record = self.log.append(topic, value, key, partition, headers or ())
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(record)
        return done

    def create_batch(self) -> FakeBatch:
        return FakeBatch(limit=BATCH_BYTES)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[object]:
        await self._gate("publish")
        assert 0 <= partition < self.log.partitions(topic), "Unrecognized partition"
        for key, value, headers in batch.records:
            self.log.append(topic, value, key, partition, headers)
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done
