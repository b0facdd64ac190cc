"""Service SDK: run a Python service's actions as mediator steps.

A service registers one coroutine per action; the worker consumes the service's inbox
topic, runs each `CommandEvent`'s action and publishes a `ReplyEvent` to the command's
``reply_to`` topic::

    worker = Worker("inventory", "127.0.0.1:9092", instance="inventory-1")

    @worker.action("reserve")
    async def reserve(input: dict, command: CommandEvent) -> dict:
        return {"reserved": input["sku"]}

    await worker.run()  # until cancelled

Delivery is at-least-once: a batch's offsets are committed only after all its replies
were acknowledged. Execution is deduplicated on ``command_id`` (an LRU of recent replies),
so a redelivered command gets its reply again without the handler running twice.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from mediator import clock, codec
from mediator.errors import MediatorError
from mediator.producers import new_producer
from topics.events import (
    SCHEMA_VERSION,
    TOPIC_NAME,
    CommandEvent,
    ErrorInfo,
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
STAT_NAMES = ("received", "executed", "duplicates", "errors", "invalid")


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
        bootstrap_servers: str,
        *,
        topics: Topics | None = None,
        instance: str | None = None,
        group_id: str | None = None,
        enable_idempotence: bool = True,
        concurrency: int = 64,
        dedup_size: int = 100_000,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        stop_timeout: float = 10.0,
        consumer_options: Mapping[str, Any] | None = None,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.service = service
        self.topics = topics or Topics()
        self.instance = instance or f"{service}-{socket.gethostname()}-{os.getpid()}"
        self.group_id = group_id or f"{self.topics.service_prefix}{service}"
        self.bootstrap_servers = bootstrap_servers
        self.enable_idempotence = enable_idempotence
        self.stop_timeout = stop_timeout
        self._consumer_options = dict(consumer_options or {})
        self._producer_options = dict(producer_options or {})
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_NAMES, 0))
        self._actions: dict[str, tuple[Handler, bool]] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._dedup_size = dedup_size
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Future[bytes]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch: tuple[list[ConsumerRecord], list[asyncio.Task[None]]] | None = None

    def action(self, name: str) -> Callable[[H], H]:
        """Decorator registering ``fn`` as the handler of action ``name``."""

        def register(fn: H) -> H:
            self.add_action(name, fn)
            return fn

        return register

    def add_action(self, name: str, fn: Handler) -> None:
        """Register ``fn`` as the handler of ``name``: ``(input)`` or ``(input, command)``."""
        if name in self._actions:
            msg = f"action {name!r} of service {self.service!r} is already registered"
            raise ValueError(msg)
        self._actions[name] = (fn, _wants_command(fn, name))

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
        consumer = AIOKafkaConsumer(
            self.topics.service(self.service),
            bootstrap_servers=self.bootstrap_servers,
            client_id=client_id,
            group_id=self.group_id,
            **({"enable_auto_commit": False, "auto_offset_reset": "earliest"}
               | self._consumer_options),
        )  # fmt: skip
        try:
            await producer.start()
            await consumer.start()  # returns once the group has assigned partitions
        except BaseException:
            await consumer.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._task = asyncio.create_task(self._loop(), name=f"worker:{self.service}")
        log.info("worker started", extra={"service": self.service, "instance": self.instance})

    async def stop(self) -> None:
        """Stop consuming, let in-flight commands finish (up to ``stop_timeout``), commit, close."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # the loop logged it; run() re-raises it
        try:
            if self._batch is not None:
                records, tasks = self._batch
                _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
                for t in pending:
                    t.cancel()
                if pending:
                    log.warning("worker stop: %d commands did not finish in time", len(pending))
                    await asyncio.wait(pending)
                await self._settle(records, tasks, seek=False)
                self._batch = None
        finally:
            assert self._consumer is not None and self._producer is not None
            try:
                await self._consumer.stop()
            finally:
                await self._producer.stop()
            log.info("worker stopped", extra={"service": self.service, "instance": self.instance})

    async def run(self) -> None:
        """Start, serve until cancelled (or until the loop fails), then stop cleanly."""
        await self.start()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        finally:
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
        assert self._consumer is not None
        backoff = 0.0
        try:
            while True:
                batch = await self._consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_records
                )
                records = [record for part in batch.values() for record in part]
                if not records:
                    continue
                tasks = [asyncio.create_task(self._process(r)) for r in records]
                # asyncio.wait (unlike gather) leaves the tasks running if we are cancelled,
                # so stop() can let them finish and commit what they completed.
                self._batch = (records, tasks)
                await asyncio.wait(tasks)
                complete = await self._settle(records, tasks, seek=True)
                self._batch = None
                backoff = 0.0 if complete else min(max(backoff * 2, 0.1), 5.0)
                await asyncio.sleep(backoff)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker loop failed", extra={"service": self.service})
            raise

    async def _settle(
        self, records: Sequence[ConsumerRecord], tasks: Sequence[asyncio.Task[None]], *, seek: bool
    ) -> bool:
        """Commit, per partition, the records whose replies were delivered without a gap.

        A partition whose reply failed is rewound to the failed record (``seek``), so it is
        consumed again; its completed commands then re-send their cached replies.
        """
        assert self._consumer is not None
        commit: dict[TopicPartition, int] = {}
        blocked: set[TopicPartition] = set()
        for record, task in zip(records, tasks, strict=True):
            tp = TopicPartition(record.topic, record.partition)
            if tp in blocked:
                continue
            if task.done() and not task.cancelled() and task.exception() is None:
                commit[tp] = record.offset + 1
                continue
            blocked.add(tp)
            error = None if not task.done() or task.cancelled() else task.exception()
            log.error(
                "reply not delivered; %s[%d] offset %d will be consumed again: %r",
                record.topic, record.partition, record.offset, error,
            )  # fmt: skip
            if seek and tp in self._consumer.assignment():
                self._consumer.seek(tp, record.offset)
        if commit:
            try:
                await self._consumer.commit(commit)
            except KafkaError as exc:
                # After a rebalance the new owner re-reads these; the dedup cache or the
                # mediator's own dedup absorbs the duplicates.
                log.warning("offset commit failed: %r", exc)
        return not blocked

    async def _process(self, record: ConsumerRecord) -> None:
        """Decode one record, get its reply (running the action at most once) and send it."""
        self.stats["received"] += 1
        try:
            command = CommandEvent.model_validate_json(record.value or b"")
        except ValidationError as exc:
            reason = codec.validation_reason(exc)
        else:
            # aiokafka keeps an invalid topic in its metadata set for good, so never send to one.
            if _TOPIC_NAME.match(command.reply_to):
                return await self._answer(command)
            reason = f"reply_to: {command.reply_to!r} is not a valid topic name"
        self.stats["invalid"] += 1
        log.warning(
            "skipping invalid command at %s[%d] offset %d: %s",
            record.topic, record.partition, record.offset, reason,
        )  # fmt: skip

    async def _answer(self, command: CommandEvent) -> None:
        reply = await self._reply_for(command)
        assert self._producer is not None
        await self._producer.send_and_wait(
            command.reply_to,
            value=reply,
            key=command.workflow_id.encode(),
            # The reply may come from the cache as bytes; its headers follow from the command.
            headers=headers_for("reply", SCHEMA_VERSION, command.trace_id),
        )

    async def _reply_for(self, command: CommandEvent) -> bytes:
        cid = command.command_id
        cached = self._replies.get(cid)
        if cached is not None:
            self._replies.move_to_end(cid)
            self.stats["duplicates"] += 1
            return cached
        running = self._running.get(cid)
        if running is not None:
            self.stats["duplicates"] += 1
            return await asyncio.shield(running)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._running[cid] = future
        try:
            reply = await self._execute(command)
        except BaseException:
            future.cancel()  # waiters see CancelledError; a cancelled future never warns
            raise
        finally:
            del self._running[cid]
        future.set_result(reply)
        if self._dedup_size > 0:
            self._replies[cid] = reply
            if len(self._replies) > self._dedup_size:
                self._replies.popitem(last=False)
        return reply

    async def _execute(self, command: CommandEvent) -> bytes:
        """Run the command's action and encode its reply; every failure becomes an error reply."""
        entry = self._actions.get(command.action)
        if entry is None:
            known = ", ".join(sorted(self._actions)) or "(none)"
            msg = f"service {self.service!r} has no action {command.action!r}; known: {known}"
            return self._error(command, ErrorInfo(message=msg, code="unknown_action"))
        fn, wants_command = entry
        async with self._limit:
            self.stats["executed"] += 1
            try:
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
                    return codec.encode(self._reply(command, ReplyStatus.OK, output=result))
                except PydanticSerializationError as exc:
                    msg = f"action {command.action!r} returned output that is not JSON: {exc}"
                    info = ErrorInfo(message=msg, code="bad_output")
        return self._error(command, info)

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
