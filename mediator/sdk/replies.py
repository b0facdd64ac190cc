"""A worker's replies: built, signed and sent, retried with capped backoff, and made a
small error reply when the broker refuses one for good."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import orjson
from aiokafka import (
    TopicPartition,
)
from aiokafka.errors import KafkaError

from mediator import clock, codec
from mediator.producers import DEFAULT_MAX_REQUEST_SIZE, fits_a_batch, partition_for
from mediator.sdk.inflight import InFlight, Queued
from topics.events import (
    SCHEMA_VERSION,
    CommandEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
)
from topics.headers import headers_for

__all__ = ["Replies", "final", "readdressed"]

log = logging.getLogger("mediator.worker")


class Replies(InFlight):
    """Builds, signs and sends replies."""

    def _signed(
        self, headers: list[tuple[str, bytes]], value: bytes, topic: str, key: bytes | None
    ) -> list[tuple[str, bytes]]:
        if self.keys is None:
            return headers
        return headers + self.keys.headers(value, topic, key, self.legacy_signatures)

    async def _send(
        self, command: CommandEvent, reply: bytes, tp: TopicPartition, offset: int
    ) -> None:
        """Queue the reply for the producer; its offset is done once the broker has it.

        The replies queued while the event loop goes round once (a fetched batch's
        commands that finish at once, say) go together, in record batches built per
        partition (`_flush`): about a third of the CPU of a `send` each."""
        self._outgoing.append((command, reply, tp, offset))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=f"replies:{self.service}")

    async def _flush(self) -> None:
        """Hand the queued replies to the producer until none is left."""
        try:
            while self._outgoing:
                replies, self._outgoing = self._outgoing, []
                await self._hand_over(replies)
        finally:
            self._flusher = None

    async def _hand_over(self, replies: list[Queued]) -> None:
        """`_flush` for one lot of replies: a key goes where the producer's partitioner
        puts it, over the same partitions; a reply to a topic whose partitions the
        producer cannot tell, or near its size limit (`fits_a_batch`), goes alone, by
        `send`."""
        producer = self._producer
        assert producer is not None
        limit = self._producer_options.get("max_request_size", DEFAULT_MAX_REQUEST_SIZE)
        partitions: dict[str, list[int]] = {}
        batches: list[tuple[Any, str, int, list[Queued]]] = []
        open_batches: dict[tuple[str, int], tuple[Any, str, int, list[Queued]]] = {}
        for queued in replies:
            command, reply, tp, offset = queued
            topic = command.reply_to
            known = partitions.get(topic)
            if known is None:
                try:
                    known = list(await producer.partitions_for(topic))
                except KafkaError:
                    known = []
                partitions[topic] = known
            key = command.workflow_id.encode()
            headers = self._reply_headers(command, reply)
            size = len(key) + len(reply) + sum(len(k) + len(v) for k, v in headers)
            if not known or not fits_a_batch(size, limit):
                await self._send_one(command, reply, tp, offset)
                continue
            partition = partition_for(key, known, known)
            batch = open_batches.get((topic, partition))
            if (
                batch is None
                or batch[0].append(timestamp=None, key=key, value=reply, headers=headers) is None
            ):
                batch = open_batches[(topic, partition)] = (
                    producer.create_batch(),
                    topic,
                    partition,
                    [],
                )
                batches.append(batch)
                batch[0].append(timestamp=None, key=key, value=reply, headers=headers)
            batch[3].append(queued)
        for builder, topic, partition, members in batches:
            try:
                delivery = await producer.send_batch(builder, topic, partition=partition)
            except KafkaError as exc:
                for command, reply, tp, offset in members:
                    self._spawn(self._resend(command, reply, tp, offset, exc), tp, offset)
                continue
            except Exception as exc:
                # Not a broker's answer: as a command whose handling raised, logged, and
                # the partition's commits are not held by them.
                log.error("%d replies to %s failed: %r", len(members), topic, exc)
                for _, _, tp, offset in members:
                    self._done(tp, offset)
                continue
            delivery.add_done_callback(functools.partial(self._batch_delivered, members))

    def _batch_delivered(self, members: list[Queued], delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            return  # the producer stopped first: not committed, consumed again later
        exc = delivery.exception()
        if exc is None:
            for _, _, tp, offset in members:
                self._done(tp, offset)
            return
        if not isinstance(exc, KafkaError):
            log.error("%d replies failed: %r", len(members), exc)
            for _, _, tp, offset in members:
                self._done(tp, offset)
            return
        # Refused for good, but for which of them? Each is sent again alone, where a
        # refusal is its own (`_resend` without a failure).
        again = None if not exc.retriable and len(members) > 1 else exc
        for command, reply, tp, offset in members:
            self._spawn(self._resend(command, reply, tp, offset, again), tp, offset)

    async def _send_one(
        self, command: CommandEvent, reply: bytes, tp: TopicPartition, offset: int
    ) -> None:
        """Hand one reply to the producer by `send`; a failed delivery goes to `_resend`."""
        assert self._producer is not None
        try:
            delivery = await self._producer.send(
                command.reply_to,
                reply,
                key=command.workflow_id.encode(),
                headers=self._reply_headers(command, reply),
            )
        except KafkaError as exc:
            return self._spawn(self._resend(command, reply, tp, offset, exc), tp, offset)
        delivery.add_done_callback(functools.partial(self._delivered, command, reply, tp, offset))

    def _delivered(
        self,
        command: CommandEvent,
        reply: bytes,
        tp: TopicPartition,
        offset: int,
        delivery: asyncio.Future[Any],
    ) -> None:
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
        self,
        command: CommandEvent,
        reply: bytes,
        tp: TopicPartition,
        offset: int,
        failure: KafkaError | None,
    ) -> None:
        """Deliver a reply whose send failed: a transient failure is retried with capped
        backoff; a reply the broker refuses for good (too large, say) is replaced, once, by
        a small error reply, so the step fails now rather than at its timeout. Without a
        `failure` (its batch was refused for good), it is first sent again alone."""
        assert self._producer is not None
        key = command.workflow_id.encode()
        backoff = 0.1
        replaced = False
        exc = failure if failure is not None else await self._deliver(command, reply, key)
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
                    command.reply_to,
                    backoff,
                    exc,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            exc = await self._deliver(command, reply, key)
        self._done(tp, offset)

    async def _deliver(self, command: CommandEvent, reply: bytes, key: bytes) -> KafkaError | None:
        """Send one reply and wait for the broker: None once it has it, else its refusal."""
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                command.reply_to, value=reply, key=key, headers=self._reply_headers(command, reply)
            )
        except KafkaError as error:
            return error
        return None

    def _undeliverable(self, command: CommandEvent, exc: KafkaError) -> bytes:
        """The error reply that stands in for a reply the broker refused for good."""
        self.stats["undeliverable"] += 1
        log.error("reply to %s refused by the broker: %r", command.reply_to, exc)
        message = f"the broker refused the reply of {self.service}.{command.action}: {exc!r}"
        return self._error(command, ErrorInfo(message=message[:1000], code="undeliverable"))

    def _ok(self, command: CommandEvent, output: Any) -> bytes:
        """The encoded ``ok`` reply: written directly when the output is plain JSON, else
        through the model (which raises `PydanticSerializationError` if it is not JSON)."""
        fields = {
            "schema_version": SCHEMA_VERSION,
            "type": "reply",
            "command_id": command.command_id,
            "workflow_id": command.workflow_id,
            "step": command.step,
            "attempt": command.attempt,
            "status": "ok",
            "output": output,
            "service": self.service,
            "instance": self.instance,
            "trace_id": command.trace_id,
            "replied_ms": clock.now_ms(),
        }
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
        self,
        command: CommandEvent,
        status: ReplyStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
    ) -> ReplyEvent:
        return ReplyEvent(
            command_id=command.command_id,
            workflow_id=command.workflow_id,
            step=command.step,
            attempt=command.attempt,
            trace_id=command.trace_id,
            status=status,
            output=output,
            error=error,
            service=self.service,
            instance=self.instance,
            replied_ms=clock.now_ms(),
        )


def final(reply: bytes) -> bool:
    """Whether a reply settles its step's work (ok, or an error that is not retryable):
    then another attempt of the same work gets it rather than running again."""
    doc = orjson.loads(reply)
    return doc.get("status") == "ok" or not (doc.get("error") or {}).get("retryable")


def readdressed(reply: bytes, command: CommandEvent) -> bytes:
    """`reply`, given for another attempt of the same work, as the reply to `command`."""
    doc = orjson.loads(reply)
    doc["command_id"], doc["attempt"] = command.command_id, command.attempt
    doc["replied_ms"] = clock.now_ms()
    return orjson.dumps(doc)
