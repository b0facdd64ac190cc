"""The engine: a pure state machine ``(state, event, now) -> (state', effects)``.

It performs no I/O and reads no clock: the runtime loads state, calls the engine, and
commits the returned `Transition` (new state, effects to publish, timers, counters)
atomically. Because command ids are derived from ``(workflow id, step, attempt)``,
replaying the same event against the same state yields byte-identical effects, so a
transition lost to a compare-and-set conflict can simply be recomputed.

Events: a request starts a run; a service's reply, a timer falling due and an operator's
control advance it. When a step fails for good, the deadline passes or an operator
cancels, completed steps are compensated (`mediator.core.saga`) before the run ends.
"""

from __future__ import annotations

from mediator.core import children, concurrency, pausing, saga, signals
from mediator.core.attempts import Attempts
from mediator.core.counters import svc, wf
from mediator.core.expressions import ExpressionError
from mediator.core.lineage import CancelChild, child_run_id, orphaned
from mediator.core.progress import command_id, idempotency_key
from mediator.core.results import history_of, result_of
from mediator.core.state import (
    Failure,
    StepState,
    StepStatus,
    WorkflowState,
    evolve,
    failure_of,
    fork,
)
from mediator.core.timers import Fired, SetTimer
from mediator.core.transition import (
    Effect,
    PublishResult,
    SendCommand,
    Transition,
    deadline_timer,
    end,
    forked,
    observe,
    timer_name,
)
from mediator.core.workflow import Compensation, Workflow
from topics.events import (
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    WorkflowStatus,
)
from topics.headers import w3c_trace_id

#: Step statuses whose timeout fails the attempt.
_TIMED = frozenset({StepStatus.RUNNING, StepStatus.PARKED, StepStatus.WAITING})

#: Steps held back in their service's queue: an ``unpark`` timer releases them.
_HELD = frozenset({StepStatus.PARKED, StepStatus.QUEUED})

#: Statuses an operator's retry starts again from.
_RETRYABLE_RUNS = frozenset({WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})

__all__ = [
    "Effect",
    "Engine",
    "PublishResult",
    "SendCommand",
    "SetTimer",
    "Transition",
    "command_id",
    "end",
    "idempotency_key",
    "result_of",
]


#: Controls remembered per run (`WorkflowState.controls`), newest last.
MAX_CONTROLS_KEPT = 32


class Engine(Attempts):
    """Drives workflow runs. Holds only configuration; every method is pure."""

    def start(
        self,
        workflow: Workflow,
        request: RequestEvent,
        workflow_id: str,
        now_ms: int,
        trace_id: str | None = None,
        trace_parent: str | None = None,
    ) -> Transition:
        """A new run for `request`: dispatch the steps that are ready at once.

        Its trace id is the request's, else `trace_id` (from the request's
        ``traceparent``), else one derived from the workflow id: every run is traced.
        """
        state = WorkflowState(
            workflow_id=workflow_id,
            request_id=request.request_id,
            workflow=workflow.name,
            version=workflow.version,
            status=WorkflowStatus.RUNNING,
            payload=request.payload,
            created_ms=now_ms,
            updated_ms=now_ms,
            steps={sid: StepState() for sid in workflow.order},
            reply_to=request.reply_to,
            trace_id=request.trace_id or trace_id or w3c_trace_id(workflow_id),
            trace_parent=trace_parent,
            deadline_ms=now_ms + workflow.timeout_ms if workflow.timeout_ms else None,
            parent=request.parent.model_dump() if request.parent is not None else None,
        )
        transition = Transition(state)
        transition.count(wf(workflow.name, "started"))
        if workflow.timeout_ms:
            transition.timers.append(deadline_timer(state, workflow.timeout_ms))
        if workflow.concurrency is not None:
            state.priority = request.priority or None
            try:
                state.concurrency_key = concurrency.key_of(workflow, state)
            except ExpressionError as exc:
                error: Failure = {"message": str(exc), "code": "expression_error"}
                return self._finish(workflow, transition, now_ms, error)
            return concurrency.hold(transition, now_ms)
        return self._advance(workflow, transition, now_ms)

    def admit(self, workflow: Workflow, transition: Transition, now_ms: int) -> Transition:
        """The run `transition` started (or reopened) queued got a slot of its concurrency
        key: it runs, dispatching what is ready, in the same transition."""
        state = transition.state
        if state.queued_ms is None:
            return transition
        state.queued_ms = None
        transition.count(wf(workflow.name, "admitted"))
        return self._advance(workflow, transition, now_ms)

    def apply_reply(
        self, workflow: Workflow, state: WorkflowState, reply: ReplyEvent, now_ms: int
    ) -> Transition | None:
        """Apply a service's reply; None when it is a duplicate, stale or unknown."""
        step_state = state.steps.get(reply.step)
        if step_state is None:
            return None
        if orphaned(state.workflow_id, workflow.steps[reply.step], step_state, reply):
            return _undo_orphan(state, reply, now_ms)
        if state.terminal:
            return None
        if step_state.command_id != reply.command_id:
            return self._undo_replied(workflow, state, step_state, reply, now_ms)
        if step_state.status is not StepStatus.RUNNING or step_state.attempt != reply.attempt:
            return None
        step = workflow.steps[reply.step]
        if reply.service is not None and reply.service != (step_state.via or step.service):
            return None  # another service cannot answer this step's command
        state = fork(state)
        state.updated_ms = now_ms
        transition = Transition(state)
        service = step_state.via or step.service
        if step.timeout_ms:  # answered: its timeout timer is not needed any more
            transition.cleared.append(timer_name("timeout", state, step.id, step_state.attempt))
        if reply.status is ReplyStatus.OK:
            return self._completed(workflow, transition, step_state, reply, now_ms)
        error = reply.error or ErrorInfo(message="service replied error without details")
        failure = failure_of(error)
        failure["step"] = reply.step
        outcome = _outcome(error)
        if step_state.sent is not None and saga.undelivered(step_state, error, reply.instance):
            state.steps[reply.step] = evolve(step_state, sent=None)
        transition.count(svc(service, outcome))
        observe(transition, service, outcome, reply.step, step_state, now_ms, reply.instance)
        if error.retryable:
            transition.outcomes.append((service, False))
            if reply.instance:
                transition.instance_outcomes.append((service, reply.instance, False))
        return self._fail_attempt(workflow, transition, step, failure, now_ms, reply.instance)

    def _completed(
        self,
        workflow: Workflow,
        transition: Transition,
        step_state: StepState,
        reply: ReplyEvent,
        now_ms: int,
    ) -> Transition:
        """The step's current attempt replied ``ok``: it completes, and the run moves on
        (or, compensating, the undo of what it did is due)."""
        state = transition.state
        service = step_state.via or workflow.steps[reply.step].service
        state.steps[reply.step] = StepState(
            StepStatus.COMPLETED,
            attempt=step_state.attempt,
            command_id=step_state.command_id,
            output=reply.output,
            started_ms=step_state.started_ms,
            finished_ms=now_ms,
            instance=reply.instance,
            history=step_state.history,
            base=step_state.base,
            via=step_state.via,
            sent=step_state.sent,
        )
        transition.count(svc(service, "ok"))
        transition.outcomes.append((service, True))
        observe(transition, service, "ok", reply.step, step_state, now_ms, reply.instance)
        if reply.instance:
            transition.instance_outcomes.append((service, reply.instance, True))
        if state.status is WorkflowStatus.COMPENSATING:
            return self._compensate(workflow, transition, now_ms)
        return self._advance(workflow, transition, now_ms, workflow.dependants[reply.step])

    def _undo_replied(
        self,
        workflow: Workflow,
        state: WorkflowState,
        step_state: StepState,
        reply: ReplyEvent,
        now_ms: int,
    ) -> Transition | None:
        """A reply to the current attempt of a step's compensation; None for any other."""
        undo = state.compensations.get(reply.step) if state.compensations else None
        if (
            undo is None
            or undo.command_id != reply.command_id
            or undo.status is not StepStatus.RUNNING
            or undo.attempt != reply.attempt
            or not _from(
                reply, saga.undo_compensation(workflow.steps[reply.step], step_state, undo)
            )
        ):
            return None
        return saga.undo_replied(self.replies_topic, workflow, state, reply, now_ms)

    def apply_timer(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        """A timer fell due; None when the run or step has moved on since (stale)."""
        if state.terminal:
            return None
        if timer.kind == "deadline":
            return self._deadline(workflow, state, timer, now_ms)
        if state.paused_ms is not None and timer.kind in pausing.HELD_TIMERS:
            return pausing.hold(state, timer, now_ms)
        if timer.kind in ("undo_timeout", "undo_retry"):
            return saga.undo_timer(self.replies_topic, workflow, state, timer, now_ms)
        if timer.kind == "admit":
            return self._admitted(workflow, state, timer, now_ms)
        step_state = state.steps.get(timer.step)
        if step_state is None or step_state.attempt != timer.attempt:
            return None
        step = workflow.steps[timer.step]
        status = step_state.status
        if timer.kind == "timeout" and status in _TIMED:
            return self._timed_out(workflow, state, step, timer, now_ms)
        if state.status is not WorkflowStatus.RUNNING:
            return None
        if timer.kind == "retry" and status is StepStatus.RETRYING:
            transition = forked(state, now_ms, timer)
            transition.count(svc(step.service, "retried"))
            return self._redispatch(workflow, transition, step, now_ms, step_state.attempt + 1)
        if timer.kind == "reroute" and status is StepStatus.RUNNING:
            return self._moved_off_dead(workflow, forked(state, now_ms, timer), step, now_ms)
        if timer.kind == "unpark" and status in _HELD:
            transition = forked(state, now_ms, timer)
            transition.count(svc(step.service, "unparked"))
            return self._redispatch(workflow, transition, step, now_ms, step_state.attempt)
        return None

    def _admitted(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        """A queued run's ``admit`` timer: its key's slot is its now (stale once the run
        was admitted, or for an earlier round)."""
        if state.queued_ms is None or timer.attempt != state.round:
            return None
        return self.admit(workflow, forked(state, now_ms, timer), now_ms)

    def apply_control(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        """An operator's cancel, retry, pause, resume or signal, or a parent's compensate;
        None when it does not apply to the run as it is (cancel of a finished run, retry of
        one that did not fail, pause of a paused one) or was applied already (the same
        control delivered again: its id is remembered with the run)."""
        if control.control_id in (state.controls or ()):
            return None
        apply = _CONTROLS.get(control.action)
        transition = apply(self, workflow, state, control, now_ms) if apply else None
        if transition is None:
            return None
        applied = transition.state
        applied.controls = [
            *(applied.controls or ())[-(MAX_CONTROLS_KEPT - 1) :],
            control.control_id,
        ]
        return transition

    def _cancel(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        if state.status is not WorkflowStatus.RUNNING:
            return None
        transition = Transition(fork(state))
        transition.state.updated_ms = now_ms
        transition.count(wf(workflow.name, "cancel_requested"))
        who = f" by {control.operator}" if control.operator else ""
        reason = control.reason or "no reason given"
        error: Failure = {"message": f"cancelled{who}: {reason}", "code": "cancelled"}
        return self._finish(workflow, transition, now_ms, error)

    def _retry(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        if state.status not in _RETRYABLE_RUNS:
            return None
        return self._reopen(workflow, state, now_ms)

    def _pause(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        if not pausing.can_pause(state):
            return None
        return pausing.pause(workflow, state, now_ms, control.pause_deadline)

    def _resume_control(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        if state.paused_ms is None:
            return None
        return self._resume(workflow, state, now_ms)

    def _signal_control(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        if state.terminal or not control.signal:
            return None
        return self._signal(workflow, state, control, now_ms)

    def _compensate_control(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        """A parent compensating the step this (child) run answered, or undoing a child
        it stopped waiting for: see `mediator.core.children`."""
        transition, drive = children.compensate(workflow, state, control, now_ms)
        if not drive:
            return transition
        error = transition.state.error
        assert error is not None
        return self._finish(workflow, transition, now_ms, error)

    def _signal(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition:
        """A signal: the step waiting on it completes with its payload (and the run moves
        on), or, none waiting, the run keeps it for the first step that will."""
        state = fork(state)
        state.updated_ms = now_ms
        transition = Transition(state)
        event = control.signal or ""
        sid = signals.waiting_step(workflow, state, event, control.payload)
        if sid is None:
            signals.keep(
                state, control.control_id, event, control.payload, now_ms, control.operator
            )
            transition.count(wf(workflow.name, "signal_kept"))
            return transition
        signals.deliver(workflow, transition, sid, control.payload, now_ms, control.operator)
        transition.count(wf(workflow.name, "signalled"))
        return self._advance(workflow, transition, now_ms, workflow.dependants[sid])

    def _resume(self, workflow: Workflow, state: WorkflowState, now_ms: int) -> Transition:
        """An operator's resume: what was held is set going, then whatever became ready is
        dispatched (or, compensating, the undos whose turn came)."""
        transition = pausing.resume(workflow, state, now_ms)
        if transition.state.status is WorkflowStatus.COMPENSATING:
            return self._compensate(workflow, transition, now_ms)
        return self._advance(workflow, transition, now_ms)

    def _deadline(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        if timer.attempt != state.round or state.deadline_ms is None:
            # An earlier round's deadline fired late, or one a pause stopped fired before
            # the pause's commit removed it (the resume sets it again).
            return None
        if now_ms < state.deadline_ms:
            # Due before the deadline it stands for: a timer claimed before a pause moved
            # the deadline (the resume set one again under the same name), or a clock
            # behind Redis's. Set again for the deadline, rather than fail the run early.
            transition = forked(state, now_ms, timer)
            transition.timers.append(deadline_timer(state, state.deadline_ms - now_ms))
            return transition
        transition = forked(state, now_ms, timer)
        limit = workflow.timeout_ms or 0
        transition.count(wf(workflow.name, "deadline_exceeded"))
        if state.status is WorkflowStatus.COMPENSATING:
            # Undoing already: stop waiting for steps still in flight, compensate the rest.
            saga.abandon_in_flight(workflow, transition, now_ms, everything=True)
            return self._compensate(workflow, transition, now_ms)
        error: Failure = {
            "message": f"workflow {workflow.name!r} did not finish within {limit} ms",
            "code": "deadline_exceeded",
        }
        return self._finish(workflow, transition, now_ms, error)

    def _reopen(self, workflow: Workflow, state: WorkflowState, now_ms: int) -> Transition:
        """An operator's retry: the run runs again from the steps that did not complete
        (or whose work was compensated), keeping the outputs of the others."""
        state = fork(state)
        transition = Transition(state)
        undone = state.compensations or {}
        if undone:
            # The next round's compensations go on from these attempt numbers.
            state.undo_base = {
                **(state.undo_base or {}),
                **{sid: undo.attempt for sid, undo in undone.items()},
            }
        for sid, step_state in state.steps.items():
            kept = step_state.status is StepStatus.COMPLETED and (
                sid not in undone or undone[sid].status is not StepStatus.COMPLETED
            )
            if kept:
                continue
            if step_state.status is StepStatus.PENDING:
                if step_state.sent is not None:  # what went out did in the round before
                    state.steps[sid] = evolve(step_state, sent=None)
                continue
            history = history_of(step_state) if step_state.attempt else step_state.history
            state.steps[sid] = StepState(
                attempt=step_state.attempt, history=history, base=step_state.attempt
            )
        state.status = WorkflowStatus.RUNNING
        state.error = None
        state.output = None
        state.finished_ms = None
        state.compensations = None
        state.updated_ms = now_ms
        if state.deadline_ms is not None:  # a fired one may linger unclaimed
            transition.cleared.append(deadline_timer(state, 0).member)
        state.round += 1
        state.deadline_ms = now_ms + workflow.timeout_ms if workflow.timeout_ms else None
        if workflow.timeout_ms:
            transition.timers.append(deadline_timer(state, workflow.timeout_ms))
        transition.count(wf(workflow.name, "retried"))
        if state.concurrency_key is not None and workflow.concurrency is not None:
            return concurrency.hold(transition, now_ms)  # it waits for a slot again
        return self._advance(workflow, transition, now_ms)


_CONTROLS = {
    ControlAction.CANCEL: Engine._cancel,
    ControlAction.RETRY: Engine._retry,
    ControlAction.PAUSE: Engine._pause,
    ControlAction.RESUME: Engine._resume_control,
    ControlAction.SIGNAL: Engine._signal_control,
    ControlAction.COMPENSATE: Engine._compensate_control,
}


def _undo_orphan(state: WorkflowState, reply: ReplyEvent, now_ms: int) -> Transition | None:
    """A child run completed that the run stopped waiting for (see `lineage.orphaned`):
    have it undo its work (once: the control's id is derived from its attempt). A run
    that ended long ago has no say any more: None when the reply is stale by then."""
    control_id = f"{reply.command_id}.orphan"
    if control_id in (state.controls or ()):
        return None
    transition = Transition(fork(state))
    transition.state.updated_ms = now_ms
    transition.state.controls = [*(state.controls or ())[-(MAX_CONTROLS_KEPT - 1) :], control_id]
    transition.effects.append(
        CancelChild(
            child_run_id(reply.command_id),
            control_id,
            f"parent run {state.workflow_id} no longer waits for it (step {reply.step!r})",
            undo=True,
        )
    )
    transition.count(wf(state.workflow, "children_undone"))
    return transition


def _from(reply: ReplyEvent, compensation: Compensation | None) -> bool:
    """Whether `reply` may answer `compensation`'s command: it names no service, or that
    one."""
    return compensation is not None and reply.service in (None, compensation.service)


def _outcome(error: ErrorInfo) -> str:
    """How an error reply counts in the service's metrics: ``error`` when a retry may cure
    it (the service is in trouble), ``rejected`` when not (a business answer, such as a card
    declined: the service did its job, and its error rate and alerts are not moved)."""
    return "error" if error.retryable else "rejected"
