"""Bring back what Redis lost: runs it forgot, and runs it rolled back (``mediator
recover``).

When Redis comes back empty after a restart, or a failover loses its latest writes, the
workflows that were in flight are gone, while their requests are still on the requests
topic. `recover` reads that topic from a point in time to a fixed end (the end of every
partition when it starts, or ``until``), and for each request whose run Redis has no trace
of (neither the workflow hash nor its tombstone) publishes the original record again
(same key, value and headers), so a mediator starts the run afresh.

A failover that loses only the latest writes leaves runs at an older revision instead:
waiting for a reply that already came, was applied and was committed to the Kafka offsets,
and will not come again. Then it reads the replies topic over the same window and
publishes again each reply a live run is still waiting for (`mediator.ops.redrive`), so
the run moves on from where Redis left it.

Runs Redis still has are left alone, so running it twice is harmless, with one window:
a request re-published but not consumed by a mediator yet has no hash, so a second run in
that window publishes it once more. Requests are idempotent by ``request_id``, so the
mediator starts the run once all the same; wait until the mediators have caught up on
the requests topic before a second run to avoid the extra copies.

Reach back no further than Redis keeps tombstones: a run that finished and whose
tombstone expired looks the same as one that was lost, and would be run again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError
from redis.asyncio import Redis

from mediator import clock
from mediator.errors import RecoverError, StateUnavailable
from mediator.kafka import new_consumer
from mediator.ops.redrive import Redrive, publish
from mediator.ops.status import stored_keys
from mediator.ops.window import parse_time, read_window, window
from mediator.producers import new_producer, start_producer
from mediator.settings import Settings
from mediator.storage.connection import connect_to
from mediator.storage.errors import REDIS_ERRORS
from mediator.storage.keys import Keys, workflow_id_for
from topics.events import RequestEvent

__all__ = ["RecoverReport", "RequestScan", "parse_time", "recover"]


@dataclass(slots=True)
class RecoverReport:
    """What one recovery found and did.

    ``missing`` counts the requests whose run Redis did not have: all were re-published,
    unless ``dry_run``. ``repeated`` counts further records of a request already found
    missing (one copy is enough). ``unknown_workflow`` counts requests for workflows that
    are not loaded, when the caller named the loaded ones: a mediator would only reject
    them again. ``replies_awaited`` counts the replies a live run was still waiting for
    (re-published as ``replies_republished`` unless ``dry_run``), of ``replies_scanned``.
    """

    topic: str
    since_ms: int
    until_ms: int | None
    partitions: int
    dry_run: bool
    scanned: int = 0
    present: int = 0
    missing: int = 0
    republished: int = 0
    repeated: int = 0
    unknown_workflow: int = 0
    undecodable: int = 0
    replies_scanned: int = 0
    replies_awaited: int = 0
    replies_republished: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        return asdict(self)


async def recover(
    settings: Settings,
    *,
    since_ms: int,
    until_ms: int | None = None,
    dry_run: bool = False,
    workflows: Collection[str] | None = None,
    timeout_s: float = 30.0,
) -> RecoverReport:
    """Re-publish every request in ``[since_ms, until_ms)`` whose run Redis does not have,
    then every reply in that window that a live run still waits for.

    The window ends at ``until_ms``, or at the end of each partition when the call starts,
    so records published meanwhile (the re-published ones included) are not read. With
    ``workflows``, requests naming another workflow are counted, not re-published. Every
    wait on Kafka or Redis gives up after ``timeout_s`` (Redis: its socket timeout).
    """
    if since_ms > clock.now_ms():
        msg = "the start of the window is in the future; nothing was published after it"
        raise RecoverError(msg)
    if until_ms is not None and until_ms <= since_ms:
        msg = "the end of the window is not after its start; give an --until after --since"
        raise RecoverError(msg)
    kafka = settings.kafka
    redis = connect_to(settings.redis)
    producer = None
    if not dry_run:
        producer = new_producer(
            kafka,
            client_id=f"{kafka.client_id}-recover",
            enable_idempotence=kafka.enable_idempotence,
            linger_ms=kafka.linger_ms,
            max_request_size=settings.limits.max_message_bytes,
        )
    try:
        keys = await stored_keys(redis, settings.redis.key_prefix, settings.redis.shards)
        if producer is not None:
            async with asyncio.timeout(timeout_s):
                await start_producer(producer, kafka, kafka.enable_idempotence)
        async with _reader(settings, timeout_s) as consumer:
            async with asyncio.timeout(timeout_s):
                span = await window(consumer, kafka.topics.requests, since_ms, until_ms)
            report = RecoverReport(
                topic=kafka.topics.requests,
                since_ms=since_ms,
                until_ms=until_ms,
                partitions=len(span),
                dry_run=dry_run,
            )
            scan = RequestScan(report, redis, keys, producer, workflows, timeout_s)
            await read_window(consumer, span, scan.handle, timeout_s)
        # A consumer of its own: one assigned to a topic's partitions keeps no metadata of
        # the other topic's.
        redrive = Redrive(redis, keys, producer, kafka.topics.replies, timeout_s)
        async with _reader(settings, timeout_s) as consumer:
            async with asyncio.timeout(timeout_s):
                span = await window(consumer, kafka.topics.replies, since_ms, until_ms)
            await read_window(consumer, span, redrive.handle, timeout_s)
        report.replies_scanned = redrive.scanned
        report.replies_awaited = redrive.awaited
        report.replies_republished = redrive.republished
        return report
    except TimeoutError as exc:
        msg = f"Kafka did not answer within {timeout_s:g}s; check kafka.bootstrap_servers"
        raise RecoverError(msg) from exc
    finally:
        try:
            if producer is not None:
                await producer.stop()
        finally:
            await redis.aclose()


@contextlib.asynccontextmanager
async def _reader(settings: Settings, timeout_s: float) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer outside any group, started (within `timeout_s`) and stopped."""
    kafka = settings.kafka
    consumer = new_consumer(
        kafka,
        client_id=f"{kafka.client_id}-recover",
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
        yield consumer
    finally:
        await consumer.stop()


class RequestScan:
    """One pass over the window: decode, look up in Redis per batch, re-publish the missing."""

    def __init__(
        self,
        report: RecoverReport,
        redis: Redis,
        keys: Keys,
        producer: AIOKafkaProducer | None,
        workflows: Collection[str] | None,
        timeout_s: float,
    ) -> None:
        self.report = report
        self.redis = redis
        self.keys = keys
        self.producer = producer
        self.workflows = workflows
        self.timeout_s = timeout_s
        # Workflow ids found missing in this pass; a later copy of the request is skipped.
        self.missing: set[str] = set()

    async def handle(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Count one batch and re-publish its requests that Redis does not know."""
        report = self.report
        candidates: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
        for record in records:
            report.scanned += 1
            try:
                request = RequestEvent.model_validate_json(record.value or b"")
            except ValidationError:
                report.undecodable += 1
                continue
            if self.workflows is not None and request.workflow not in self.workflows:
                report.unknown_workflow += 1
                continue
            candidates.append((record, workflow_id_for(request.request_id)))
        known = await self._known([wid for _, wid in candidates])
        lost: list[ConsumerRecord[bytes, bytes]] = []
        for (record, wid), present in zip(candidates, known, strict=True):
            if present:
                report.present += 1
            elif wid in self.missing:
                report.repeated += 1
            else:
                self.missing.add(wid)
                report.missing += 1
                lost.append(record)
        if lost and self.producer is not None:
            await publish(self.producer, report.topic, lost, self.timeout_s)
            report.republished += len(lost)

    async def _known(self, workflow_ids: Sequence[str]) -> list[bool]:
        if not workflow_ids:
            return []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for wid in workflow_ids:
                    # Both keys carry the workflow's shard tag: one slot, fine on a cluster.
                    pipe.exists(self.keys.workflow(wid), self.keys.tombstone(wid))
                counts = await pipe.execute()
        except REDIS_ERRORS as exc:
            msg = f"Redis unavailable while checking which runs it has: {exc}"
            raise StateUnavailable(msg) from exc
        return [int(n) > 0 for n in counts]
