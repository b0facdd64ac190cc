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
import functools
import inspect
import itertools
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import orjson
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from mediator import clock, codec
from mediator.core.signing import Keyring, SignatureError, parse_keys
from mediator.core.tasks import cancel_and_wait
from mediator.errors import ConfigurationError, MediatorError
from mediator.kafka import KafkaConnection, new_consumer
from mediator.producers import new_producer
from mediator.sdk.heartbeat import Tally
from mediator.sdk.offsets import OffsetTracker
from mediator.sdk.tracing import action_span, tracing_active
from topics.events import (
    SCHEMA_VERSION,
    TOPIC_NAME,
    CommandEvent,
    ErrorInfo,
    HealthEvent,
    HealthStatus,
    ReplyEvent,
    ReplyStatus,
)
from topics.headers import headers_for
from topics.names import Topics

__all__ = ["ActionError", "Handler", "Worker"]

log = logging.getLogger("mediator.worker")

Handler = Callable[..., Any]
"""An action: ``(input)`` or ``(input, command)``, returning the step's output (any JSON)."""
H = TypeVar("H", bound=Handler)

_TOPIC_NAME = re.compile(TOPIC_NAME)
_UNTRACED = contextlib.nullcontext()
#: How often, at most, a worker commits the offsets of the commands it has answered.
_COMMIT_INTERVAL_S = 0.05
STAT_NAMES = (
    "received", "executed", "duplicates", "errors", "invalid", "send_retries", "undeliverable",
    "heartbeats", "heartbeats_failed", "bad_signatures", "misdelivered", "expired",
)  # fmt: skip
#: Where a worker not given ``keys=`` finds them (the mediator's shared-keys setting).
KEYS_ENV, CURRENT_ENV = "MEDIATOR_SIGNING__KEYS", "MEDIATOR_SIGNING__CURRENT"


class ActionError(MediatorError):
    """Raised by a handler to fail its step with a chosen code and retry policy."""

    def __init__(self, message: str, *, code: str = "error", retryable: bool = False) -> None:
        self.message, self.code, self.retryable = message, code, retryable
        super().__init__(f"{code}: {message}")


class Worker:
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
    ) -> None:
        self.service = service
        self.topics = topics or Topics()
        #: Random per start: this process's heartbeats are told from an earlier start's.
        self.boot = secrets.token_hex(4)
        self._seq = itertools.count()
        self.instance = instance or f"{service}-{socket.gethostname()}-{os.getpid()}-{self.boot}"
        self.group_id = group_id or f"{self.topics.service_prefix}{service}"
        #: Signs replies and heartbeats, checks commands; None: signing is off.
        self.keys = _keyring(service, keys) if signing else None
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
        self._task: asyncio.Task[None] | None = None

    def action(self, name: str, *, idempotent: bool = False) -> Callable[[H], H]:
        """Decorator registering ``fn`` as the handler of action ``name``; with
        `idempotent`, its work is done once per idempotency key (see the module)."""

        def register(fn: H) -> H:
            self.add_action(name, fn, idempotent=idempotent)
            return fn

        return register

    def add_action(self, name: str, fn: Handler, *, idempotent: bool = False) -> None:
        """Register ``fn`` as the handler of ``name``: ``(input)`` or ``(input, command)``;
        with `idempotent`, deduplicated on the command's idempotency key too."""
        if name in self._actions:
            msg = f"action {name!r} of service {self.service!r} is already registered"
            raise ValueError(msg)
        self._actions[name] = (fn, _wants_command(fn, name))
        if idempotent:
            self._idempotent.add(name)

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
            **({"enable_auto_commit": False, "auto_offset_reset": "earliest"}
               | self._consumer_options),
        )  # fmt: skip
        consumer.subscribe([self.topics.service(self.service)], listener=_Listener(self))
        try:
            await producer.start()
            await consumer.start()
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
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
        loop = asyncio.get_running_loop()
        handled = False
        if drain_on_sigterm:
            try:
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
                handled = True
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals on this platform
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            log.info("worker %s draining on SIGTERM", self.instance)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGTERM)
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

    @property
    def in_flight(self) -> int:
        """Commands whose actions are running now."""
        return len(self._running)

    def health(self, status: HealthStatus | None = None) -> HealthEvent:
        """This instance's heartbeat now (taking the figures since the previous one)."""
        answered, errors, latency = self._tally.take()
        inbox = self.topics.service(self.service)
        owned = self._consumer.assignment() if self._consumer is not None else set()
        return HealthEvent(
            service=self.service, instance=self.instance, status=status or self.status,
            load=self.in_flight, capacity=self._capacity,
            partitions=sorted(tp.partition for tp in owned if tp.topic == inbox),
            weight=self.weight, interval_ms=round((self.heartbeat_interval or 1.0) * 1000),
            answered=answered, errors=errors, latency_ms=latency, version=self.version,
            ts_ms=clock.now_ms(), boot=self.boot, seq=next(self._seq),
        )  # fmt: skip

    async def _heartbeats(self) -> None:
        assert self.heartbeat_interval
        while True:
            await self._beat()
            await asyncio.sleep(self.heartbeat_interval)

    def _beat_soon(self) -> None:
        """Heartbeat now, out of turn (the partitions it owns changed)."""
        if self._beats is not None and self._producer is not None:
            task = asyncio.create_task(self._beat(), name=f"heartbeat-now:{self.service}")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _beat(self, status: HealthStatus | None = None) -> None:
        """Publish one heartbeat; a failure is logged and the next one tries again."""
        if self._producer is None:
            return
        beat = self.health(status)
        value = codec.encode(beat)
        try:
            await self._producer.send_and_wait(
                self.topics.health,
                value,
                key=self.instance.encode(),
                headers=self._signed(
                    codec.headers(beat), value, self.topics.health, self.instance.encode()
                ),
            )
        except KafkaError as exc:
            self.stats["heartbeats_failed"] += 1
            log.warning("heartbeat of %s not delivered: %r", self.instance, exc)
        else:
            self.stats["heartbeats"] += 1

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
                tp.topic, tp.partition, offset, task.exception(),
            )  # fmt: skip
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

    def _signed(
        self, headers: list[tuple[str, bytes]], value: bytes, topic: str, key: bytes | None
    ) -> list[tuple[str, bytes]]:
        if self.keys is None:
            return headers
        return headers + self.keys.headers(value, topic, key, self.legacy_signatures)

    def _take(self, tp: TopicPartition, record: ConsumerRecord, tracing: bool) -> None:
        """Check and decode one record where it was fetched, then start its action; a
        redelivered command gets its earlier reply without running again."""
        self.stats["received"] += 1
        if self.keys is not None:
            try:
                self.keys.check(
                    record.value, record.headers, record.topic, record.key, self.legacy_signatures
                )
            except SignatureError as exc:
                return self._spawn(self._reject(tp, record, exc), tp, record.offset)
        command = self._decode(record)
        if command is None:
            return self._done(tp, record.offset)
        if command.service != self.service:
            error = SignatureError(
                "misdelivered", f"a command for {command.service!r}, not {self.service!r}"
            )
            return self._spawn(self._reject(tp, record, error), tp, record.offset)
        cid = command.command_id
        cached = self._replies.get(cid)
        if cached is not None:
            self._replies.move_to_end(cid)
            self.stats["duplicates"] += 1
            return self._spawn(self._send(command, cached, tp, record.offset), tp, record.offset)
        if cid in self._running:
            self.stats["duplicates"] += 1
            after = self._after(command, self._waiter(cid), tp, record.offset)
            return self._spawn(after, tp, record.offset)
        key = command.idempotency_key if command.action in self._idempotent else None
        if key is not None:
            done = self._by_key.get(key)
            if done is not None:
                # Another attempt of work already done: its reply, for this attempt.
                self._by_key.move_to_end(key)
                self.stats["duplicates"] += 1
                reply = _readdressed(done, command)
                return self._spawn(self._send(command, reply, tp, record.offset), tp, record.offset)
            doing = self._keys_running.get(key)
            if doing is not None:
                self.stats["duplicates"] += 1
                after = self._after(command, self._waiter(doing), tp, record.offset, True)
                return self._spawn(after, tp, record.offset)
            self._keys_running[key] = cid
        if self._expired(command):
            if key is not None:
                self._keys_running.pop(key, None)
            return self._done(tp, record.offset)
        self._running[cid] = None
        self._spawn(self._run(command, tp, record.offset, tracing), tp, record.offset)

    def _expired(self, command: CommandEvent) -> bool:
        """Whether `command` is past its deadline by more than the grace (then it is not
        run: nothing waits for its reply any more), counted and logged."""
        if command.deadline_ms is None or self.expiry_grace_ms is None:
            return False
        late = clock.now_ms() - command.deadline_ms
        if late <= self.expiry_grace_ms:
            return False
        self.stats["expired"] += 1
        log.warning(
            "not running command %s: %d ms past its deadline (a late or replayed command)",
            command.command_id, late, extra={"service": self.service},
        )  # fmt: skip
        return True

    def _decode(self, record: ConsumerRecord) -> CommandEvent | None:
        """The record's command; None (counted and logged) when it is not a valid one."""
        try:
            command = CommandEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            reason = codec.validation_reason(exc)
        else:
            # aiokafka keeps an invalid topic in its metadata set for good, so never send to one.
            if _TOPIC_NAME.match(command.reply_to):
                return command
            reason = f"reply_to: {command.reply_to!r} is not a valid topic name"
        self.stats["invalid"] += 1
        log.warning(
            "skipping invalid command at %s[%d] offset %d: %s",
            record.topic, record.partition, record.offset, reason,
        )  # fmt: skip
        return None

    async def _run(
        self, command: CommandEvent, tp: TopicPartition, offset: int, tracing: bool
    ) -> None:
        """Run the command's action (once), remember its reply and send it."""
        cid = command.command_id
        key = command.idempotency_key if command.action in self._idempotent else None
        try:
            reply = await self._execute(command, tracing)
        except BaseException:
            if key is not None:
                self._keys_running.pop(key, None)
            waiting = self._running.pop(cid)
            if waiting is not None:
                waiting.cancel()  # its duplicate sends nothing; a cancelled future never warns
            raise
        if self._dedup_size > 0:
            self._replies[cid] = reply
            if len(self._replies) > self._dedup_size:
                self._replies.popitem(last=False)
            if key is not None and _final(reply):
                self._by_key[key] = reply
                if len(self._by_key) > self._dedup_size:
                    self._by_key.popitem(last=False)
        if key is not None:
            self._keys_running.pop(key, None)
        waiting = self._running.pop(cid)
        if waiting is not None:
            waiting.set_result(reply)
        await self._send(command, reply, tp, offset)

    def _waiter(self, cid: str) -> asyncio.Future[bytes]:
        """A future for the reply of the command `cid` whose action runs now. Made here,
        where the record is taken, so the run that resolves it cannot have ended first."""
        waiting = self._running.get(cid)
        if waiting is None:
            waiting = self._running[cid] = asyncio.get_running_loop().create_future()
        return waiting

    async def _after(
        self,
        command: CommandEvent,
        waiting: asyncio.Future[bytes],
        tp: TopicPartition,
        offset: int,
        readdress: bool = False,
    ) -> None:
        """A duplicate of a command whose action is running (or, `readdress`, another
        attempt of idempotent work that is): send the same reply once it is there, to this
        attempt (nothing is sent if that run was cancelled)."""
        reply = await asyncio.shield(waiting)
        await self._send(command, _readdressed(reply, command) if readdress else reply, tp, offset)

    async def _reject(
        self, tp: TopicPartition, record: ConsumerRecord, exc: SignatureError
    ) -> None:
        """A command no key of ours signed (or one for another service) is never run:
        dead-letter it (best effort: the step it claims to be for times out in any case)
        and count it."""
        self.stats["misdelivered" if exc.code == "misdelivered" else "bad_signatures"] += 1
        reason = f"command rejected by {self.instance}: {exc.reason}"
        log.warning(
            "rejecting command at %s[%d] offset %d: %s",
            record.topic, record.partition, record.offset, reason,
        )  # fmt: skip
        letter = codec.dead_letter(
            reason=reason, code=exc.code, topic=record.topic, value=record.value,
            key=record.key, headers=record.headers, partition=record.partition,
            offset=record.offset,
        )  # fmt: skip
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self.topics.dlq, codec.encode(letter), key=record.key,
                headers=codec.headers(letter),
            )  # fmt: skip
        except KafkaError as error:
            log.error("dead letter of a rejected command not delivered: %r", error)
        self._done(tp, record.offset)

    async def _send(
        self, command: CommandEvent, reply: bytes, tp: TopicPartition, offset: int
    ) -> None:
        """Hand the reply to the producer; its offset is done once the broker has it.

        Sends are not awaited one by one: the producer batches them, and a failed
        delivery goes to `_resend`."""
        assert self._producer is not None
        try:
            delivery = await self._producer.send(
                command.reply_to, reply, key=command.workflow_id.encode(),
                headers=self._reply_headers(command, reply),
            )  # fmt: skip
        except KafkaError as exc:
            return await self._resend(command, reply, tp, offset, exc)
        delivery.add_done_callback(functools.partial(self._delivered, command, reply, tp, offset))

    def _delivered(
        self, command: CommandEvent, reply: bytes, tp: TopicPartition, offset: int,
        delivery: asyncio.Future[Any],
    ) -> None:  # fmt: skip
        if delivery.cancelled():
            return  # the producer stopped first: not committed, consumed again later
        exc = delivery.exception()
        if isinstance(exc, KafkaError):
            return self._spawn(self._resend(command, reply, tp, offset, exc), tp, offset)
        if exc is not None:
            # Not a broker's answer, so not one to retry: logged, and the partition's
            # commits are not held by it (as a command whose handling raised).
            log.error("reply to %s failed: %r", command.reply_to, exc)
        self._done(tp, offset)

    def _reply_headers(self, command: CommandEvent, reply: bytes) -> list[tuple[str, bytes]]:
        # The reply may come from the cache as bytes; its headers follow from the command.
        plain = headers_for("reply", SCHEMA_VERSION, command.trace_id, command.command_id)
        return self._signed(plain, reply, command.reply_to, command.workflow_id.encode())

    async def _resend(
        self, command: CommandEvent, reply: bytes, tp: TopicPartition, offset: int,
        failure: KafkaError,
    ) -> None:  # fmt: skip
        """Deliver a reply whose send failed: a transient failure is retried with capped
        backoff; a reply the broker refuses for good (too large, say) is replaced, once, by
        a small error reply, so the step fails now rather than at its timeout."""
        assert self._producer is not None
        key = command.workflow_id.encode()
        backoff = 0.1
        replaced = False
        exc: KafkaError | None = failure
        while exc is not None:
            if not exc.retriable:
                if replaced:
                    log.error("error reply to %s refused too: %r", command.reply_to, exc)
                    break
                replaced = True
                reply = self._undeliverable(command, exc)
            else:
                self.stats["send_retries"] += 1
                log.warning(
                    "reply to %s not delivered, retrying in %.1fs: %r",
                    command.reply_to, backoff, exc,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            try:
                await self._producer.send_and_wait(
                    command.reply_to, value=reply, key=key,
                    headers=self._reply_headers(command, reply),
                )  # fmt: skip
                exc = None
            except KafkaError as error:
                exc = error
        self._done(tp, offset)

    def _undeliverable(self, command: CommandEvent, exc: KafkaError) -> bytes:
        """The error reply that stands in for a reply the broker refused for good."""
        self.stats["undeliverable"] += 1
        log.error("reply to %s refused by the broker: %r", command.reply_to, exc)
        message = f"the broker refused the reply of {self.service}.{command.action}: {exc!r}"
        return self._error(command, ErrorInfo(message=message[:1000], code="undeliverable"))

    async def _execute(self, command: CommandEvent, tracing: bool) -> bytes:
        """Run the command's action and encode its reply; every failure becomes an error reply."""
        entry = self._actions.get(command.action)
        if entry is None:
            known = ", ".join(sorted(self._actions)) or "(none)"
            msg = f"service {self.service!r} has no action {command.action!r}; known: {known}"
            return self._error(command, ErrorInfo(message=msg, code="unknown_action"))
        fn, wants_command = entry
        async with self._limit:
            self.stats["executed"] += 1
            started = time.perf_counter()
            try:
                # A failure is recorded on the span (when tracing) as it leaves it.
                with action_span(self.service, command) if tracing else _UNTRACED:
                    result = fn(command.input, command) if wants_command else fn(command.input)
                    if inspect.isawaitable(result):
                        result = await result
            except ActionError as exc:
                info = ErrorInfo(message=exc.message, code=exc.code, retryable=exc.retryable)
            except (Exception, asyncio.CancelledError) as exc:
                # A CancelledError the handler raised itself (we were not cancelled) is a
                # failure like any other; re-running it on redelivery would loop forever.
                current = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and current and current.cancelling():
                    raise
                log.exception(
                    "action %s.%s failed", self.service, command.action,
                    extra={"workflow_id": command.workflow_id, "step": command.step,
                           "attempt": command.attempt, "trace_id": command.trace_id},
                )  # fmt: skip
                info = ErrorInfo(
                    message=f"{type(exc).__name__}: {exc}", code="exception", retryable=True
                )
            else:
                try:
                    reply = self._ok(command, result)
                except PydanticSerializationError as exc:
                    msg = f"action {command.action!r} returned output that is not JSON: {exc}"
                    info = ErrorInfo(message=msg, code="bad_output")
                else:
                    self._tally.record((time.perf_counter() - started) * 1000, error=False)
                    return reply
            self._tally.record((time.perf_counter() - started) * 1000, error=True)
        return self._error(command, info)

    def _ok(self, command: CommandEvent, output: Any) -> bytes:
        """The encoded ``ok`` reply: written directly when the output is plain JSON, else
        through the model (which raises `PydanticSerializationError` if it is not JSON)."""
        fields = {
            "schema_version": SCHEMA_VERSION, "type": "reply",
            "command_id": command.command_id, "workflow_id": command.workflow_id,
            "step": command.step, "attempt": command.attempt, "status": "ok",
            "output": output, "service": self.service, "instance": self.instance,
            "trace_id": command.trace_id, "replied_ms": clock.now_ms(),
        }  # fmt: skip
        if output is None:
            del fields["output"]
        if command.trace_id is None:
            del fields["trace_id"]
        plain = codec.encode_plain(fields)
        if plain is not None:
            return plain
        return codec.encode(self._reply(command, ReplyStatus.OK, output=output))

    def _error(self, command: CommandEvent, info: ErrorInfo) -> bytes:
        self.stats["errors"] += 1
        error = info.model_copy(update={"step": command.step})
        return codec.encode(self._reply(command, ReplyStatus.ERROR, error=error))

    def _reply(
        self, command: CommandEvent, status: ReplyStatus, *, output: Any = None,
        error: ErrorInfo | None = None,
    ) -> ReplyEvent:  # fmt: skip
        return ReplyEvent(
            command_id=command.command_id, workflow_id=command.workflow_id, step=command.step,
            attempt=command.attempt, trace_id=command.trace_id, status=status, output=output,
            error=error, service=self.service, instance=self.instance, replied_ms=clock.now_ms(),
        )  # fmt: skip


def _final(reply: bytes) -> bool:
    """Whether a reply settles its step's work (ok, or an error that is not retryable):
    then another attempt of the same work gets it rather than running again."""
    doc = orjson.loads(reply)
    return doc.get("status") == "ok" or not (doc.get("error") or {}).get("retryable")


def _readdressed(reply: bytes, command: CommandEvent) -> bytes:
    """`reply`, given for another attempt of the same work, as the reply to `command`."""
    doc = orjson.loads(reply)
    doc["command_id"], doc["attempt"] = command.command_id, command.attempt
    doc["replied_ms"] = clock.now_ms()
    return orjson.dumps(doc)


def _keyring(service: str, keys: Keyring | str | None) -> Keyring:
    """The service's keys: given, else from the environment; none is a configuration
    error that says what to do."""
    if isinstance(keys, Keyring):
        return keys
    spec = keys if keys is not None else os.environ.get(KEYS_ENV, "")
    if not spec.strip():
        msg = (
            f"service {service!r} has no signing keys: pass keys='id=secret' (the mediator's "
            f"key for it) or set {KEYS_ENV}; signing=False turns signing off, which the "
            "mediator must also do (signing.enabled: false)"
        )
        raise ConfigurationError(msg)
    try:
        current = os.environ.get(CURRENT_ENV) if keys is None else None
        return Keyring(parse_keys(spec, service), current or None)
    except ValueError as exc:
        msg = f"service {service!r}: bad signing keys: {exc}"
        raise ConfigurationError(msg) from None


def _wants_command(fn: Handler, name: str) -> bool:
    """Whether ``fn`` takes ``(input, command)`` rather than ``(input)``; decided once."""
    positional = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in positional):
        return True
    required = [p for p in positional if p.default is p.empty]
    if not positional or len(required) > 2:
        msg = f"handler of action {name!r} must take (input) or (input, command)"
        raise TypeError(msg)
    return len(positional) >= 2


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits a worker's finished offsets on partitions it is about to lose."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # Announce the new partitions now: the mediator routes by them.
        self._worker._beat_soon()
