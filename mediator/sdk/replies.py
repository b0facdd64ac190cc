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
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the queued replies to the producer, without waiting for it: a key goes
        where the producer's partitioner puts it, over the same partitions, and each
        batch is handed over by a task of its own, so a partition the producer has no
        room in yet holds up no other. A reply to a topic the producer knows no
        partitions of yet, or near its size limit (`fits_a_batch`), goes alone, by
        `send`, in a task of its own."""
        self._flush_due = False
        replies, self._outgoing = self._outgoing, []
        producer = self._producer
        if not replies or producer is None:
            return  # stopped: not committed, consumed again later
        limit = self._producer_options.get("max_request_size", DEFAULT_MAX_REQUEST_SIZE)
        batches: dict[tuple[str, int], tuple[Any, list[Queued]]] = {}
        for queued in replies:
            command, reply, tp, offset = queued
            try:
                key = command.workflow_id.encode()
                headers = self._reply_headers(command, reply)
                size = len(key) + len(reply) + sum(len(k) + len(v) for k, v in headers)
                known = producer.client.cluster.partitions_for_topic(command.reply_to)
                if not known or not fits_a_batch(size, limit):
                    self._spawn(self._send_one(queued, key, headers), tp, offset)
                    continue
                where = (command.reply_to, partition_for(key, list(known), ()))
                batch = batches.get(where)
                if (
                    batch is None
                    or batch[0].append(timestamp=None, key=key, value=reply, headers=headers)
                    is None
                ):
                    self._submit(producer, where, batch)
                    batch = batches[where] = (producer.create_batch(), [])
                    batch[0].append(timestamp=None, key=key, value=reply, headers=headers)
                batch[1].append(queued)
            except Exception as exc:
                # As a command whose handling raised (signing, say): logged, and the
                # partition's commits are not held by it.
                log.error("reply to %s failed: %r", command.reply_to, exc)
                self._done(tp, offset)
        for where, batch in batches.items():
            self._submit(producer, where, batch)

    def _submit(
        self, producer: Any, where: tuple[str, int], batch: tuple[Any, list[Queued]] | None
    ) -> None:
        """Hand `batch` (its builder and its replies) to `producer` for partition `where`,
        by a task; nothing if there is none. Tasks started in order reach the producer in
        order, so a partition's batches keep the order of their replies."""
        if batch is None or not batch[1]:
            return
        builder, members = batch
        topic, partition = where
        builder.close()  # a reply sent alone by `send` must not join it
        task = asyncio.ensure_future(producer.send_batch(builder, topic, partition=partition))
        self._submits.add(task)
        task.add_done_callback(functools.partial(self._submitted, members))

    def _submitted(self, members: list[Queued], task: asyncio.Future[Any]) -> None:
        self._submits.discard(task)
        if task.cancelled():
            return  # stopped: not committed, consumed again later
        if task.exception() is not None:
            # Not taken (the producer found no room in time, or the partition is gone):
            # each is sent again alone, by `send`, which sorts its own failure.
            self._resend_each(members)
            return
        task.result().add_done_callback(functools.partial(self._batch_delivered, members))

    def _batch_delivered(self, members: list[Queued], delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            return  # the producer stopped first: not committed, consumed again later
        exc = delivery.exception()
        if exc is None:
            for _, _, tp, offset in members:
                self._done(tp, offset)
            return
        if not isinstance(exc, KafkaError):
            # Not a broker's answer, so not one to retry: logged, and the partition's
            # commits are not held by them (as a command whose handling raised).
            log.error("%d replies failed: %r", len(members), exc)
            for _, _, tp, offset in members:
                self._done(tp, offset)
            return
        if not exc.retriable and len(members) > 1:
            # Refused for good, but for which of them? Each is sent again alone.
            self._resend_each(members)
            return
        for command, reply, tp, offset in members:
            self._spawn(self._resend(command, reply, tp, offset, exc), tp, offset)

    def _resend_each(self, members: list[Queued]) -> None:
        """Send `members` again one after another, each waited for before the next, so
        that each is a batch of its own and a refusal is its own (`_resend` without a
        failure)."""

        async def each() -> None:
            for command, reply, tp, offset in members:
                await self._resend(command, reply, tp, offset, None)

        _, _, tp, offset = members[0]
        self._spawn(each(), tp, offset)

    async def _send_one(self, queued: Queued, key: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Hand one reply (its key and signed headers) to the producer by `send`; its
        delivery is settled as a batch of one's."""
        assert self._producer is not None
        command, reply, tp, offset = queued
        try:
            delivery = await self._producer.send(command.reply_to, reply, key=key, headers=headers)
        except KafkaError as exc:
            return self._spawn(self._resend(command, reply, tp, offset, exc), tp, offset)
        delivery.add_done_callback(functools.partial(self._batch_delivered, [queued]))

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
