"""The runtime: decodes inbound batches, drives the engine, commits and dispatches.

It sits between the thin FastStream handlers and the pure engine. For a fetched batch it
loads every workflow it touches in one round trip, applies all of that workflow's events
in memory, commits each workflow once (all commits pipelined), then hands the outbox
messages to the producer. Kafka offsets are committed by the caller only after this
returns, i.e. after Redis has the transitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from mediator.cache import StateCache
from mediator.codec import encode, headers, now_ms
from mediator.engine import Engine, PublishResult, SendCommand, Transition, result_of
from mediator.errors import StateUnavailable, UnknownWorkflow
from mediator.keys import Keys, workflow_id_for
from mediator.metrics import Samples
from mediator.outbox import Dispatcher, Message
from mediator.state import WorkflowState
from mediator.store import Commit, CommitOutcome, Store
from mediator.workflow import Definitions
from topics.events import (
    DeadLetter,
    ErrorInfo,
    ReplyEvent,
    RequestEvent,
    ResultEvent,
    WorkflowStatus,
)
from topics.names import Topics

__all__ = ["Record", "Runtime"]

log = logging.getLogger("mediator.runtime")

MAX_CONFLICT_RETRIES = 8


class Record(Protocol):
    """The parts of a consumed Kafka record the runtime reads (aiokafka's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(slots=True)
class _Pending:
    """A workflow being advanced within one batch."""

    base: WorkflowState
    transition: Transition


class Runtime:
    """Turns batches of requests and replies into committed transitions and messages."""

    def __init__(
        self,
        *,
        definitions: Definitions,
        store: Store,
        dispatcher: Dispatcher,
        topics: Topics,
        state_cache_size: int = 100_000,
    ) -> None:
        self.cache = StateCache(state_cache_size)
        self.definitions = definitions
        self.store = store
        self.keys: Keys = store.keys
        self.dispatcher = dispatcher
        self.topics = topics
        self.engine = Engine(replies_topic=topics.replies)
        self.overhead = Samples()
        self._dead: list[DeadLetter] = []
        self.stats: dict[str, int] = {
            "requests": 0,
            "duplicates": 0,
            "replies": 0,
            "ignored_replies": 0,
            "unknown_workflow_replies": 0,
            "conflicts": 0,
            "dead_letters": 0,
            "rejected_requests": 0,
        }

    # -- requests --------------------------------------------------------------------------

    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Start a workflow for each request; re-send the result of finished duplicates."""
        received = time.perf_counter()
        now = now_ms()
        commits: list[Commit] = []
        prepared: list[list[Message]] = []
        direct: list[Message] = []
        for record in records:
            request = self._decode(record, RequestEvent)
            if request is None:
                continue
            self.stats["requests"] += 1
            try:
                workflow = self.definitions.get(request.workflow)
            except UnknownWorkflow as exc:
                self.stats["rejected_requests"] += 1
                log.warning("request %s rejected: %s", request.request_id, exc)
                direct.append(self._rejection(request, exc, now))
                continue
            wid = workflow_id_for(request.request_id)
            commit, messages = self._commit_of(self.engine.start(workflow, request, wid, now), 0)
            commits.append(commit)
            prepared.append(messages)
        results = await self.store.commit_many(commits, now)
        outgoing: list[Message] = []
        for commit, messages, result in zip(commits, prepared, results, strict=True):
            if result.outcome is CommitOutcome.COMMITTED:
                outgoing += messages
                self.cache.put(commit.state)
                continue
            self.stats["duplicates"] += 1
            current = result.current
            if current is not None and current.terminal:
                # A duplicate of a finished request: the client may have missed the result.
                direct.append(self._result_message(result_of(current), current.reply_to, "resend"))
        await self.dispatcher.send(outgoing)
        await self.dispatcher.send_now(direct + self._dead_letter_messages())
        self.overhead.add((time.perf_counter() - received) * 1000, len(commits) or 1)

    # -- replies ---------------------------------------------------------------------------

    async def handle_replies(self, records: Sequence[Record]) -> None:
        """Apply each reply to its workflow; dispatch whatever becomes ready."""
        received = time.perf_counter()
        groups: dict[str, list[ReplyEvent]] = {}
        for record in records:
            reply = self._decode(record, ReplyEvent)
            if reply is not None:
                self.stats["replies"] += 1
                groups.setdefault(reply.workflow_id, []).append(reply)
        states: dict[str, WorkflowState | None] = {wid: self.cache.get(wid) for wid in groups}
        missing = [wid for wid, state in states.items() if state is None]
        states.update(await self.store.load_many(missing))
        fresh = set(missing)
        outgoing: list[Message] = []
        for _ in range(MAX_CONFLICT_RETRIES):
            now = now_ms()
            pending, recheck = self._apply_all(groups, states, fresh, now)
            prepared = [self._commit_of(p.transition, expected_rev=p.base.rev) for p in pending]
            results = await self.store.commit_many([c for c, _ in prepared], now)
            retry: dict[str, list[ReplyEvent]] = {}
            for item, (commit, messages), result in zip(pending, prepared, results, strict=True):
                wid = item.base.workflow_id
                if result.outcome is CommitOutcome.COMMITTED:
                    outgoing += messages
                    self.cache.put(commit.state)
                else:
                    self.stats["conflicts"] += 1
                    retry[wid] = groups[wid]
                    states[wid] = result.current
                    fresh.add(wid)
                    self.cache.forget(wid)
            if recheck:
                # A cached state ignored these replies; ask Redis before dropping them.
                states.update(await self.store.load_many(recheck))
                fresh.update(recheck)
                retry.update({wid: groups[wid] for wid in recheck})
            groups = retry
            if not groups:
                break
        await self.dispatcher.send(outgoing)
        await self.dispatcher.send_now(self._dead_letter_messages())
        if outgoing:
            self.overhead.add((time.perf_counter() - received) * 1000, len(outgoing))
        if groups:
            msg = f"{len(groups)} workflows kept conflicting; their replies will be redelivered"
            raise StateUnavailable(msg)

    def _apply_all(
        self,
        groups: dict[str, list[ReplyEvent]],
        states: dict[str, WorkflowState | None],
        fresh: set[str],
        now: int,
    ) -> tuple[list[_Pending], list[str]]:
        """Transitions to commit, and workflows whose cached state must be re-read."""
        pending = []
        recheck = []
        for wid, replies in groups.items():
            base = states.get(wid)
            if base is None:
                self.stats["unknown_workflow_replies"] += len(replies)
                log.info("%d replies for unknown or expired workflow %s", len(replies), wid)
                continue
            try:
                workflow = self.definitions.get(base.workflow, base.version)
            except UnknownWorkflow as exc:
                log.error("workflow %s cannot advance: %s", wid, exc)
                continue
            merged: Transition | None = None
            state = base
            ignored = 0
            for reply in replies:
                step = self.engine.apply_reply(workflow, state, reply, now)
                if step is None:
                    ignored += 1
                    continue
                state = step.state
                merged = step if merged is None else _merge(merged, step)
            if ignored and wid not in fresh:
                recheck.append(wid)
                continue
            self.stats["ignored_replies"] += ignored
            if merged is not None:
                pending.append(_Pending(base, merged))
        return pending, recheck

    # -- encoding --------------------------------------------------------------------------

    def _commit_of(self, transition: Transition, expected_rev: int) -> tuple[Commit, list[Message]]:
        # The engine hands over a state of its own (a fork or a new one): stamp it in place.
        state = transition.state
        state.rev = expected_rev + 1
        messages = self._messages(transition)
        commit = Commit(
            state=state,
            expected_rev=expected_rev,
            outbox=[(m.id, m.frame) for m in messages],
            counters=transition.counters,
        )
        return commit, messages

    def _messages(self, transition: Transition) -> list[Message]:
        shard = self.keys.shard_of(transition.state.workflow_id)
        messages = []
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                command = effect.command
                messages.append(
                    Message(
                        shard=shard,
                        id=command.command_id,
                        topic=self.topics.service(command.service),
                        key=command.workflow_id.encode(),
                        value=encode(command),
                        headers=headers(command),
                    )
                )
            elif isinstance(effect, PublishResult):
                messages.append(
                    self._result_message(effect.result, effect.reply_to, "result", shard)
                )
        return messages

    def _result_message(
        self, result: ResultEvent, reply_to: str | None, kind: str, shard: int = -1
    ) -> Message:
        return Message(
            shard=shard,
            id=f"{kind}.{result.workflow_id or result.request_id}",
            topic=reply_to or self.topics.results,
            key=result.request_id.encode(),
            value=encode(result),
            headers=headers(result),
        )

    def _rejection(self, request: RequestEvent, exc: UnknownWorkflow, now: int) -> Message:
        result = ResultEvent(
            request_id=request.request_id,
            workflow_id=None,
            workflow=request.workflow,
            status=WorkflowStatus.FAILED,
            error=ErrorInfo(message=str(exc), code="unknown_workflow"),
            finished_ms=now,
            trace_id=request.trace_id,
        )
        return self._result_message(result, request.reply_to, "rejected")

    def _decode(self, record: Record, model: type[Any]) -> Any:
        try:
            return model.model_validate_json(record.value or b"")
        except ValidationError as exc:
            reason = _validation_reason(exc)
        self.stats["dead_letters"] += 1
        log.warning(
            "dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        self._dead.append(_dead_letter(record, reason))
        return None

    def _dead_letter_messages(self) -> list[Message]:
        dead, self._dead = self._dead, []
        return [
            Message(
                shard=-1,
                id=f"dlq.{d.source_topic}.{d.partition}.{d.offset}",
                topic=self.topics.dlq,
                key=d.key.encode() if d.key is not None else None,
                value=encode(d),
                headers=headers(d),
            )
            for d in dead
        ]


def _merge(first: Transition, second: Transition) -> Transition:
    merged = Transition(second.state, [*first.effects, *second.effects], dict(first.counters))
    for name, delta in second.counters.items():
        merged.count(name, delta)
    return merged


def _validation_reason(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error["loc"]) or "value"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def _dead_letter(record: Record, reason: str) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode(errors="replace") if record.key is not None else None,
        value=(record.value or b"").decode(errors="replace"),
        headers={k: v.decode(errors="replace") for k, v in (record.headers or ())},
        rejected_ms=now_ms(),
    )
