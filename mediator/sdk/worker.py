"""Service SDK: run a Python service's actions as mediator steps.

A service registers one coroutine per action; the worker consumes the service's inbox
topic, runs each `CommandEvent`'s action and publishes a `ReplyEvent` to the command's
``reply_to`` topic::

    worker = Worker("inventory", "127.0.0.1:9092", instance="inventory-1")

    @worker.action("reserve")
    async def reserve(input: dict, command: CommandEvent) -> dict:
        return {"reserved": input["sku"]}

    await worker.run()  # until cancelled

Commands run concurrently, and fetching goes on while they do, so one slow command holds
up nothing else. Delivery is at-least-once: an offset is committed only once its reply and
those of every earlier command on its partition were acknowledged.

Execution is deduplicated on ``command_id`` (an LRU of recent replies),
so a redelivered command gets its reply again without the handler running twice. An action
registered with ``idempotent=True`` is also deduplicated on the command's
``idempotency_key``, which stays the same for every attempt, reroute and hand-on of one
step in one round of its run: a retry after a timeout, or the same step sent again after an
instance was taken for dead, gets the first attempt's reply (re-addressed to the new
attempt) instead of doing the work twice. Its ``ok`` replies and non-retryable errors are
remembered; a retryable error is not, so the next attempt runs again. The memory is this
instance's (an LRU of ``dedup_size``): for effect-once across instances and restarts, key
the work itself on ``command.idempotency_key`` in the service's own store, as payment APIs
take an idempotency key.

Commands are signed by the mediator and replies and heartbeats by the worker (see
`mediator.core.signing`), with the service's keys: ``keys=`` (a `Keyring` or
``"id=secret,id=secret"``, the first signing), else the environment variable
``MEDIATOR_SIGNING__KEYS`` (and ``MEDIATOR_SIGNING__CURRENT``). A command no key of the
service signed is never run: it is dead-lettered with the reason and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from aiokafka.errors import KafkaError

from mediator.core.signing import Keyring
from mediator.core.tasks import cancel_and_wait
from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection, new_consumer
from mediator.producers import DEFAULT_MAX_REQUEST_SIZE, new_producer
from mediator.sdk.actions import ActionError, Handler
from mediator.sdk.claims import Claims
from mediator.sdk.inflight import Queued
from mediator.sdk.intake import Intake
from mediator.sdk.keys import service_keyring
from mediator.sdk.offsets import OffsetTracker
from mediator.sdk.signals import on_sigterm
from mediator.sdk.tally import Tally
from mediator.sdk.tracing import tracing_active
from mediator.topic_limits import warn_of_small_topics
from topics.events import (
    HealthStatus,
)
from topics.names import Topics

__all__ = ["ActionError", "Handler", "Worker"]

log = logging.getLogger("mediator.worker")

#: How often, at most, a worker commits the offsets of the commands it has answered.
_COMMIT_INTERVAL_S = 0.05
STAT_NAMES = (
    "received",
    "executed",
    "duplicates",
    "errors",
    "invalid",
    "send_retries",
    "undeliverable",
    "heartbeats",
    "heartbeats_failed",
    "bad_signatures",
    "misdelivered",
    "expired",
)


#: Producer options a worker decides itself: its replies are bytes it builds, and the
#: record batches it builds go to the partition `partition_for` gives their key.
FIXED_PRODUCER_OPTIONS = frozenset({"key_serializer", "value_serializer", "partitioner"})


class Worker(Intake):
    """Consumes a service's commands, runs its actions and publishes their replies."""

    def __init__(
        self,
        service: str,
        bootstrap_servers: str | KafkaConnection,
        *,
        topics: Topics | None = None,
        instance: str | None = None,
        group_id: str | None = None,
        enable_idempotence: bool = True,
        concurrency: int = 64,
        dedup_size: int = 100_000,
        max_records: int = 500,
        max_in_flight: int | None = None,
        poll_timeout_ms: int = 200,
        stop_timeout: float = 10.0,
        heartbeat_interval: float | None = 1.0,
        weight: float = 1.0,
        version: str | None = None,
        keys: Keyring | str | None = None,
        signing: bool = True,
        legacy_signatures: bool = False,
        expiry_grace_ms: int | None = 60_000,
        consumer_options: Mapping[str, Any] | None = None,
        producer_options: Mapping[str, Any] | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.service = service
        self.claims = claims
        self.topics = topics or Topics()
        #: Random per start: this process's heartbeats are told from an earlier start's.
        self.boot = secrets.token_hex(4)
        self._seq = itertools.count()
        self.instance = instance or f"{service}-{socket.gethostname()}-{os.getpid()}-{self.boot}"
        self.group_id = group_id or f"{self.topics.service_prefix}{service}"
        #: Signs replies and heartbeats, checks commands; None: signing is off.
        self.keys = service_keyring(service, keys) if signing else None
        #: Also sign over the value alone and accept commands signed so (while the
        #: mediator and other services upgrade to signatures over topic, key and value).
        self.legacy_signatures = legacy_signatures
        #: A command is not run once this long past its `deadline_ms` (the mediator no
        #: longer waits for it: a late or replayed one). Generous, for clocks that differ;
        #: None runs every command whatever its deadline.
        self.expiry_grace_ms = expiry_grace_ms
        self.bootstrap_servers = bootstrap_servers
        self.enable_idempotence = enable_idempotence
        self.stop_timeout = stop_timeout
        self._consumer_options = dict(consumer_options or {})
        self._producer_options = dict(producer_options or {})
        if fixed := sorted(FIXED_PRODUCER_OPTIONS & self._producer_options.keys()):
            msg = (
                f"producer_options may not set {', '.join(fixed)}: the worker sends the bytes "
                "it builds, in record batches it places by the key as the mediator does"
            )
            raise ConfigurationError(msg)
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._actions: dict[str, tuple[Handler, bool]] = {}
        self._idempotent: set[str] = set()
        self._limit = asyncio.Semaphore(concurrency)
        self._dedup_size = dedup_size
        self._max_records = max_records
        # Records fetched but not yet answered; fetching pauses at this many.
        self._max_in_flight = max_in_flight or max(4 * concurrency, max_records)
        self._offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        #: Seconds between heartbeats on the health topic; None sends none (the mediator
        #: then reaches this service through its consumer group alone).
        self.heartbeat_interval = heartbeat_interval
        self.weight = weight
        self.version = version
        self.status = HealthStatus.UP
        self._capacity = concurrency
        self._tally = Tally()
        self._beats: asyncio.Task[None] | None = None
        self._poll_timeout_ms = poll_timeout_ms
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        #: Replies of idempotent actions by idempotency key (ok and non-retryable errors).
        self._by_key: OrderedDict[str, bytes] = OrderedDict()
        #: Idempotent work running now, by idempotency key: the command id doing it.
        self._keys_running: dict[str, str] = {}
        #: Commands whose action runs now, and a future for their reply once a duplicate
        #: waits for it.
        self._running: dict[str, asyncio.Future[bytes] | None] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._outgoing: list[Queued] = []
        self._flush_due = False
        self._submits: set[asyncio.Future[Any]] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, service: str, settings: Any = None, **options: Any) -> Worker:
        """A worker of `service` connected as `settings` say (default: `load_settings()`:
        ``MEDIATOR_*``, ``MEDIATOR_CONFIG``, or the settings of a ``mediator dev`` running
        from this directory): the brokers and how to reach them, the topic names, this
        service's signing keys. `options` override any constructor argument."""
        from mediator.settings import load_settings

        settings = settings or load_settings()
        kafka, signing = settings.kafka, settings.signing
        given: dict[str, Any] = {
            "topics": kafka.topics,
            "enable_idempotence": kafka.enable_idempotence,
            "keys": signing.for_service(service) if signing.enabled else None,
            "signing": signing.enabled,
            "legacy_signatures": signing.legacy_signatures,
            "consumer_options": kafka.consumer_options(),
        }
        return cls(service, kafka, **(given | options))

    async def start(self) -> None:
        """Connect to Kafka and start consuming the service's inbox."""
        if self._task is not None:
            return
        client_id = f"{self.service}.{self.instance}"
        producer = new_producer(
            self.bootstrap_servers,
            client_id=client_id,
            enable_idempotence=self.enable_idempotence,
            **({"linger_ms": 1} | self._producer_options),
        )
        consumer = new_consumer(
            self.bootstrap_servers,
            client_id=client_id,
            group_id=self.group_id,
            **(
                {"enable_auto_commit": False, "auto_offset_reset": "earliest"}
                | self._consumer_options
            ),
        )
        consumer.subscribe([self.topics.service(self.service)], listener=_Listener(self))
        try:
            await producer.start()
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        largest = self._producer_options.get("max_request_size", DEFAULT_MAX_REQUEST_SIZE)
        await warn_of_small_topics(
            self.bootstrap_servers,
            [self.topics.replies, self.topics.health],
            largest,
            "producer_options['max_request_size']",
        )
        self._task = asyncio.create_task(self._loop(), name=f"worker:{self.service}")
        if self.heartbeat_interval:
            self._beats = asyncio.create_task(self._heartbeats(), name=f"heartbeat:{self.service}")
        log.info("worker started", extra={"service": self.service, "instance": self.instance})

    async def stop(self) -> None:
        """Stop consuming, let in-flight commands finish (up to ``stop_timeout``), commit, close."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        if task.done() and not task.cancelled():
            task.exception()  # the loop logged it; run() re-raises it
        beats = self._beats
        if beats is not None:
            # Still heartbeating while in-flight commands finish, as draining: nothing new
            # is routed here, and nothing takes this instance for dead meanwhile.
            self.status = HealthStatus.DRAINING
            await self._beat()
        try:
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=self.stop_timeout)
                if pending:
                    log.warning("worker stop: %d commands did not finish in time", len(pending))
                    await asyncio.gather(*(cancel_and_wait(t) for t in pending))
            # Replies queued by the commands that finished go to the producer first.
            self._flush()
            if self._submits:
                _, late = await asyncio.wait(set(self._submits), timeout=self.stop_timeout)
                for submit in late:  # not committed: consumed again later
                    submit.cancel()
            if self._producer is not None:
                # Replies handed to the producer are delivered before the last commit.
                with contextlib.suppress(TimeoutError, KafkaError):
                    await asyncio.wait_for(self._producer.flush(), self.stop_timeout)
            if self._consumer is not None:
                await self._commit(self._consumer.assignment())
            if beats is not None:
                self._beats = None
                # An out-of-turn heartbeat still in flight must not land after `down`.
                stopping = [beats, *self._side_tasks]
                await asyncio.gather(*(cancel_and_wait(t) for t in stopping))
                await self._beat(HealthStatus.DOWN)  # left cleanly: not a death to detect
        finally:
            assert self._consumer is not None and self._producer is not None
            try:
                await self._consumer.stop()
            finally:
                await self._producer.stop()
            log.info("worker stopped", extra={"service": self.service, "instance": self.instance})

    async def run(self, *, drain_on_sigterm: bool = True) -> None:
        """Start, serve until cancelled, SIGTERM (with `drain_on_sigterm`) or the loop
        failing, then stop cleanly: announce ``draining``, finish the commands in flight,
        commit, leave the group, announce ``down``."""
        await self.start()
        task = self._task
        assert task is not None
        # One handler for every worker of the process: one SIGTERM drains them all.
        forget = on_sigterm(task.cancel) if drain_on_sigterm else None
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            log.info("worker %s draining on SIGTERM", self.instance)
        finally:
            if forget is not None:
                forget()
            await self.stop()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _loop(self) -> None:
        """Fetch while commands run: a slow command holds up neither the others nor the
        fetching of more, up to ``max_in_flight`` records outstanding."""
        assert self._consumer is not None
        consumer = self._consumer
        last_commit = 0.0
        try:
            while True:
                room = self._max_in_flight - len(self._offsets)
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                batch = await consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=min(self._max_records, room)
                )
                tracing = tracing_active()
                for tp, records in batch.items():
                    for record in records:
                        self._offsets.add(tp, record.offset)
                        self._take(tp, record, tracing)
                # Each commit is a round trip to the broker: at most one per interval.
                now = time.monotonic()
                if now - last_commit >= _COMMIT_INTERVAL_S:
                    last_commit = now
                    await self._commit(consumer.assignment())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker loop failed", extra={"service": self.service})
            raise


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits a worker's finished offsets on partitions it is about to lose."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # Announce the new partitions now: the mediator routes by them.
        self._worker._beat_soon()
