"""Client SDK: submit workflow requests and await their results.

::

    async with MediatorClient("127.0.0.1:9092") as client:
        result = await client.submit("order", {"sku": "A"}, timeout=30.0)

The client reads the results topic without a consumer group: on start it is assigned
every partition and positioned at the end *before* any request can be sent, so no result
of its own requests can be missed, and thousands of submits can wait at once on a single
consumer. Partitions added to the topic later are read from their beginning once its
metadata shows them. Results for request ids it is not waiting for are ignored, unless an
``on_result`` callback observes every result read.

Results are delivered at least once, so the same result can arrive twice. The client keeps
a bounded memory of the results it has seen (by ``result_id``) and hands each distinct one
to ``on_result`` once; ``duplicates_dropped`` counts the repeats.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from mediator import clock, codec
from mediator.core.ids import run_id
from mediator.core.signing import Keyring
from mediator.errors import MediatorError
from mediator.kafka import KafkaConnection, new_consumer
from mediator.producers import new_producer, start_producer
from mediator.sdk.claims import Claims
from topics.events import ControlAction, ControlEvent, RequestEvent, ResultEvent
from topics.names import Topics

__all__ = [
    "ClientClosed",
    "MediatorClient",
    "ResultsTopicMissing",
    "SubmitTimeout",
]

#: How often the client looks for partitions added to the results topic (its producer's
#: metadata is refreshed every `kafka.metadata_max_age_ms` in the background).
PARTITIONS_CHECK_S = 5.0

log = logging.getLogger("mediator.client")


class SubmitTimeout(MediatorError, TimeoutError):
    """No result arrived for a request within its timeout."""

    def __init__(self, request_id: str, timeout: float) -> None:
        self.request_id, self.timeout = request_id, timeout
        super().__init__(
            f"no result for request {request_id!r} within {timeout:g}s; the workflow may still "
            "be running: submit again with the same request_id to wait for it"
        )


class ResultsTopicMissing(MediatorError):
    """The results topic does not exist (or has no partitions), so results cannot be read."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        super().__init__(
            f"results topic {topic!r} does not exist or has no partitions; create it "
            "(e.g. start the mediator, or `mediator dev`) before starting the client"
        )


class ClientClosed(MediatorError):
    """The client is not running (not started, stopped, or its results reader failed)."""


class MediatorClient:
    """Publishes `RequestEvent`s and resolves each submit with its `ResultEvent`."""

    def __init__(
        self,
        bootstrap_servers: str | KafkaConnection,
        *,
        topics: Topics | None = None,
        results_topic: str | None = None,
        enable_idempotence: bool = True,
        client_id: str = "mediator-client",
        linger_ms: int = 1,
        fetch_max_wait_ms: int = 500,
        on_result: Callable[[ResultEvent], object] | None = None,
        dedup_size: int = 100_000,
        keys: Keyring | None = None,
        operator: tuple[str, Keyring] | None = None,
        claims: Claims | None = None,
    ) -> None:
        """A client of the broker at ``bootstrap_servers`` (options: see the README).

        With ``claims``, a payload whose JSON is over its threshold is stored there and
        sent by reference, and references in a result's output are resolved before
        `submit` returns it (`mediator.sdk.claims`; failures raise `ClaimMissing` or
        `ClaimUnavailable`).

        ``on_result`` is called once for every distinct result read from the results topic
        while the client runs, on the reader task, before any submit waiting for it
        resumes: keep it quick (hand slow work to a queue); what it raises is logged. On a
        results topic shared with other clients it sees their results too.
        ``dedup_size`` is how many result ids are remembered to drop repeats.
        """
        if dedup_size < 1:
            msg = f"dedup_size must be at least 1, got {dedup_size}"
            raise ValueError(msg)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.claims = claims
        self.topics = topics or Topics()
        self.results_topic = results_topic or self.topics.results
        self.bootstrap_servers = bootstrap_servers
        self.enable_idempotence = enable_idempotence
        self.client_id = client_id
        self.linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: dict[str, list[asyncio.Future[ResultEvent]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.on_result = on_result
        self.dedup_size = dedup_size
        #: Signs requests (`signing.requests` on the mediator); None: unsigned.
        self.keys = keys
        #: The operator signals are sent as, and their keys (None: unsigned signals, which
        #: a mediator with controls signed refuses).
        self.operator = operator
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        #: Results dropped because an identical one was read before.
        self.duplicates_dropped = 0

    @classmethod
    def from_settings(cls, settings: Any = None, **options: Any) -> MediatorClient:
        """A client connected as `settings` say (default: `load_settings()`:
        ``MEDIATOR_*``, ``MEDIATOR_CONFIG``, or the settings of a ``mediator dev`` running
        from this directory), signing its requests when they say so. `options` override
        any constructor argument."""
        from mediator.settings import load_settings

        settings = settings or load_settings()
        kafka = settings.kafka
        given: dict[str, Any] = {
            "topics": kafka.topics,
            "keys": settings.signing.request_signer(),
            "operator": settings.signing.control_signer() if settings.signing.enabled else None,
            "enable_idempotence": kafka.enable_idempotence,
            "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        }
        return cls(kafka, **(given | options))

    async def start(self) -> None:
        """Connect, and position the results reader at the end of every partition."""
        if self._reader is not None:
            return
        # aiokafka clients bind to the running loop and cannot be restarted: build them here.
        self._producer = new_producer(
            self.bootstrap_servers,
            client_id=self.client_id,
            enable_idempotence=self.enable_idempotence,
            linger_ms=self.linger_ms,
        )
        self._consumer = new_consumer(
            self.bootstrap_servers,
            client_id=self.client_id,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            # A position that left the log (retention deleted what the reader had not
            # read yet, or a log truncated behind it) resumes at the log's start: the
            # results still there are read, not skipped; repeats are dropped by id.
            auto_offset_reset="earliest",
        )
        try:
            await start_producer(self._producer, self.bootstrap_servers, self.enable_idempotence)
            await self._consumer.start()
            await self._assign_results(self._producer, self._consumer)
        except BaseException:
            await self._close()
            raise
        self._failure = None
        self._reader = asyncio.create_task(self._read(), name="mediator-client:results")

    async def stop(self) -> None:
        """Stop reading results and close the connections; pending submits fail."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])
            if not reader.cancelled():
                reader.exception()  # it failed earlier and was logged then
        self._fail_pending(ClientClosed("the client was stopped while the request was pending"))
        await self._close()

    async def __aenter__(self) -> MediatorClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(
        self,
        workflow: str,
        payload: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        trace_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Send a request without waiting for its result; returns its id once the broker
        acked. `priority` (0-9, higher first) orders the run in its concurrency key's
        queue, if its workflow has one and the run has to wait for a slot."""
        payload = payload or {}
        if self.claims is not None:
            payload = await self.claims.offload(payload)
        request = RequestEvent(
            request_id=request_id or uuid.uuid4().hex,
            workflow=workflow,
            payload=payload,
            reply_to=None if self.results_topic == self.topics.results else self.results_topic,
            trace_id=trace_id,
            created_ms=clock.now_ms(),
            priority=priority,
        )
        if self._producer is None:
            msg = "start the client (`await client.start()` or `async with client`) first"
            raise ClientClosed(msg)
        key = request.request_id.encode()
        value, headers = codec.record(request, self.topics.requests, key, self.keys)
        await self._producer.send_and_wait(
            self.topics.requests, value=value, key=key, headers=headers
        )
        return request.request_id

    async def signal(
        self,
        run: str,
        event: str,
        payload: dict[str, Any] | None = None,
        *,
        signal_id: str | None = None,
    ) -> str:
        """Send the signal `event` (with `payload`) to a run, by its workflow id or its
        request id: the step waiting on it completes with `payload` as its output (a
        signal no step waits on yet is kept for the first that will). Returns the
        signal's id once the broker acked it; the same `signal_id` sent twice is applied
        once (a run remembers the last 32 control and signal ids applied to it)."""
        if self._producer is None:
            msg = "start the client (`await client.start()` or `async with client`) first"
            raise ClientClosed(msg)
        workflow_id = run_id(run)
        control = ControlEvent(
            control_id=signal_id or uuid.uuid4().hex,
            action=ControlAction.SIGNAL,
            workflow_id=workflow_id,
            signal=event,
            payload=payload or {},
            operator=self.operator[0] if self.operator is not None else None,
            issued_ms=clock.now_ms(),
        )
        return await self._control(control, workflow_id)

    async def signal_key(
        self,
        event: str,
        key: str,
        payload: dict[str, Any] | None = None,
        *,
        signal_id: str | None = None,
    ) -> str:
        """Send the signal `event` for the correlation key `key` (what a `wait` step's
        ``key`` computed, e.g. a payment id), for senders that do not know the run: the
        run waiting on it gets it, or, none yet, it is kept (up to 16 per key, for 7 days)
        for the first that will. Returns the signal's id once the broker acked it."""
        if self._producer is None:
            msg = "start the client (`await client.start()` or `async with client`) first"
            raise ClientClosed(msg)
        control = ControlEvent(
            control_id=signal_id or uuid.uuid4().hex,
            action=ControlAction.SIGNAL,
            key=key,
            signal=event,
            payload=payload or {},
            operator=self.operator[0] if self.operator is not None else None,
            issued_ms=clock.now_ms(),
        )
        return await self._control(control, key)

    async def _control(self, control: ControlEvent, record_key: str) -> str:
        """Publish `control` under `record_key`, signed as this client's operator; its id
        once the broker acked it."""
        assert self._producer is not None
        key = record_key.encode()
        keys = self.operator[1] if self.operator is not None else None
        value, headers = codec.record(control, self.topics.control, key, keys)
        await self._producer.send_and_wait(
            self.topics.control, value=value, key=key, headers=headers
        )
        return control.control_id

    async def submit(
        self,
        workflow: str,
        payload: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 -- part of the contract: SubmitTimeout names it
        trace_id: str | None = None,
        priority: int = 0,
    ) -> ResultEvent:
        """Run ``workflow`` on ``payload`` and return its result.

        Submitting again with the same ``request_id`` is safe (requests are idempotent) and
        waits for the same workflow. Raises `SubmitTimeout` after ``timeout`` seconds.
        """
        if self._reader is None or self._reader.done():
            msg = "start the client (`await client.start()` or `async with client`) first"
            raise ClientClosed(msg) from self._failure
        request_id = request_id or uuid.uuid4().hex
        # Wait before publishing, so a result that comes back at once is not missed.
        future: asyncio.Future[ResultEvent] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(request_id, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                await self.publish(
                    workflow, payload, request_id=request_id, trace_id=trace_id, priority=priority
                )
                result = await future
            if self.claims is not None and result.output is not None:
                output = await self.claims.resolve(result.output)
                result = result.model_copy(update={"output": output})
            return result
        except TimeoutError as exc:
            raise SubmitTimeout(request_id, timeout) from exc
        finally:
            waiters = self._pending.get(request_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._pending.pop(request_id, None)

    async def submit_many(
        self,
        requests: Iterable[tuple[str, dict[str, Any]]],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> list[ResultEvent]:
        """Submit ``(workflow, payload)`` pairs concurrently; results in the same order.

        Every submit runs to completion; then the first failure, if any, is raised.
        """
        outcomes = await asyncio.gather(
            *(self.submit(wf, payload, timeout=timeout) for wf, payload in requests),
            return_exceptions=True,
        )
        results: list[ResultEvent] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        return results

    @property
    def pending(self) -> int:
        """How many submits are waiting for their result."""
        return sum(len(waiters) for waiters in self._pending.values())

    async def _added_partitions(self) -> None:
        """Read partitions added to the results topic since the client started, from their
        beginning (results published to them before this saw them are read, not skipped);
        the partitions read already keep their positions."""
        assert self._producer is not None and self._consumer is not None
        consumer = self._consumer
        partitions = await self._producer.partitions_for(self.results_topic)
        held = consumer.assignment()
        added = [
            TopicPartition(self.results_topic, p)
            for p in sorted(partitions or ())
            if TopicPartition(self.results_topic, p) not in held
        ]
        if not added:
            return
        positions = {tp: await consumer.position(tp) for tp in held}
        consumer.assign([*held, *added])
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        await consumer.seek_to_beginning(*added)
        log.info("results topic %s: reading %d added partitions", self.results_topic, len(added))

    async def _assign_results(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer) -> None:
        # `topics()` asks for full metadata, which never auto-creates a topic (asking for
        # one topic by name may, with a broker default partition count).
        if self.results_topic not in await consumer.topics():
            raise ResultsTopicMissing(self.results_topic)
        partitions = await producer.partitions_for(self.results_topic)
        if not partitions:
            raise ResultsTopicMissing(self.results_topic)
        tps = [TopicPartition(self.results_topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        # seek_to_end only schedules a lookup; `position` waits for it to resolve, so the
        # end offsets are pinned before start() returns.
        for tp in tps:
            await consumer.position(tp)

    async def _read(self) -> None:
        assert self._consumer is not None
        checked = asyncio.get_running_loop().time()
        try:
            while True:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=1000)
                for records in batch.values():
                    for record in records:
                        self._deliver(record.key, record.value)
                now = asyncio.get_running_loop().time()
                if now - checked >= PARTITIONS_CHECK_S:
                    checked = now
                    await self._added_partitions()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("results reader failed; pending submits fail")
            self._failure = exc
            self._fail_pending(ClientClosed(f"results reader failed: {exc!r}"))
            raise

    def _deliver(self, key: bytes | None, value: bytes | None) -> None:
        # Most results belong to other clients: unless observing them all, skip them by key
        # without decoding.
        if (
            self.on_result is None
            and key is not None
            and key.decode(errors="replace") not in self._pending
        ):
            return
        try:
            result = ResultEvent.model_validate_json(value or b"")
        except ValidationError as exc:
            log.warning("ignoring invalid result (key %r): %s", key, exc.errors()[:1])
            return
        # A repeat still resolves a submit waiting for it: a submit made after the first
        # copy (same request_id, asking for a finished run's result again) would otherwise
        # wait for a result that never comes again.
        for future in self._pending.get(result.request_id, ()):
            if not future.done():  # the first result wins
                future.set_result(result)
        if self._remember(result) and self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:
                log.exception("on_result failed for the result of %r", result.request_id)

    def _remember(self, result: ResultEvent) -> bool:
        """Whether `result` is new; a repeat is counted in `duplicates_dropped`."""
        identity: Hashable = result.result_id or (
            # Results from mediators that predate result_id: these fields tell copies of
            # one result apart from a later result of the same request.
            result.request_id,
            result.workflow_id,
            result.status.value,
            result.finished_ms,
        )
        if identity in self._seen:
            self._seen.move_to_end(identity)
            self.duplicates_dropped += 1
            return False
        self._seen[identity] = None
        if len(self._seen) > self.dedup_size:
            self._seen.popitem(last=False)
        return True

    def _fail_pending(self, error: MediatorError) -> None:
        for waiters in self._pending.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # the waiter re-raises it; don't log it as lost

    async def _close(self) -> None:
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        try:
            if consumer is not None:
                await consumer.stop()
        finally:
            if producer is not None:
                await producer.stop()
