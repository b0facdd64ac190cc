"""The runtime: decodes inbound batches, drives the engine, commits and dispatches.

It sits between the thin FastStream handlers and the pure engine. For a fetched batch it
loads every workflow it touches in one round trip, applies all of that workflow's events
in memory, commits each workflow once (all commits pipelined), then hands the outbox
messages to the producer. Kafka offsets are committed by the caller only after this
returns, i.e. after Redis has the transitions.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import orjson
from pydantic import Field, TypeAdapter, ValidationError

from mediator import clock
from mediator.clock import now_ms
from mediator.codec import encode, headers, validation_reason
from mediator.core import audit, saga
from mediator.core.audit import AuditEvent
from mediator.core.engine import Engine, PublishResult, SendCommand, Transition, result_of
from mediator.core.parking import parking_delta
from mediator.core.routing import routing_delta
from mediator.core.signing import UNSIGNED, Keyring, Operators, SignatureError, Signatures
from mediator.core.state import WorkflowState
from mediator.core.timers import Fired
from mediator.core.workflow import Workflow
from mediator.errors import StateUnavailable, UnknownWorkflow
from mediator.logs import run_fields
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.failures import dead_letter, is_transient
from mediator.runtime.messages import Message
from mediator.runtime.metrics import Samples
from mediator.runtime.ports import Publisher, StateStore
from mediator.runtime.recording import Recorder
from mediator.runtime.registry import Registry
from mediator.runtime.routing import Router
from mediator.runtime.runlog import log_runs
from mediator.runtime.tracing import Tracing
from mediator.settings import LimitsSettings, LoadBalancingSettings
from mediator.storage.cache import StateCache
from mediator.storage.catalog import DefinitionStore
from mediator.storage.keys import Keys, workflow_id_for
from mediator.storage.store import Claimed, Commit, CommitOutcome, CommitResult, Tombstone
from topics.events import (
    ControlAction,
    ControlEvent,
    DeadLetter,
    ErrorInfo,
    HealthEvent,
    MarkEvent,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
    WorkflowStatus,
)
from topics.headers import KEY_ID, TRACEPARENT, parse_traceparent, w3c_trace_id
from topics.names import Topics

__all__ = ["Record", "Runtime"]

log = logging.getLogger("mediator.runtime")

MAX_CONFLICT_RETRIES = 8

#: What the health topic carries: services' heartbeats and the mediator's markers.
_HEALTH_TOPIC: TypeAdapter[HealthEvent | MarkEvent] = TypeAdapter(
    Annotated[HealthEvent | MarkEvent, Field(discriminator="type")]
)


#: What advances a workflow: a service's reply, one of its timers falling due, or an
#: operator's control (cancel, retry).
Event = ReplyEvent | Fired | ControlEvent


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
    workflow: Workflow | None
    #: The events it applied, for the audit log (none: the run was abandoned).
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class _Out:
    """What one call produces besides its commits: messages published directly (not
    through the outbox), dead letters, and deployment-wide counts. One per call, never
    shared: the requests and replies subscribers run concurrently on one runtime."""

    direct: list[Message] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    #: Timers (shard, name) that fired and changed nothing: removed after the batch.
    stale_timers: set[tuple[int, str]] = field(default_factory=set)
    #: The timers this call applies, as claimed (their leases: see `Claimed`).
    claimed: dict[tuple[int, str], Claimed] = field(default_factory=dict)
    #: Replies signed with a shared key that name no service (by `id`), with their
    #: records: a shared key must not answer for a service with keys of its own.
    shared: dict[int, Record] = field(default_factory=dict)
    #: Those of `shared` found forged: skipped on every pass (a conflict recomputes).
    forged: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Start:
    """A request about to start a run."""

    request: RequestEvent
    workflow: Workflow
    transition: Transition  # its state carries the request's fingerprint and origin
    commit: Commit | None = None
    messages: list[Message] = field(default_factory=list)


class Runtime:
    """Turns batches of requests and replies into committed transitions and messages.

    Bad input never raises: a record that does not decode, is too large or holds values
    the store cannot encode is dead-lettered with its reason, and whoever waits on it (the
    requester, the step) gets a clear error. What does raise is either transient
    (`StateUnavailable`, Kafka errors: the caller rewinds the batch) or unexpected (the
    caller isolates the record that causes it and dead-letters that one).
    """

    def __init__(
        self,
        *,
        definitions: DefinitionStore,
        store: StateStore,
        dispatcher: Publisher,
        topics: Topics,
        limits: LimitsSettings | None = None,
        state_cache_size: int = 100_000,
        breakers: Breakers | None = None,
        registry: Registry | None = None,
        balancing: LoadBalancingSettings | None = None,
        signatures: Signatures | None = None,
        recorder: Recorder | None = None,
        tracing: Tracing | None = None,
        replica: str = "",
        operators: Operators | None = None,
        controls_signed: bool = False,
        clients: Keyring | None = None,
        requests_signed: str = "off",
    ) -> None:
        self.cache = StateCache(state_cache_size)
        #: Each commit's stamp (`WorkflowState.stamp`): a random prefix per runtime and a
        #: counter, unique across replicas and restarts.
        self._stamp_prefix = f"{secrets.token_hex(6)}."
        self._stamps = itertools.count(1)
        #: Tallies committed transitions for the metrics. None: metrics are off.
        self.recorder = recorder
        self.tracing = tracing
        #: This replica's name, in the audit log entries it writes.
        self.replica = replica
        self.definitions = definitions
        self.store = store
        self.keys: Keys = store.keys
        self.dispatcher = dispatcher
        self.topics = topics
        self.limits = limits or LimitsSettings()
        self.engine = Engine(replies_topic=topics.replies)
        #: Circuit breakers: commands to a service whose breaker is open are parked or
        #: rerouted before their transition commits. None: every command goes.
        self.breakers = breakers
        #: The registry of service instances, fed by heartbeats. None: discovery is off.
        self.registry = registry
        #: Keys commands are signed with and replies and heartbeats checked against. None:
        #: signing is off (nothing is signed, nothing is checked).
        self.signatures = signatures
        #: Whether controls must be signed by an operator (`operators`) who may send them.
        self.controls_signed = controls_signed
        self.operators = operators
        #: Requests' signatures: ``off``, ``optional`` or ``required`` (`clients`' keys).
        self.requests_signed = requests_signed
        self.clients = clients
        self.overhead = Samples()
        #: The error boundaries of the subscribers feeding this runtime (for stats).
        self.boundaries: list[Boundary] = []
        self.stats: dict[str, int] = {
            "requests": 0,
            "duplicates": 0,
            "redelivered": 0,
            "conflicting_requests": 0,
            "replies": 0,
            "ignored_replies": 0,
            "unknown_workflow_replies": 0,
            "conflicts": 0,
            "dead_letters": 0,
            "rejected_requests": 0,
            "timers": 0,
            "stale_timers": 0,
            "controls": 0,
            "ignored_controls": 0,
            "parked": 0,
            "rerouted": 0,
            "heartbeats": 0,
            "stale_heartbeats": 0,
            "instances_down": 0,
            "rerouted_on_death": 0,
            "bad_signatures": 0,
        }
        #: Routes commands of services that heartbeat to chosen instances. None: every
        #: command goes where its key falls (discovery or load balancing off).
        self.router = (
            Router(
                registry,
                balancing,
                self.engine,
                store,
                self.stats,
                breakers.settings if breakers is not None else None,
            )
            if registry is not None and balancing is not None and balancing.enabled
            else None
        )
        #: How late timers fired (ms after their due time, Redis clock). A timer claimed
        #: again after a lease ran out counts from that lease's end, not its first due time.
        self.timer_lag = Samples()

    # -- inbound ---------------------------------------------------------------------------

    async def handle_inbound(self, records: Sequence[Record]) -> None:
        """A batch of the requests and replies topics (one consumer reads both): the
        requests start runs while the replies advance theirs, side by side, so one part's
        Redis round trip overlaps the other's work.

        If either part raises, the other still finishes first (nothing is left running
        behind the caller's rewind); a transient failure is raised before any other, so
        the whole batch is redelivered rather than split."""
        requests_topic = self.topics.requests
        requests = [r for r in records if r.topic == requests_topic]
        if len(requests) == len(records):
            await self.handle_requests(requests)
            return
        if not requests:
            await self.handle_replies(records)
            return
        replies = [r for r in records if r.topic != requests_topic]
        outcomes = await asyncio.gather(
            self.handle_requests(requests), self.handle_replies(replies), return_exceptions=True
        )
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if errors:
            raise next((e for e in errors if is_transient(e)), errors[0])

    # -- requests --------------------------------------------------------------------------

    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Start a workflow for each request; re-send the result of finished duplicates."""
        received = time.perf_counter()
        now = now_ms()
        out = _Out()
        starts: list[_Start] = []
        for record in records:
            start = self._start(record, now, out)
            if start is not None:
                await self._prepare_sends(start.workflow, start.transition, now)
                start.commit, start.messages = self._commit_of(
                    start.workflow, start.transition, None, now, [start.request]
                )
                starts.append(start)
        since = clock.monotonic()
        results = await self.store.commit_many([s.commit for s in starts if s.commit], now)
        outgoing: list[Message] = []
        committed: list[Transition] = []
        for start, result in zip(starts, results, strict=True):
            assert start.commit is not None
            if result.outcome is CommitOutcome.COMMITTED:
                for message in start.messages:
                    message.lease = result.lease
                outgoing += start.messages
                self.cache.put(start.commit.state)
                self._parked_count(start.transition)
                committed.append(start.transition)
            elif (answer := self._duplicate(start, result)) is not None:
                out.direct.append(answer)
        self._observe(committed, now)
        await self.dispatcher.send(outgoing, since)
        self.overhead.add((time.perf_counter() - received) * 1000, len(starts) or 1)
        await self._flush(out)

    def _observe(self, committed: list[Transition], now: int) -> None:
        """Tally the committed transitions' metrics, write their spans, log their news."""
        log_runs(committed)
        if self.recorder is not None:
            self.recorder.record(committed, now)
        if self.tracing is not None:
            self.tracing.record(committed)

    def _start(self, record: Record, now: int, out: _Out) -> _Start | None:
        """Decode and check one request and compute its first transition."""
        request: RequestEvent | None = self._decode(record, RequestEvent, out)
        if request is None:
            return None
        self.stats["requests"] += 1
        origin = f"{record.topic}/{record.partition}/{record.offset}"
        try:
            canonical = orjson.dumps(request.payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError as exc:
            reason = f"payload cannot be stored: {exc}"
            self._refuse(record, request, "invalid_payload", reason, origin, out)
            return None
        if (too_large := self._oversized(record, "request")) is not None:
            self._refuse(record, request, "payload_too_large", too_large, origin, out)
            return None
        client = None
        if self.requests_signed != "off":
            try:
                client = self._client(record)
            except SignatureError as exc:
                self.stats["bad_signatures"] += 1
                request = request.model_copy(update={"reply_to": None})  # not its to choose
                self._refuse(record, request, exc.code, f"rejected: {exc.reason}", origin, out)
                return None
        if request.reply_to and not self.limits.reply_to_allowed(
            request.reply_to, self.topics.results
        ):
            reason = (
                f"reply_to {request.reply_to!r} is not a topic results may go to "
                "(limits.reply_to_topics)"
            )
            request = request.model_copy(update={"reply_to": None})  # told on the results topic
            self._refuse(record, request, "reply_to_refused", reason, origin, out)
            return None
        try:
            workflow = self.definitions.definitions.get(request.workflow)
        except UnknownWorkflow as exc:
            self.stats["rejected_requests"] += 1
            log.warning(
                "request %s rejected: %s", request.request_id, exc,
                extra={"request_id": request.request_id, "workflow": request.workflow,
                       "trace_id": request.trace_id, "code": "unknown_workflow"},
            )  # fmt: skip
            out.direct.append(self._rejection(request, "unknown_workflow", str(exc), origin))
            return None
        digest = hashlib.blake2b(request.workflow.encode() + b"\0" + canonical, digest_size=12)
        wid = workflow_id_for(request.request_id)
        trace_id, parent = _trace_context(request, record.headers)
        transition = self.engine.start(workflow, request, wid, now, trace_id, parent)
        transition.state.fingerprint = digest.hexdigest()
        transition.state.origin = origin
        transition.state.client = client
        return _Start(request, workflow, transition)

    def _oversized(self, record: Record, what: str) -> str | None:
        """Why `record` is over the size limit, or None when it is within it."""
        size = len(record.value or b"")
        limit = self.limits.max_message_bytes
        if size <= limit:
            return None
        return (
            f"{what} is {size} bytes, over the {limit}-byte limit "
            "(limits.max_message_bytes); send large data by reference"
        )

    def _refuse(
        self,
        record: Record,
        request: RequestEvent,
        code: str,
        reason: str,
        origin: str,
        out: _Out,
    ) -> None:
        self.stats["rejected_requests"] += 1
        log.warning(
            "request %s refused: %s", request.request_id, reason,
            extra={"request_id": request.request_id, "workflow": request.workflow,
                   "trace_id": request.trace_id, "code": code},
        )  # fmt: skip
        self._dead_letter(record, reason, code, out)
        out.direct.append(self._rejection(request, code, reason, origin))

    def _duplicate(self, start: _Start, result: CommitResult) -> Message | None:
        """What to answer a request whose run already exists (or existed)."""
        self.stats["duplicates"] += 1
        request = start.request
        asked = start.transition.state  # what this request would have started
        current = result.current
        tomb: Tombstone | None = result.tombstone
        fingerprint = current.fingerprint if current is not None else tomb and tomb.fingerprint
        origin = current.origin if current is not None else tomb and tomb.origin
        if origin == asked.origin:
            # Kafka redelivered the record that started the run (a rebalance, a rewind):
            # not a new publish, so no second result.
            self.stats["redelivered"] += 1
            return None
        if fingerprint and fingerprint != asked.fingerprint:
            self.stats["conflicting_requests"] += 1
            reason = (
                f"request id {request.request_id!r} was already used for a different "
                f"workflow or payload (run {workflow_id_for(request.request_id)}); "
                "use a new request id for a new request"
            )
            log.warning("%s", reason)
            return self._rejection(request, "request_id_conflict", reason, asked.origin or "")
        if current is not None and current.terminal:
            # A duplicate of a finished request: the client may have missed the result.
            return self._result_message(result_of(current), current.reply_to, "resend")
        if tomb is not None:
            reason = (
                f"request {request.request_id!r} already ran and finished {tomb.status}; "
                "its result is past the retention (redis.retention_s) and was not kept"
            )
            return self._rejection(
                request, "result_expired", reason, asked.origin or "", WorkflowStatus(tomb.status)
            )
        return None

    # -- replies ---------------------------------------------------------------------------

    async def handle_replies(self, records: Sequence[Record]) -> None:
        """Apply each reply to its workflow; dispatch whatever becomes ready."""
        received = time.perf_counter()
        out = _Out()
        groups: dict[str, list[Event]] = {}
        for record in records:
            reply = self._reply(record, out)
            if reply is not None:
                self.stats["replies"] += 1
                groups.setdefault(reply.workflow_id, []).append(reply)
                if self.router is not None:
                    self.router.answered(reply)
        await self._advance_groups(groups, out, received)

    async def handle_timers(self, claimed: dict[int, list[Claimed]]) -> None:
        """Apply timers that fell due (per shard) through the same path as replies: a
        timer whose step moved on is stale, and is removed."""
        received = time.perf_counter()
        out = _Out()
        groups: dict[str, list[Event]] = {}
        for shard, timers in claimed.items():
            for timer in timers:
                name = timer.name
                out.claimed[(shard, name)] = timer
                fired = Fired.parse(name)
                if fired is None or self.keys.shard_of(fired.workflow_id) != shard:
                    log.error(
                        "timer %r of shard %d is not one the engine sets; removed", name, shard
                    )
                    out.stale_timers.add((shard, name))
                    continue
                self.stats["timers"] += 1
                self.timer_lag.add(timer.late_ms)
                groups.setdefault(fired.workflow_id, []).append(fired)
        await self._advance_groups(groups, out, received)

    async def handle_controls(self, records: Sequence[Record]) -> None:
        """Apply operators' controls: a cancel or retry goes to its run like a reply; a
        breaker reset is applied to the shared breaker."""
        received = time.perf_counter()
        out = _Out()
        groups: dict[str, list[Event]] = {}
        for record in records:
            control: ControlEvent | None = self._decode(record, ControlEvent, out)
            if control is None:
                continue
            if self.controls_signed:
                operator = self._operator(record, control, out)
                if operator is None:
                    continue
                control = control.model_copy(update={"operator": operator})
            self.stats["controls"] += 1
            log.info(
                "control %s: %s %s%s",
                control.control_id,
                control.action.value,
                control.workflow_id or control.service,
                f" by {control.operator}" if control.operator else "",
            )
            if control.action in (ControlAction.DRAIN, ControlAction.UNDRAIN):
                reason = await self._drain(control, out)
                if reason is None:
                    continue
            elif control.action is ControlAction.RESET_BREAKER:
                if control.service and self.breakers is not None:
                    await self.breakers.reset(control.service)
                    out.counts[f"breaker:{control.service}:reset"] += 1
                    continue
                reason = "reset_breaker needs `service`, and circuit breakers enabled"
            elif control.workflow_id:
                groups.setdefault(control.workflow_id, []).append(control)
                continue
            else:
                reason = f"{control.action.value} needs `workflow_id`"
            self._dead_letter(record, reason, "invalid", out)
        await self._advance_groups(groups, out, received)

    async def _drain(self, control: ControlEvent, out: _Out) -> str | None:
        """Apply a drain or undrain; why it cannot be, if it cannot."""
        if not (control.service and control.instance):
            return f"{control.action.value} needs `service` and `instance`"
        if self.registry is None:
            return f"{control.action.value} needs discovery enabled"
        on = control.action is ControlAction.DRAIN
        status = await self.registry.drain(control.service, control.instance, on)
        if status is None:
            return f"no instance {control.instance!r} of {control.service!r} is registered"
        out.counts[f"instance:{control.service}:{control.action.value}ed"] += 1
        await self.registry.refresh([control.service])
        return None

    async def handle_health(self, records: Sequence[Record]) -> None:
        """Record services' heartbeats in the registry, and how far each partition of the
        health topic has been read (its markers: `mediator.runtime.liveness`); a record
        that does not validate is dead-lettered with its reason."""
        out = _Out()
        beats: list[HealthEvent] = []
        marks: dict[int, int] = {}
        read: dict[int, tuple[int, int]] = {}
        for record in records:
            first, last = read.get(record.partition, (record.offset, record.offset))
            read[record.partition] = (min(first, record.offset), max(last, record.offset))
            signed, signer = self._signer(record, out)
            if not signed:
                continue
            event: HealthEvent | MarkEvent | None = self._decode(record, _HEALTH_TOPIC, out)
            if event is None:
                continue
            if isinstance(event, MarkEvent):
                marks[record.partition] = max(marks.get(record.partition, 0), event.t_ms)
                continue
            if (reason := self._not_from(event.service, signer)) is not None:
                self._forged(record, f"heartbeat of {reason}", out)
                continue
            beats.append(event)
        if records and self.registry is not None:
            stale = self.registry.stale
            changes = await self.registry.apply(beats, marks, read)
            self.stats["stale_heartbeats"] += self.registry.stale - stale
            self.stats["heartbeats"] += len(beats)
            out.counts["heartbeats"] += len(beats)
            for change in changes:
                out.counts[f"instance:{change.service}:{change.what.replace(' ', '_')}"] += 1
        await self._flush(out)

    async def _prepare_sends(
        self, workflow: Workflow | None, transition: Transition, now: int
    ) -> None:
        """Before `transition` commits: the breakers hold back or reroute its commands,
        then the router addresses the rest to chosen instances."""
        await self._gate(workflow, transition, now)
        if self.router is not None:
            self.router.route(transition)

    async def _gate(self, workflow: Workflow | None, transition: Transition, now: int) -> None:
        """Before `transition` commits: hold back (park) or reroute each command to a
        service whose breaker is open; let one probe through a breaker ready for it."""
        breakers = self.breakers
        if breakers is None or workflow is None or not breakers.enabled:
            return
        for effect in [e for e in transition.effects if isinstance(e, SendCommand)]:
            command = effect.command
            service = command.service
            decision = breakers.gate(service, now)
            if decision == "send":
                continue
            step = workflow.steps.get(command.step)
            if step is None or step.service != service:
                continue  # a compensation: undo goes out whatever the breaker says
            if decision == "probe":
                hold = step.timeout_ms or breakers.settings.probe_timeout
                if await breakers.take_probe(service, now, hold):
                    continue
            if (
                step.fallback is not None
                and breakers.gate(step.fallback.service, now) == "send"
                and self.engine.reroute(workflow, transition, command.command_id)
            ):
                transition.count("rerouted")
                continue
            await breakers.note_parking(service)
            self.engine.park(transition, command.command_id)

    def _parked_count(self, transition: Transition) -> None:
        if transition.parked:
            self.stats["parked"] += len(transition.parked)
        if (rerouted := transition.counters.get("rerouted")) is not None:
            self.stats["rerouted"] += rerouted

    async def _record(
        self,
        outcomes: list[tuple[str, bool]],
        by_instance: list[tuple[str, str, bool]],
        out: _Out,
    ) -> None:
        """Tell the breakers (of services, and of instances) what the committed
        transitions learnt. The transitions are committed already: a Redis failure here is
        logged, not raised (the breakers miss these outcomes; their state is advisory)."""
        if self.router is not None and by_instance:
            for change in self.router.record(by_instance):
                out.counts[change] += 1
        if not outcomes or self.breakers is None:
            return
        try:
            await self.breakers.record(outcomes)
        except Exception as exc:
            self.breakers.stats["errors"] += 1
            log.warning("breakers: %d outcomes not recorded: %s", len(outcomes), exc)

    async def _advance_groups(
        self, groups: dict[str, list[Event]], out: _Out, received: float
    ) -> None:
        """Apply each workflow's events, commit (recomputing on conflicts), dispatch."""
        states: dict[str, WorkflowState | None] = {wid: self.cache.get(wid) for wid in groups}
        missing = [wid for wid, state in states.items() if state is None]
        states.update(await self.store.load_many(missing))
        fresh = set(missing)
        outgoing: list[Message] = []
        outcomes: list[tuple[str, bool]] = []
        by_instance: list[tuple[str, str, bool]] = []
        committed: list[Transition] = []
        since = clock.monotonic()
        for _ in range(MAX_CONFLICT_RETRIES):
            now = now_ms()
            pending, recheck = await self._apply_all(groups, states, fresh, now, out)
            for item in pending:
                await self._prepare_sends(item.workflow, item.transition, now)
            prepared = [
                self._commit_of(p.workflow, p.transition, p.base, now, p.events) for p in pending
            ]
            results = await self.store.commit_many([c for c, _ in prepared], now)
            retry: dict[str, list[Event]] = {}
            for item, (commit, messages), result in zip(pending, prepared, results, strict=True):
                wid = item.base.workflow_id
                if result.outcome is CommitOutcome.COMMITTED:
                    for message in messages:
                        message.lease = result.lease
                    outgoing += messages
                    self.cache.put(commit.state)
                    outcomes += item.transition.outcomes
                    by_instance += item.transition.instance_outcomes
                    self._parked_count(item.transition)
                    committed.append(item.transition)
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
        self._observe(committed, now_ms())
        await self.dispatcher.send(outgoing, since)
        if outgoing:  # the commands are the producer's now: what follows does not delay them
            self.overhead.add((time.perf_counter() - received) * 1000, len(outgoing))
        await self._record(outcomes, by_instance, out)
        await self._flush(out)
        if out.stale_timers:
            self.stats["stale_timers"] += len(out.stale_timers)
            await self.store.timers_done(
                [(shard, out.claimed[(shard, name)]) for shard, name in sorted(out.stale_timers)]
            )
        if groups:
            msg = f"{len(groups)} workflows kept conflicting; their events will be redelivered"
            raise StateUnavailable(msg)

    def _reply(self, record: Record, out: _Out) -> ReplyEvent | None:
        """Decode one reply. A reply too large or holding values the store cannot encode
        is dead-lettered, and its step fails with that error instead of waiting."""
        signed, signer = self._signer(record, out)
        if not signed:
            return None
        reply: ReplyEvent | None = self._decode(record, ReplyEvent, out)
        if reply is None:
            return None
        # A shared key, and no service named: whose step it answers is known once its run
        # is loaded (`_unattributed`).
        shared = False
        if signer is not None and reply.service is None:
            # Signed with a service's own key: it can only answer that service's steps.
            reply = reply.model_copy(update={"service": signer})
        elif reply.service is not None:
            if (reason := self._not_from(reply.service, signer)) is not None:
                self._forged(record, f"reply from {reason}", out)
                return None
        else:
            shared = self.signatures is not None and self.signatures.has_own_keys()
        problem: tuple[str, str] | None = None
        if (too_large := self._oversized(record, "reply")) is not None:
            problem = ("payload_too_large", too_large)
        elif reply.output is not None:
            try:
                orjson.dumps(reply.output)
            except orjson.JSONEncodeError as exc:
                problem = ("invalid_output", f"reply output cannot be stored: {exc}")
        if problem is not None:
            code, reason = problem
            self._dead_letter(record, reason, code, out)
            error = ErrorInfo(message=reason, code=code, retryable=False, step=reply.step)
            reply = reply.model_copy(
                update={"status": ReplyStatus.ERROR, "output": None, "error": error}
            )
        if shared:
            out.shared[id(reply)] = record
        return reply

    async def _apply_all(
        self,
        groups: dict[str, list[Event]],
        states: dict[str, WorkflowState | None],
        fresh: set[str],
        now: int,
        out: _Out,
    ) -> tuple[list[_Pending], list[str]]:
        """Transitions to commit, and workflows whose cached state must be re-read."""
        pending = []
        recheck = []
        plans = await self.definitions.get_many(
            {(s.workflow, s.version) for s in states.values() if s is not None}
        )
        unknown = 0
        for wid, events in groups.items():
            base = states.get(wid)
            timers = [e for e in events if isinstance(e, Fired)]
            if base is None:
                unknown += len(events) - len(timers) - self._no_run(wid, events)
                out.stale_timers.update((self.keys.shard_of(wid), t.member) for t in timers)
                continue
            workflow = plans.get((base.workflow, base.version))
            if workflow is None:
                if base.terminal:
                    out.stale_timers.update((self.keys.shard_of(wid), t.member) for t in timers)
                    continue
                pending.append(self._abandon(base, now))
                continue
            merged: Transition | None = None
            state = base
            ignored: list[Event] = []
            applied: list[Event] = []
            for event in events:
                if out.shared and self._unattributed(workflow, state, event, out):
                    continue
                step = self._apply(workflow, state, event, now)
                if step is None:
                    ignored.append(event)
                    continue
                applied.append(event)
                state = step.state
                merged = step if merged is None else merged.then(step)
            if ignored and wid not in fresh:
                recheck.append(wid)
                continue
            self._ignored(wid, state, ignored, out)
            if merged is not None:
                pending.append(_Pending(base, merged, workflow, applied))
        if unknown:
            # Redis lost these runs (restarted empty, failed over) or they expired:
            # counted where ops look, and `mediator recover` restarts lost runs.
            self.stats["unknown_workflow_replies"] += unknown
            out.counts["replies:unknown_workflow"] += unknown
            log.warning("%d replies for workflows Redis does not have", unknown)
        return pending, recheck

    def _unattributed(
        self, workflow: Workflow, state: WorkflowState, event: Event, out: _Out
    ) -> bool:
        """Whether `event` is a reply signed with a shared key, naming no service, for a
        step whose service has keys of its own: then it is forged, and dead-lettered."""
        if id(event) in out.forged:
            return True
        record = out.shared.get(id(event))
        if record is None or not isinstance(event, ReplyEvent) or self.signatures is None:
            return False
        step, step_state = workflow.steps.get(event.step), state.steps.get(event.step)
        if step is None or step_state is None:
            return False
        if step_state.command_id == event.command_id:
            service: str | None = step_state.via or step.service
        else:
            undo = saga.compensation(step, step_state)
            service = undo.service if undo is not None else None
        if service is None or not self.signatures.has_own_keys(service):
            return False
        out.forged.add(id(event))
        self._forged(record, f"reply for {service!r} signed with a shared key, but it has "
                             "keys of its own", out)  # fmt: skip
        return True

    def _apply(
        self, workflow: Workflow, state: WorkflowState, event: Event, now: int
    ) -> Transition | None:
        if isinstance(event, Fired):
            return self.engine.apply_timer(workflow, state, event, now)
        if isinstance(event, ControlEvent):
            return self.engine.apply_control(workflow, state, event, now)
        return self.engine.apply_reply(workflow, state, event, now)

    def _no_run(self, wid: str, events: list[Event]) -> int:
        """Log and count the controls among `events` for a run Redis does not have."""
        controls = [e for e in events if isinstance(e, ControlEvent)]
        for control in controls:
            log.warning("control %s: there is no run %s", control.control_id, wid)
        self.stats["ignored_controls"] += len(controls)
        return len(controls)

    def _ignored(self, wid: str, state: WorkflowState, ignored: list[Event], out: _Out) -> None:
        """Count events that changed nothing; a stale timer is removed after the batch."""
        stale = [(self.keys.shard_of(wid), e.member) for e in ignored if isinstance(e, Fired)]
        out.stale_timers.update(stale)
        controls = [e for e in ignored if isinstance(e, ControlEvent)]
        for control in controls:
            log.warning(
                "control %s (%s) does not apply to run %s, which is %s",
                control.control_id,
                control.action.value,
                wid,
                state.status.value,
            )
        self.stats["ignored_controls"] += len(controls)
        self.stats["ignored_replies"] += len(ignored) - len(stale) - len(controls)

    def _abandon(self, base: WorkflowState, now: int) -> _Pending:
        """A run whose definition is neither loaded nor stored cannot advance: fail it,
        saying so, rather than leave it running for ever."""
        reason = (
            f"definition {base.workflow}@{base.version} is neither loaded nor stored in "
            "Redis, so this run cannot advance; deploy that version again and retry"
        )
        log.error(
            "workflow %s failed: %s", base.workflow_id, reason,
            extra=run_fields(base, code="unknown_definition"),
        )  # fmt: skip
        error = {"message": reason, "code": "unknown_definition"}
        return _Pending(base, self.engine.abandon(base, error, now), None)

    # -- encoding --------------------------------------------------------------------------

    def _commit_of(
        self,
        workflow: Workflow | None,
        transition: Transition,
        base: WorkflowState | None,
        now: int,
        events: Sequence[AuditEvent] = (),
    ) -> tuple[Commit, list[Message]]:
        """The commit of `transition` from `base` (None: a new run), and its messages,
        each within the size limit: a command or result that would be too large fails its
        step or run instead."""
        expected_rev = base.rev if base is not None else 0
        messages = self._messages(transition)
        limit = self.limits.max_message_bytes - 1024  # room for the record framing
        while (big := next((m for m in messages if m.size > limit), None)) is not None:
            error = {
                "message": f"{big.kind} {big.id} would be {big.size} bytes, over the "
                f"{self.limits.max_message_bytes}-byte limit (limits.max_message_bytes); "
                "pass large data by reference",
                "code": "payload_too_large",
            }
            log.warning(
                "workflow %s: %s", transition.state.workflow_id, error["message"],
                extra=run_fields(transition.state, code="payload_too_large"),
            )  # fmt: skip
            if big.kind == "command" and workflow is not None:
                transition = self.engine.refuse_command(workflow, transition, big.id, error, now)
            else:
                transition = self.engine.refuse_result(transition, error, now)
            messages = self._messages(transition)
        # The engine hands over a state of its own (a fork or a new one): stamp it in place.
        state = transition.state
        state.rev = expected_rev + 1
        state.stamp = f"{self._stamp_prefix}{next(self._stamps):x}"
        commit = Commit(
            state=state,
            expected_rev=expected_rev,
            expected_stamp=(base.stamp or "") if base is not None else "",
            outbox=[(m.id, m.frame) for m in messages],
            counters=transition.counters,
            timers=[(t.member, t.delay_ms) for t in transition.timers],
            cleared=transition.cleared,
            parked=parking_delta(workflow, base, state, transition.parked),
            routed=routing_delta(workflow, base, state) if self.router is not None else (),
            audit=audit.entries(events, transition, now, self.replica)
            if self.store.audit_limit
            else (),
        )
        return commit, messages

    def _messages(self, transition: Transition) -> list[Message]:
        shard = self.keys.shard_of(transition.state.workflow_id)
        messages = []
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                command = effect.command
                value = encode(command)
                signed = headers(command)
                topic, key = self.topics.service(command.service), command.workflow_id.encode()
                if self.signatures is not None:
                    signed += self.signatures.sign(command.service, value, topic, key)
                messages.append(
                    Message(
                        shard,
                        command.command_id,
                        topic,
                        key,
                        value,
                        signed,
                        "command",
                        partition=effect.partition,
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
            shard,
            f"{kind}.{result.workflow_id or result.request_id}",
            reply_to or self.topics.results,
            result.request_id.encode(),
            encode(result),
            headers(result),
        )

    def _rejection(
        self,
        request: RequestEvent,
        code: str,
        reason: str,
        origin: str,
        status: WorkflowStatus = WorkflowStatus.FAILED,
    ) -> Message:
        result = ResultEvent(
            result_id=f"{code}@{origin}",
            request_id=request.request_id,
            workflow_id=None,
            workflow=request.workflow,
            status=status,
            error=ErrorInfo(message=reason, code=code),
            finished_ms=now_ms(),
            trace_id=request.trace_id,
        )
        return self._result_message(result, request.reply_to, "rejected")

    def _signer(self, record: Record, out: _Out) -> tuple[bool, str | None]:
        """Whether `record` may be applied, and whose key signed it: a service's name, or
        None for a shared key (or signing off). One no key of ours signed is
        dead-lettered."""
        if self.signatures is None:
            return True, None
        try:
            key = self.signatures.check(record.value, record.headers, record.topic, record.key)
            return True, key.service
        except SignatureError as exc:
            self._forged(record, exc.reason, out, exc.code)
            return False, None

    def _client(self, record: Record) -> str | None:
        """The client whose key signed a request; None for an unsigned one when signatures
        are optional. `SignatureError` when it may not be taken."""
        names = {name for name, _ in record.headers or ()}
        if KEY_ID not in names and self.requests_signed == "optional":
            return None
        if self.clients is None:
            msg = "requests must be signed by a client, and no client has keys (signing.clients)"
            raise SignatureError(UNSIGNED, msg)
        key = self.clients.check(record.value, record.headers, record.topic, record.key)
        return key.service

    def _operator(self, record: Record, control: ControlEvent, out: _Out) -> str | None:
        """The operator who signed `control`, or None when no operator may have sent it
        (dead-lettered: unsigned, forged, not theirs to send, or stale)."""
        if self.operators is None:
            reason = "controls must be signed by an operator, and none is configured"
            self._forged(record, f"{reason} (signing.operators)", out, UNSIGNED)
            return None
        try:
            return self.operators.authorise(
                record.value, record.headers, record.topic, record.key,
                control.action.value, control.issued_ms, now_ms(),
            )  # fmt: skip
        except SignatureError as exc:
            self._forged(record, exc.reason, out, exc.code)
            return None

    def _forged(self, record: Record, reason: str, out: _Out, code: str = "bad_signature") -> None:
        """Dead-letter a record whose signature does not hold: it is never applied."""
        self.stats["bad_signatures"] += 1
        out.counts["bad_signatures"] += 1
        self._dead_letter(record, f"rejected: {reason}", code, out)

    def _not_from(self, service: str, signer: str | None) -> str | None:
        """Why a record of `service` signed by `signer`'s key (None: a shared key) cannot
        be its own, or None when it can: a service's own key signs only for it, and shared
        keys only for services without keys of their own."""
        if signer is not None:
            return None if signer == service else f"{service!r} signed with a key of {signer!r}"
        if self.signatures is not None and self.signatures.has_own_keys(service):
            return f"{service!r} signed with a shared key, but it has keys of its own"
        return None

    def _decode(self, record: Record, model: Any, out: _Out) -> Any:
        try:
            if isinstance(model, TypeAdapter):
                return model.validate_json(record.value or b"")
            return model.model_validate_json(record.value or b"")
        except ValidationError as exc:
            reason = validation_reason(exc)
        self._dead_letter(record, reason, "invalid", out)
        return None

    def _dead_letter(self, record: Record, reason: str, code: str, out: _Out) -> None:
        self.stats["dead_letters"] += 1
        out.counts["dead_letters"] += 1
        out.counts[f"dead_letters:{code}"] += 1
        log.warning(
            "dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        out.dead.append(
            dead_letter(
                reason=reason,
                code=code,
                topic=record.topic,
                value=record.value,
                key=record.key,
                headers=record.headers or (),
                partition=record.partition,
                offset=record.offset,
                excerpt_bytes=self.limits.excerpt_bytes,
            )
        )

    async def reject(self, record: Record, reason: str, code: str = "unprocessable") -> None:
        """Dead-letter one record now (the batch boundary found it cannot be processed);
        a request's requester gets a failed result that says why."""
        out = _Out()
        self._dead_letter(record, reason, code, out)
        if record.topic == self.topics.requests:
            try:
                request = RequestEvent.model_validate_json(record.value or b"")
            except ValidationError:
                pass
            else:
                origin = f"{record.topic}/{record.partition}/{record.offset}"
                out.direct.append(self._rejection(request, code, reason, origin))
        await self._flush(out)

    async def _flush(self, out: _Out) -> None:
        """Publish direct messages and dead letters, then count what was counted."""
        await self.dispatcher.send_now(
            out.direct
            + [
                Message(
                    -1,
                    f"dlq.{d.source_topic}.{d.partition}.{d.offset}",
                    self.topics.dlq,
                    d.key.encode() if d.key is not None else None,
                    encode(d),
                    headers(d),
                    "dead_letter",
                )
                for d in out.dead
            ]
        )
        if out.counts:
            await self.store.count(dict(out.counts))


def _trace_context(
    request: RequestEvent, headers: Sequence[tuple[str, bytes]]
) -> tuple[str | None, str | None]:
    """(trace id, parent span id) from the request's W3C ``traceparent`` header, if it has
    a valid one that agrees with the request's own ``trace_id`` (the value wins)."""
    for name, value in headers:
        if name == TRACEPARENT:
            parsed = parse_traceparent(value)
            if parsed is None:
                return None, None
            trace, parent, _ = parsed
            if request.trace_id and w3c_trace_id(request.trace_id) != trace:
                return None, None
            return trace, parent
    return None, None
