"""How a service worker takes a command it fetched: signature and addressee checked,
decoded, deduplicated (a redelivered command gets its earlier reply; another attempt of
idempotent work done gets that work's reply), refused when long past its deadline, and
its action run once, its reply remembered and sent."""

from __future__ import annotations

import asyncio
import logging
import re

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from mediator import clock, codec
from mediator.core.signing import SignatureError
from mediator.sdk.heartbeat import Heartbeats
from mediator.sdk.replies import final as _final
from mediator.sdk.replies import readdressed as _readdressed
from topics.events import TOPIC_NAME, CommandEvent

__all__ = ["Intake"]

log = logging.getLogger("mediator.worker")

_TOPIC_NAME = re.compile(TOPIC_NAME)


class Intake(Heartbeats):
    """Takes fetched commands and runs each once."""

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
            command.command_id,
            late,
            extra={"service": self.service},
        )
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
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
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
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        letter = codec.dead_letter(
            reason=reason,
            code=exc.code,
            topic=record.topic,
            value=record.value,
            key=record.key,
            headers=record.headers,
            partition=record.partition,
            offset=record.offset,
        )
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self.topics.dlq,
                codec.encode(letter),
                key=record.key,
                headers=codec.headers(letter),
            )
        except KafkaError as error:
            log.error("dead letter of a rejected command not delivered: %r", error)
        self._done(tp, record.offset)
