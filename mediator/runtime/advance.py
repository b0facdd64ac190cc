"""Advancing runs: replies, timers and controls applied to each run of a batch, the
breaker gate and routing before commit, conflicts recomputed, ignored events sorted."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import orjson

from mediator import clock
from mediator.clock import now_ms
from mediator.core import saga
from mediator.core.counters import QUEUED, QUEUED_BY_KEY, REROUTED
from mediator.core.engine import SendCommand, Transition
from mediator.core.lineage import is_child_service
from mediator.core.state import Failure, WorkflowState
from mediator.core.timers import Fired
from mediator.core.workflow import Workflow
from mediator.errors import StateUnavailable
from mediator.logs import run_fields
from mediator.runtime.admission import Freed
from mediator.runtime.context import (
    MAX_CONFLICT_RETRIES,
    BatchOutput,
    Event,
    Pending,
    Record,
)
from mediator.runtime.limiting import Limiting, Taken
from mediator.runtime.messages import Message
from mediator.runtime.runlog import log_runs
from mediator.storage.store import Claimed, CommitOutcome
from topics.events import (
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
)

__all__ = ["Advance"]

log = logging.getLogger("mediator.runtime")


class Advance(Limiting):
    """Applies replies, timers and controls to the runs of a batch."""

    async def handle_replies(self, records: Sequence[Record]) -> None:
        """Apply each reply to its workflow; dispatch whatever becomes ready."""
        received = time.perf_counter()
        out = BatchOutput()
        groups: dict[str, list[Event]] = {}
        for record in records:
            reply = self._reply(record, out)
            if reply is not None:
                self.stats.replies += 1
                groups.setdefault(reply.workflow_id, []).append(reply)
                if self.router is not None:
                    self.router.answered(reply)
        await self._advance_groups(groups, out, received)

    async def handle_timers(self, claimed: dict[int, list[Claimed]]) -> None:
        """Apply timers that fell due (per shard) through the same path as replies: a
        timer whose step moved on is stale, and is removed."""
        received = time.perf_counter()
        out = BatchOutput()
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
                self.stats.timers += 1
                self.timer_lag.add(timer.late_ms)
                groups.setdefault(fired.workflow_id, []).append(fired)
        await self._advance_groups(groups, out, received)

    def _observe(self, committed: list[Transition], now: int) -> None:
        """Tally the committed transitions' metrics, write their spans, log their news;
        tell the timer poller when the soonest timer they set falls due."""
        log_runs(committed)
        if self.on_timer_set is not None:
            soonest: dict[int, int] = {}
            for tr in committed:
                if tr.timers:
                    shard = self.keys.shard_of(tr.state.workflow_id)
                    delay = min(t.delay_ms for t in tr.timers)
                    soonest[shard] = min(delay, soonest.get(shard, delay))
            if soonest:
                self.on_timer_set(soonest)
        if self.recorder is not None:
            self.recorder.record(committed, now)
        if self.tracing is not None:
            self.tracing.record(committed)

    async def _prepare_sends(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> Taken:
        """Before a batch's transitions (each from its base state) commit: runs that start
        under a concurrency key get a slot or wait for one (and keyed steps' attempts),
        the breakers hold back or reroute their commands, flow-control limits queue those
        over them (for the whole batch at once), then the router addresses the rest to
        chosen instances. The concurrency slots (`_admit`) and permits taken, for what the
        commit does not claim to be given back, and the queue places taken, to be checked
        after it."""
        taken = Taken(*await self._admit(items, now))
        taken.add(Taken(*await self._admit_steps(items, now)))
        for workflow, transition, _ in items:
            await self._gate(workflow, transition, now)
        if self.limiter is not None:
            taken.permits += await self._limit(items, now)
        if self.router is not None:
            for _, transition, _ in items:
                self.router.route(transition)
            if self.limiter is not None and self.per_instance:
                taken.permits += await self._limit_instances(items, now)
        return taken

    async def _gate(self, workflow: Workflow | None, transition: Transition, now: int) -> None:
        """Before `transition` commits: hold back (park) or reroute each command to a
        service whose breaker is open; let one probe through a breaker ready for it."""
        breakers = self.breakers
        if breakers is None or workflow is None or not breakers.enabled:
            return
        for effect in [e for e in transition.effects if isinstance(e, SendCommand)]:
            command = effect.command
            service = command.service
            if is_child_service(service):
                continue  # a child run's request or control: no breaker holds it back
            decision = breakers.gate(service, now)
            if decision == "send":
                continue
            step = workflow.steps.get(command.step)
            if step is None or step.service != service:
                continue  # a compensation: undo goes out whatever the breaker says
            if self.engine.withhold(workflow, transition, command.command_id, now):
                continue  # a run being compensated does not wait for the breaker
            if decision == "probe":
                hold = step.timeout_ms or breakers.settings.probe_timeout_ms
                if await breakers.take_probe(service, now, hold):
                    continue
            if (
                step.fallback is not None
                and breakers.gate(step.fallback.service, now) == "send"
                and self.engine.reroute(workflow, transition, command.command_id)
            ):
                transition.count(REROUTED)
                continue
            await breakers.note_parking(service)
            self.engine.park(transition, command.command_id)

    def _parked_count(self, transition: Transition) -> None:
        queued = transition.counters.get(QUEUED, 0)  # by a limit: in `parked` too
        self.stats.queued += queued + transition.counters.get(QUEUED_BY_KEY, 0)
        if transition.parked:
            self.stats.parked += len(transition.parked) - queued
        if (rerouted := transition.counters.get(REROUTED)) is not None:
            self.stats.rerouted += rerouted

    async def _record(
        self,
        outcomes: list[tuple[str, bool]],
        by_instance: list[tuple[str, str, bool]],
        out: BatchOutput,
    ) -> None:
        """Tell the breakers (of services, and of instances) what the committed
        transitions learnt. The transitions are committed already: a Redis failure here is
        logged, not raised (the breakers miss these outcomes; their state is advisory)."""
        if self.router is not None and by_instance:
            for change in self.router.record(by_instance):
                out.counts[change] += 1
        if not outcomes or self.breakers is None:
            return
        # A child run is not a service: its outcomes trip no breaker.
        outcomes = [o for o in outcomes if not is_child_service(o[0])]
        try:
            await self.breakers.record(outcomes)
        except Exception as exc:
            self.breakers.stats.errors += 1
            log.warning("breakers: %d outcomes not recorded: %s", len(outcomes), exc)

    async def _advance_groups(
        self, groups: dict[str, list[Event]], out: BatchOutput, received: float
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
        permits: list[tuple[str, str]] = []
        freed: list[Freed] = []
        taken = Taken({})
        lost: dict[str, tuple[Workflow | None, WorkflowState | None]] = {}
        stored: list[tuple[Workflow | None, WorkflowState]] = []
        since = clock.monotonic()
        for _ in range(MAX_CONFLICT_RETRIES):
            now = now_ms()
            pending, recheck = await self._apply_all(groups, states, fresh, now, out)
            taken.add(
                await self._prepare_sends(
                    [(item.workflow, item.transition, item.base) for item in pending], now
                )
            )
            prepared = [
                self._commit_of(p.workflow, p.transition, p.base, now, p.events) for p in pending
            ]
            results = await self.store.commit_many([c for c, _ in prepared], now)
            retry: dict[str, list[Event]] = {}
            for item, (commit, messages), result in zip(pending, prepared, results, strict=True):
                wid = item.base.workflow_id
                if result.outcome is CommitOutcome.COMMITTED:
                    lost.pop(wid, None)
                    self._controls_applied(item.events, commit.state, out)
                    for message in messages:
                        message.lease = result.lease
                    outgoing += messages
                    self.cache.put(commit.state)
                    outcomes += item.transition.outcomes
                    by_instance += item.transition.instance_outcomes
                    if self.limiter is not None:
                        permits += self._permits_done(item.workflow, item.base, commit.state)
                    freed += self._slots_freed(item.workflow, item.base, commit.state)
                    stored.append((item.workflow, commit.state))
                    self._parked_count(item.transition)
                    committed.append(item.transition)
                else:
                    self.stats.conflicts += 1
                    lost[wid] = (item.workflow, result.current)
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
        # What a lost compare-and-set found is the latest known state of those runs.
        latest = stored + list(lost.values())
        await self._release_permits(permits + self._unclaimed_permits(taken.permits, latest))
        await self._free_slots(freed + self._unclaimed(taken.slots, stored), now_ms())
        await self._keep_queue_places(taken.queued, stored, now_ms())
        await self._flush(out)
        if out.stale_timers:
            self.stats.stale_timers += len(out.stale_timers)
            await self.store.timers_done(
                [(shard, out.claimed[(shard, name)]) for shard, name in sorted(out.stale_timers)]
            )
        if groups:
            msg = f"{len(groups)} workflows kept conflicting; their events will be redelivered"
            raise StateUnavailable(msg)

    def _reply(self, record: Record, out: BatchOutput) -> ReplyEvent | None:
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
        out: BatchOutput,
    ) -> tuple[list[Pending], list[str]]:
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
                unknown += len(events) - len(timers) - self._no_run(wid, events, out)
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
                pending.append(Pending(base, merged, workflow, applied))
        if unknown:
            # Redis lost these runs (restarted empty, failed over) or they expired:
            # counted where ops look, and `mediator recover` restarts lost runs.
            self.stats.unknown_workflow_replies += unknown
            out.counts["replies:unknown_workflow"] += unknown
            log.warning("%d replies for workflows Redis does not have", unknown)
        return pending, recheck

    def _unattributed(
        self, workflow: Workflow, state: WorkflowState, event: Event, out: BatchOutput
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
            current = (state.compensations or {}).get(event.step)
            undo = (
                saga.undo_compensation(step, step_state, current)
                if current is not None
                else saga.compensation(step, step_state)
            )
            service = undo.service if undo is not None else None
        if service is None or not self.signatures.has_own_keys(service):
            return False
        out.forged.add(id(event))
        self._forged(
            record,
            f"reply for {service!r} signed with a shared key, but it has keys of its own",
            out,
        )
        return True

    def _apply(
        self, workflow: Workflow, state: WorkflowState, event: Event, now: int
    ) -> Transition | None:
        if isinstance(event, Fired):
            return self.engine.apply_timer(workflow, state, event, now)
        if isinstance(event, ControlEvent):
            return self.engine.apply_control(workflow, state, event, now)
        return self.engine.apply_reply(workflow, state, event, now)

    @staticmethod
    def _controls_applied(events: list[Event], state: WorkflowState, out: BatchOutput) -> None:
        """The controls among `events`, committed: applied, and where the run is now."""
        for event in events:
            if isinstance(event, ControlEvent):
                where = f"run {state.workflow_id} is {state.condition}"
                if event.action is ControlAction.SIGNAL:
                    kept = any(e["id"] == event.control_id for e in state.inbox or ())
                    where = (
                        f"kept: no step of run {state.workflow_id} waits on {event.signal!r} "
                        "yet, the first that does takes it"
                        if kept
                        else f"delivered: {where}"
                    )
                out.controls[event.control_id] = (True, where)

    def _no_run(self, wid: str, events: list[Event], out: BatchOutput) -> int:
        """Log and count the controls among `events` for a run Redis does not have."""
        controls = [e for e in events if isinstance(e, ControlEvent)]
        for control in controls:
            log.warning("control %s: there is no run %s", control.control_id, wid)
            out.controls[control.control_id] = (False, f"there is no run {wid}")
            if control.action is ControlAction.COMPENSATE and (ref := control.reply) is not None:
                # The parent's compensation waits for a child run that is gone (past its
                # retention, or lost with Redis): it cannot be undone from here.
                gone = ReplyEvent(
                    command_id=ref.command_id,
                    workflow_id=ref.workflow_id,
                    step=ref.step,
                    attempt=ref.attempt,
                    status=ReplyStatus.ERROR,
                    error=ErrorInfo(
                        message=f"child run {wid} is not in Redis (past redis.retention_s, "
                        "or lost): it cannot be compensated",
                        code="child_gone",
                        step=ref.step,
                    ),
                    service=control.service,
                    replied_ms=now_ms(),
                )
                out.direct.append(self._parent_reply(gone, control.control_id))
        self.stats.ignored_controls += len(controls)
        return len(controls)

    def _ignored(
        self, wid: str, state: WorkflowState, ignored: list[Event], out: BatchOutput
    ) -> None:
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
                state.condition,
            )
            out.controls[control.control_id] = (
                False,
                f"{control.action.value} does not apply to run {wid}, which is {state.condition}",
            )
        self.stats.ignored_controls += len(controls)
        self.stats.ignored_replies += len(ignored) - len(stale) - len(controls)

    def _abandon(self, base: WorkflowState, now: int) -> Pending:
        """A run whose definition is neither loaded nor stored cannot advance: fail it,
        saying so, rather than leave it running for ever."""
        reason = (
            f"definition {base.workflow}@{base.version} is neither loaded nor stored in "
            "Redis, so this run cannot advance; deploy that version again and retry"
        )
        log.error(
            "workflow %s failed: %s",
            base.workflow_id,
            reason,
            extra=run_fields(base, code="unknown_definition"),
        )
        error: Failure = {"message": reason, "code": "unknown_definition"}
        return Pending(base, self.engine.abandon(base, error, now), None)
