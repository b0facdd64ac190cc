"""The outbox: messages committed with a transition, published to Kafka at least once.

A transition's commands and result are written to Redis in the same script as the state
(see `Store.commit_many`), each under a lease. The replica that committed publishes them
at once and deletes them when Kafka acknowledges; if it dies first, the lease expires and
any replica's sweeper claims and re-sends them. Consumers deduplicate by id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import cast

import orjson
from aiokafka.errors import KafkaError

from mediator import clock
from mediator.clock import now_ms
from mediator.codec import encode, headers
from mediator.core.signing import Signatures
from mediator.core.tasks import cancel_and_wait
from mediator.core.workflow import CHILD_PREFIX
from mediator.errors import StateUnavailable
from mediator.producers import (
    DEFAULT_MAX_REQUEST_SIZE,
    OUT_OF_STEP,
    fits_a_batch,
    partition_for,
)
from mediator.runtime.failures import dead_letter, failure_code, is_transient, metadata_age_s
from mediator.runtime.messages import EVENTS, Message, unframe
from mediator.runtime.ports import (
    BatchBuilder,
    BatchingProducer,
    OutboxStore,
    Producer,
    Renewable,
)
from mediator.runtime.stats import OutboxStats
from mediator.settings import BackoffSettings
from topics.events import ErrorInfo, ReplyEvent, ReplyStatus
from topics.names import Topics

__all__ = ["Dispatcher"]

log = logging.getLogger("mediator.outbox")

#: After a renewal, out-of-step failures are not a reason for another for this long (those
#: of the producer it replaced, settled late; a broker answering so for another reason).
RENEW_QUIET_S = 5.0


class Dispatcher:
    """Publishes outbox messages and clears them once Kafka has them; sweeps leftovers.

    Failures are sorted per message: a transient one (broker unreachable, a timeout)
    re-schedules that entry alone with capped backoff while the others go; a permanent
    one (too large, unknown topic) dead-letters the entry, fails the step that waited on
    a command (an error reply, applied like any other), and clears it. Leases are
    fencing tokens: an entry another replica took over (this one stalled past its lease)
    is not published again, and the leases of publishes still in flight are renewed so
    a slow broker does not make other replicas re-send them.
    """

    def __init__(
        self,
        store: OutboxStore,
        producer: Producer,
        *,
        topics: Topics,
        backoff: BackoffSettings | None = None,
        excerpt_bytes: int = 16_384,
        sweep_interval_ms: int = 1000,
        sweep_batch: int = 500,
        signatures: Signatures | None = None,
        clear_ms: int = 0,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    ) -> None:
        self.store = store
        #: The producer's `max_request_size`: a stream record near it is sent by `send`,
        #: which checks it, not in a batch built here.
        self.max_request_size = max_request_size
        #: Signs the error replies written in a service's stead (None: signing is off).
        self.signatures = signatures
        self.producer = producer
        self.topics = topics
        self.backoff = backoff or BackoffSettings()
        self.excerpt_bytes = excerpt_bytes
        self.lease_ms = store.lease_ms
        self.sweep_interval_ms = sweep_interval_ms
        self.sweep_batch = sweep_batch
        #: Entries Kafka acknowledged are cleared from Redis together, at most this long
        #: after the first of them (0: each batch's at once): one round trip for the
        #: acknowledgements of many batches instead of one per batch.
        self.clear_ms = clear_ms
        self._acked: list[tuple[int, str]] = []
        self._clearing: asyncio.Task[None] | None = None
        self.published = 0
        self.swept = 0
        self.stats = OutboxStats()
        self._tries: dict[tuple[int, str], int] = {}
        #: Publishes waiting for the broker, with the monotonic time their lease was last
        #: granted (or a moment before): leases are renewed by elapsed local time, never by
        #: comparing this replica's wall clock with Redis's.
        self._inflight: dict[tuple[int, str], tuple[Message, float]] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._next_shard = 0
        #: The transition stream's records waiting for the producer, per partition, in
        #: batches built here (`_enqueue`), and the task handing each partition's over.
        self._queues: dict[tuple[str, int], collections.deque[_Batch]] = {}
        self._submitters: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: Making the producer again (`_renew_producer`), while it is under way.
        self._renewing: asyncio.Task[None] | None = None
        #: When the last renewal ended: out-of-step failures of the producer it replaced
        #: still arrive for a while after it, and are no reason to renew again.
        self._renewed_at = float("-inf")
        self._stopping = False

    def start(self) -> None:
        """Start the sweeper."""
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="outbox-sweeper")

    async def stop(self, wait_s: float = 10) -> None:
        """Stop sweeping and wait for publishes in flight and their clearing, up to
        `wait_s` seconds."""
        self._stopping = True
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
        deadline = clock.monotonic() + wait_s
        # A publish settling schedules its clearing: wait for that too.
        while self._pending and (left := deadline - clock.monotonic()) > 0:
            await asyncio.wait(set(self._pending), timeout=left)
        # Stream records the producer never took stay in the outbox; their leases run out.
        # (A submitter cancelled before it ever ran leaves its queue to be emptied here.)
        for task in list(self._submitters.values()):
            await cancel_and_wait(task)
        for queue in self._queues.values():
            for batch in queue:
                batch.delivered.cancel()
        self._queues.clear()
        self._submitters.clear()
        if self._renewing is not None:
            await cancel_and_wait(self._renewing)

    async def send(
        self, messages: Sequence[Message], since: float | None = None, *, singly: bool = False
    ) -> None:
        """Hand outbox `messages` to the producer now; clear them once acknowledged.

        `since` is the monotonic time just before their leases were taken: if this
        replica stalled for a good part of a lease since (a long GC pause, SIGSTOP), it
        first checks with Redis which entries it still holds and sends only those.
        Returns as soon as the producer holds them, or (the transition stream's records)
        has them queued in batches built here (`_enqueue`). `singly`: every record in a
        batch of its own (`_send_alone`), delivered before the next goes, so a refusal of
        it is its own (entries whose batch was refused for good, sent again).
        Backpressure: if too many batches are still unacknowledged, waits for the oldest
        first.
        """
        if not messages:
            return
        if since is None:
            since = clock.monotonic()
        elif clock.monotonic() - since > self.lease_ms / 2000:
            since = clock.monotonic()
            messages = await self._fence(messages)
        sent: list[_Sent] = []
        partitions: dict[str, list[int]] = {}
        for message in messages:
            if singly and (message.shard, message.id) not in self._inflight:
                continue  # taken over while the entries before it went (`renew_inflight`)
            try:
                futures = None
                if message.kind == EVENTS and not singly and hasattr(self.producer, "send_batch"):
                    futures = await self._enqueue(message, partitions)
                batched = futures is not None
                if futures is None:
                    futures = await self._produce(message, alone=singly)
            except Exception as exc:  # sorted per message, never the whole batch
                await self._failed(message, exc)
                continue
            self._inflight[(message.shard, message.id)] = (message, since)
            sent.append((message, futures, batched))
        if not sent:
            return
        task = asyncio.create_task(self._settle(sent, singly))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if len(self._pending) > 64:
            await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)

    async def send_now(self, messages: Sequence[Message]) -> None:
        """Publish messages that are not in the outbox and wait until Kafka has them all.

        A message that can never be published (too large, unknown topic) is
        dead-lettered instead. A record whose batch the broker refused for good is first
        sent again alone (`_send_alone`): the broker refuses a batch whole, so the refusal
        may have been another record's in it. Raises on a transient failure, so the caller
        rewinds its batch and does not commit its offsets.
        """
        if not messages:
            return
        failed: list[tuple[Message, BaseException]] = []
        futures = []
        for message in messages:
            try:
                futures.append((message, await self._produce(message)))
            except Exception as exc:  # refused before it reached a batch, or transient
                failed.append((message, exc))
        for message, records in futures:
            error = await self._first_failure(records)
            if error is not None and len(records) == 1 and not self._transient(error):
                try:
                    records = await self._produce(message, alone=True)
                except Exception as exc:
                    error = exc
                else:
                    error = await self._first_failure(records)
            if error is None:
                self.published += len(records)
            else:
                failed.append((message, error))
        await self._sort_direct(failed)

    async def _sort_direct(self, failed: list[tuple[Message, BaseException]]) -> None:
        """`send_now`'s failures: any transient one is raised before anything is
        dead-lettered (the caller publishes the lot again, so nothing dead-lettered now
        would be dead-lettered again then); else each is dead-lettered."""
        for _, error in failed:
            self._out_of_step(error)
        transient = next((error for _, error in failed if self._transient(error)), None)
        if transient is not None:
            raise transient
        for message, error in failed:
            self.stats.dead += 1
            if message.kind == "dead_letter":
                # Bounded by construction; if even that is refused, say so loudly.
                log.error("dead letter to %s could not be published: %s", message.topic, error)
                continue
            await self._bury(message, error)

    @staticmethod
    async def _first_failure(records: Sequence[asyncio.Future[object]]) -> BaseException | None:
        """The first failure among the outcomes of a message's records, once all are
        known; a cancellation (the producer is stopping) is raised."""
        outcomes = await asyncio.gather(*records, return_exceptions=True)
        error = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if isinstance(error, asyncio.CancelledError):
            raise error
        return error

    # -- failures --------------------------------------------------------------------------

    def _transient(self, exc: BaseException) -> bool:
        return is_transient(exc, metadata_age_s=metadata_age_s(self.producer))

    def _out_of_step(self, exc: BaseException) -> None:
        """After a failure that says the producer's sequence numbers are out of step with
        the broker's, make the producer again (once at a time). An idempotent aiokafka
        producer does not take back the numbers of a batch the broker refused, so every
        later batch to that partition would fail as out of order until then; a new
        producer starts from a new producer id. The entries that failed meanwhile are
        retried as transient."""
        if not isinstance(exc, OUT_OF_STEP) or self._renewing is not None or self._stopping:
            return
        if clock.monotonic() - self._renewed_at < RENEW_QUIET_S:
            return
        if not hasattr(self.producer, "renew"):
            return
        self._renewing = asyncio.create_task(self._renew_producer(exc), name="outbox-renew")

    async def _renew_producer(self, cause: BaseException) -> None:
        log.warning("the producer is out of step with the broker (%s); making it again", cause)
        try:
            await cast(Renewable, self.producer).renew()
        except Exception as exc:  # the next failure out of step tries again
            log.warning("could not make the producer again: %s", exc)
        else:
            self.stats.producer_renewed += 1
        finally:
            self._renewing = None
            self._renewed_at = clock.monotonic()

    async def _failed(self, message: Message, exc: BaseException) -> None:
        """Sort one message's failure; never raises for a transient one."""
        slot = (message.shard, message.id)
        self._inflight.pop(slot, None)
        self._out_of_step(exc)
        if self._transient(exc):
            tries = self._tries[slot] = self._tries.get(slot, 0) + 1
            delay = self.backoff.delay_ms(tries)
            self.stats.retried += 1
            log.warning(
                "publish of %s %s to %s failed (try %d), retrying in %d ms: %s",
                message.kind,
                message.id,
                message.topic,
                tries,
                delay,
                exc,
            )
            if message.shard >= 0:
                with contextlib.suppress(StateUnavailable):  # the lease runs out instead
                    await self.store.renew(
                        message.shard, [(message.id, message.lease)], delay_ms=delay
                    )
            return
        self.stats.dead += 1
        try:
            await self._bury(message, exc)
            if message.shard >= 0:
                await self.store.outbox_done([slot])
        except Exception as again:
            # Left in the outbox: retried when its lease runs out.
            log.warning("could not dead-letter outbox entry %s yet: %s", message.id, again)
            return
        self._tries.pop(slot, None)

    async def _bury(self, message: Message, exc: BaseException) -> None:
        """Dead-letter a message that can never be published; a command's step is failed
        by an error reply, so the run does not wait for it for ever."""
        code = failure_code(exc)
        reason = f"{message.kind} to {message.topic} cannot be published: {exc}"
        log.error("dead-lettering %s %s: %s", message.kind, message.id, reason)
        dead = dead_letter(
            reason=reason,
            code=code,
            topic=message.topic,
            value=message.value,
            key=message.key,
            headers=message.headers,
            excerpt_bytes=self.excerpt_bytes,
        )
        out = [
            Message(
                -1,
                f"dlq.{message.id}",
                self.topics.dlq,
                message.key,
                encode(dead),
                headers(dead),
                "dead_letter",
            ),
        ]
        if message.kind == "command":
            reply = _undeliverable(message, reason, code)
            if reply is not None:
                value = encode(reply)
                signed = headers(reply)
                if self.signatures is not None and reply.service is not None:
                    signed += self.signatures.sign(
                        reply.service, value, self.topics.replies, message.key
                    )
                undeliverable = f"undeliverable.{message.id}"
                out.append(
                    Message(
                        -1, undeliverable, self.topics.replies, message.key, value, signed, "reply"
                    )
                )
        await self.send_now(out)

    async def _fence(self, messages: Sequence[Message]) -> list[Message]:
        """`_still_held`, for `send`: those no longer held leave `_inflight` (entries sent
        again are there), so each is counted once, fenced, not again as lost in flight."""
        held = await self._still_held(messages)
        if len(held) < len(messages):
            kept = {id(message) for message in held}
            for message in messages:
                if id(message) not in kept:
                    self._inflight.pop((message.shard, message.id), None)
        return held

    async def _still_held(
        self, messages: Sequence[Message], *, in_flight: bool = False
    ) -> list[Message]:
        """The messages whose outbox lease this replica still holds (fencing); their leases
        are renewed."""
        by_shard: dict[int, list[Message]] = {}
        kept = [m for m in messages if m.shard < 0]
        for message in messages:
            if message.shard >= 0:
                by_shard.setdefault(message.shard, []).append(message)
        for shard, group in by_shard.items():
            lease, held = await self.store.renew(shard, [(m.id, m.lease) for m in group])
            for message, ok in zip(group, held, strict=True):
                if ok:
                    message.lease = lease
                    kept.append(message)
                elif in_flight:
                    # Already with the producer: it may reach Kafka twice (see the README's
                    # at-least-once window); consumers deduplicate on its id.
                    self.stats.lost_in_flight += 1
                    log.warning("lease of %s, still in flight, was taken over", message.id)
                else:
                    self.stats.fenced += 1
                    log.warning("not publishing %s: another replica took it over", message.id)
        return kept

    # -- publishing ------------------------------------------------------------------------

    async def _produce(
        self, message: Message, *, alone: bool = False
    ) -> list[asyncio.Future[object]]:
        """Hand `message` to the producer: the futures of its records, which resolve once
        the broker has them (an "events" entry has several: a failure of any fails the
        entry, and its retry publishes again those that did get through, which consumers
        drop by their event ids)."""
        if message.kind == EVENTS:
            return await self._produce_records(message, alone)
        partition = message.partition
        if partition is not None and partition not in await self.producer.partitions_for(
            message.topic
        ):
            # A partition the topic does not have (an instance announced one it cannot
            # own, or the topic shrank): the key chooses instead.
            self.stats.unknown_partition += 1
            log.warning("%s: %s has no partition %d", message.id, message.topic, partition)
            partition = None
        if alone:
            return [await self._send_alone(message, message.value, partition)]
        return [
            await self.producer.send(
                message.topic, message.value, message.key, partition, headers=message.headers
            )
        ]

    async def _send_alone(
        self, message: Message, value: bytes, partition: int | None = None
    ) -> asyncio.Future[object]:
        """Publish one record of `message` in a batch of its own and wait for its outcome:
        a broker's refusal of that batch is this record's. The producer's `send` would
        put it in the batch open for its partition, with whatever else goes there
        meanwhile (another entry sent again, a new command), so a batch is built for it
        where the producer takes batches and the record's partition is known (given, its
        key's, or any for a record without a key); else `send` it is, waited for before
        the next goes."""
        producer, topic, key = self.producer, message.topic, message.key
        if hasattr(producer, "send_batch"):
            batching = cast(BatchingProducer, producer)
            if partition is None:  # the key's partition (any, for a record without a key)
                known = list(await producer.partitions_for(topic))
                partition = partition_for(key, known, known) if known else None
            if partition is not None:
                builder = batching.create_batch()
                added = builder.append(
                    timestamp=None, key=key, value=value, headers=message.headers
                )
                if added is not None:  # an empty batch takes any record (aiokafka's does)
                    builder.close()
                    delivery = await batching.send_batch(builder, topic, partition=partition)
                    await asyncio.wait([delivery])
                    return delivery
        future = await producer.send(
            topic, value, key=key, partition=partition, headers=message.headers
        )
        await asyncio.wait([future])
        return future

    async def _produce_records(
        self, message: Message, alone: bool = False
    ) -> list[asyncio.Future[object]]:
        """`_produce` for an "events" entry: one record per value. A record the producer
        refuses for good (too large) is dead-lettered alone and the others go; a transient
        refusal fails the entry (raised: it is sent again whole, and consumers drop the
        records that got through twice by their event ids). `alone`: each record in a
        batch of its own (`_send_alone`), delivered before the next is sent (a broker
        refuses a batch whole)."""
        futures: list[asyncio.Future[object]] = []
        try:
            for n, value in enumerate(message.records):
                try:
                    if alone:
                        futures.append(await self._send_alone(message, value))
                    else:
                        futures.append(
                            await self.producer.send(
                                message.topic, value, key=message.key, headers=message.headers
                            )
                        )
                except Exception as exc:
                    if self._transient(exc):
                        raise
                    await self._bury_record(message, n, exc)
                    # In its place, so that the futures stay aligned with the records.
                    buried: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                    buried.set_result(_DEAD_LETTERED)
                    futures.append(buried)
        except BaseException:
            for future in futures:  # published or not, their outcome is not awaited
                future.add_done_callback(_observed)
            raise
        return futures

    async def _enqueue(
        self, message: Message, partitions: dict[str, list[int]]
    ) -> list[asyncio.Future[object]] | None:
        """Queue the records of an "events" entry for the producer in record batches built
        here, one after another per partition (`_submit`): about a third of the CPU of a
        `send` per record. The futures of the batches they are in; None if the entry is to
        go by `send` (no key, or a record near the producer's size limit, which `send`
        checks). Records queued while a partition's last batch waits for the producer go
        together in the next, as the producer's own batches gather sends.

        The key goes to the partition the producer's partitioner gives it, over the same
        partitions (`partitions`: those known this call, per topic), so an entry sent
        again by `send` takes the same partition.
        """
        topic, key = message.topic, message.key
        if key is None or not fits_a_batch(message.size, self.max_request_size):
            return None
        producer = cast(BatchingProducer, self.producer)
        known = partitions.get(topic)
        if known is None:
            try:
                known = list(await producer.partitions_for(topic))
            except Exception:
                known = []  # `send` sorts the failure of each record
            partitions[topic] = known
        if not known:
            return None
        where = (topic, partition_for(key, known, known))
        queue = self._queues.setdefault(where, collections.deque())
        futures: list[asyncio.Future[object]] = []
        for value in message.records:
            batch = queue[-1] if queue else None
            if batch is None or not batch.add(key, value, message.headers):
                batch = _Batch(producer.create_batch())
                queue.append(batch)
                batch.add(key, value, message.headers)
            if not futures or futures[-1] is not batch.delivered:
                futures.append(batch.delivered)
        if where not in self._submitters:
            task = asyncio.create_task(self._submit(producer, where, queue))
            self._submitters[where] = task
        return futures

    async def _submit(
        self,
        producer: BatchingProducer,
        where: tuple[str, int],
        queue: collections.deque[_Batch],
    ) -> None:
        """Hand the batches queued for partition `where` to `producer`, in order, each once
        the one before went out; ends when none is left. A batch the producer refused
        fails its future with the refusal, sorted by `_settle` for each entry in it."""
        topic, partition = where
        try:
            while queue:
                batch = queue.popleft()
                batch.builder.close()  # records the producer's `send` adds must not join it
                try:
                    delivery = await producer.send_batch(batch.builder, topic, partition=partition)
                except asyncio.CancelledError:
                    batch.delivered.cancel()
                    raise
                except Exception as exc:
                    batch.delivered.set_exception(exc)
                    continue
                delivery.add_done_callback(functools.partial(_pass_on, batch.delivered))
        finally:
            del self._submitters[where]
            while queue:  # cancelled (stopping): not published, the leases run out
                queue.popleft().delivered.cancel()
            if self._queues.get(where) is queue:
                del self._queues[where]

    async def _bury_record(self, message: Message, n: int, exc: BaseException) -> None:
        """Dead-letter record `n` of an "events" entry alone."""
        self.stats.dead += 1
        value = message.records[n]
        event = Message(message.shard, f"{message.id}.{n}", message.topic, message.key, value,
                        message.headers, "event")  # fmt: skip
        await self._bury(event, exc)

    async def _records_outcome(self, message: Message, results: list[object]) -> object:
        """The outcome of an "events" entry from its records' (in order): what
        `_deciding_failure` picks if it is a cancellation or transient; else the records
        refused for good are dead-lettered one by one, and then the entry is done (None),
        or the failure to dead-letter them is its outcome."""
        failure = self._deciding_failure(results)
        if failure is None or isinstance(failure, asyncio.CancelledError):
            return failure
        if self._transient(failure):
            return failure
        try:
            for n, result in enumerate(results):
                if isinstance(result, BaseException):
                    await self._bury_record(message, n, result)
        except Exception as exc:
            return exc
        return None

    def _deciding_failure(self, results: list[object]) -> BaseException | None:
        """Of the outcomes of an entry's records, or of the batches built here that hold
        them, the one that decides the entry: a cancellation (the producer is stopping:
        the entry stays), else a transient failure (it is sent again whole), else any
        other failure, else None (all delivered)."""
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                return failure
        for failure in failures:
            if self._transient(failure):
                return failure
        return failures[0] if failures else None

    async def _settle(self, sent: Sequence[_Sent], singly: bool = False) -> None:
        """Sort the outcome of each entry `send` handed over. `singly`: they were sent
        one at a time, each in a batch of its own."""
        futures = {id(f): f for _, fs, _ in sent for f in fs}  # batches are shared
        gathered = await asyncio.gather(*futures.values(), return_exceptions=True)
        outcomes = dict(zip(futures, gathered, strict=True))
        done = []
        again: list[Message] = []
        for message, records, batched in sent:
            results = [outcomes[id(f)] for f in records]
            result: object
            if batched:
                result, published = self._deciding_failure(results), len(message.records)
            elif len(records) == 1:
                result, published = results[0], 1
                if result is _DEAD_LETTERED:
                    result, published = None, 0
            else:
                result = await self._records_outcome(message, results)
                published = sum(
                    r is not _DEAD_LETTERED and not isinstance(r, BaseException) for r in results
                )
            slot = (message.shard, message.id)
            if isinstance(result, asyncio.CancelledError):
                # The producer is stopping: the entry stays, and its lease runs out.
                self._inflight.pop(slot, None)
                continue
            if (
                (batched or (len(records) == 1 and not singly))
                and isinstance(result, BaseException)
                and not self._transient(result)
            ):
                # Refused for good: for this entry's records, or another's in the batch
                # (ours, or the one the producer gathered its `send`s in: a broker refuses
                # a batch whole)? Sent again by `send`, one record at a time, where a
                # refusal is its own.
                again.append(message)
                continue
            if isinstance(result, BaseException):
                await self._failed(message, result)
                continue
            self._inflight.pop(slot, None)
            self._tries.pop(slot, None)
            self.published += published
            if message.shard >= 0:
                done.append(slot)
        if done:
            self._acked += done
            if self._clearing is None:
                self._clearing = task = asyncio.create_task(self._clear(), name="outbox-clear")
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        if again:
            await self._send_again(again)

    async def _send_again(self, entries: list[Message]) -> None:
        """Send again, record by record, the entries of a batch refused for good. They stay
        in flight meanwhile, their leases renewed while they wait their turn; one taken
        over before its turn (`renew_inflight` let it go, and counted it) is not sent, nor
        one let go already. If sending cannot even begin (Redis unreachable while
        checking this replica still holds them), they are let go: their leases run out
        and the sweeper sends them."""
        held = [(m, self._inflight.get((m.shard, m.id))) for m in entries]
        entries = [m for m, h in held if h is not None]
        if not entries:
            return
        since = min(h[1] for _, h in held if h is not None)
        try:
            await self.send(entries, since, singly=True)
        except Exception as exc:
            for message in entries:
                self._inflight.pop((message.shard, message.id), None)
            log.warning("%d outbox entries left to the sweeper: %s", len(entries), exc)

    async def _clear(self) -> None:
        """Forget the acknowledged entries in Redis, those of every batch settled within
        `clear_ms` at once. An entry not cleared (Redis unreachable) stays until its lease
        runs out and is re-sent: a duplicate consumers drop by id, never a loss."""
        try:
            if self.clear_ms:
                await asyncio.sleep(self.clear_ms / 1000)
        finally:
            self._clearing = None
        done, self._acked = self._acked, []
        try:
            await self.store.outbox_done(done)
        except StateUnavailable as exc:
            log.warning(
                "could not clear %d outbox entries (they will be re-sent): %s", len(done), exc
            )

    async def renew_inflight(self) -> None:
        """Keep the leases of publishes still waiting for the broker, so other replicas do
        not take them over while the broker is merely slow."""
        checked = clock.monotonic()
        stale = [
            message
            for message, leased in self._inflight.values()
            if message.shard >= 0 and checked - leased > self.lease_ms / 3000
        ]
        if not stale:
            return
        held = {(m.shard, m.id) for m in await self._still_held(stale, in_flight=True)}
        for message in stale:
            slot = (message.shard, message.id)
            if slot not in self._inflight:
                continue  # settled meanwhile
            if slot in held:
                self._inflight[slot] = (message, checked)
            else:
                del self._inflight[slot]

    # -- sweeping --------------------------------------------------------------------------

    async def sweep_once(self) -> int:
        """Re-send every outbox entry whose lease expired, oldest first; returns how many.

        Shards are visited from a rotating start, and a shard that fails does not stop
        the others.
        """
        total = 0
        shards = self.store.keys.shards
        start, self._next_shard = self._next_shard, (self._next_shard + 1) % shards
        for shard in [*range(start, shards), *range(start)]:
            try:
                since = clock.monotonic()
                lease, claimed = await self.store.claim_expired(shard, self.sweep_batch)
                if claimed:
                    messages = [unframe(shard, mid, data) for mid, data in claimed]
                    for message in messages:
                        message.lease = lease
                    log.info("re-sending %d outbox messages of shard %d", len(messages), shard)
                    await self.send(messages, since)
                    total += len(messages)
            except (StateUnavailable, KafkaError) as exc:
                self.stats.sweep_failures += 1
                log.warning("outbox sweep of shard %d failed, retrying: %s", shard, exc)
        self.swept += total
        return total

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_ms / 1000)
            try:
                await self.renew_inflight()
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox sweep failed; retrying")


#: The outcome standing in for a record of an "events" entry dead-lettered when it was
#: handed to the producer.
_DEAD_LETTERED = object()


#: An entry with the producer: the futures of its records (of the batches built here that
#: hold them, shared with other entries), and whether it went in such batches.
_Sent = tuple[Message, list["asyncio.Future[object]"], bool]


class _Batch:
    """Records of the transition stream on their way to one partition, in a batch built
    here, and the future of its delivery."""

    __slots__ = ("builder", "delivered")

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.delivered: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def add(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> bool:
        """Append one record; False if the batch is full (its first record always fits)."""
        added = self.builder.append(timestamp=None, key=key, value=value, headers=headers)
        return added is not None


def _pass_on(delivered: asyncio.Future[object], delivery: asyncio.Future[object]) -> None:
    """Give `delivered` the outcome of the producer's `delivery` of its batch."""
    if delivered.done():
        return
    if delivery.cancelled():
        delivered.cancel()
    elif (exc := delivery.exception()) is not None:
        delivered.set_exception(exc)
    else:
        delivered.set_result(delivery.result())


def _observed(future: asyncio.Future[object]) -> None:
    """Take a future's outcome, so that a failure no one awaits is not reported as lost."""
    if not future.cancelled():
        future.exception()


def _undeliverable(message: Message, reason: str, code: str) -> ReplyEvent | None:
    """The error reply that fails the step whose command could not be delivered (a child
    step's request or ``compensate`` control: the step or compensation waiting for it)."""
    try:
        command = orjson.loads(message.value)
        ref = command.get("parent") or command.get("reply")
        if command.get("type") in ("request", "control") and ref:
            return ReplyEvent(
                command_id=ref["command_id"],
                workflow_id=ref["workflow_id"],
                step=ref["step"],
                attempt=ref["attempt"],
                status=ReplyStatus.ERROR,
                error=ErrorInfo(message=reason, code=code, retryable=False),
                service=CHILD_PREFIX + str(command.get("workflow"))
                if command["type"] == "request"
                else command.get("service"),
                replied_ms=now_ms(),
            )
        return ReplyEvent(
            command_id=command["command_id"],
            workflow_id=command["workflow_id"],
            step=command["step"],
            attempt=command["attempt"],
            status=ReplyStatus.ERROR,
            error=ErrorInfo(message=reason, code=code, retryable=False),
            service=command.get("service"),
            replied_ms=now_ms(),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("outbox entry %s is not a command; dead-lettered only", message.id)
        return None
