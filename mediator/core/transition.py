"""What one event does to a run: the `Transition` the engine returns, its effects, and
how a run ends. Shared by the forward path (`engine`) and compensation (`saga`)."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from mediator.core.counters import CounterKey, svc, wf
from mediator.core.lineage import CancelChild, ReplyToParent, child_run_id, give_up, owed_reply
from mediator.core.metrics import Observation
from mediator.core.results import result_fields
from mediator.core.state import Failure, StepState, StepStatus, WorkflowState, fork
from mediator.core.timers import Fired, SetTimer, TimerKind
from mediator.core.workflow import CHILD_PREFIX, Workflow
from topics.events import CommandEvent, ResultEvent, WorkflowStatus

__all__ = [
    "Effect",
    "Observation",
    "PublishResult",
    "SendCommand",
    "Subscribe",
    "Transition",
    "context",
    "deadline_timer",
    "end",
    "forked",
    "observe",
    "send",
    "timer_name",
    "withdraw",
]


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Publish a command to the step's service: to `partition` of its topic when routed
    to an instance that owns it, else where the key falls."""

    command: CommandEvent
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Publish the workflow's result to the requester: `fields` are the result event's
    JSON fields (`mediator.core.results.result_fields`), `result` the event itself."""

    fields: dict[str, Any]
    reply_to: str | None

    @property
    def result(self) -> ResultEvent:
        return ResultEvent.model_validate(self.fields)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Route signals `event` sent for the correlation key `key` to the run (its `wait`
    step `step` waits for one): published as a ``subscribe`` control."""

    event: str
    key: str
    step: str
    attempt: int


#: What a transition publishes when it commits (through the outbox): commands (a child
#: step's are its child's request and ``compensate`` control), the run's result, its
#: outcome to the parent step waiting for it, and cancels of child runs it gave up.
Effect = SendCommand | PublishResult | ReplyToParent | CancelChild | Subscribe


@dataclass(slots=True)
class Transition:
    """The outcome of one event: the new state, what to publish and what to count."""

    state: WorkflowState
    _: KW_ONLY
    effects: list[Effect] = field(default_factory=list)
    counters: dict[CounterKey, int] = field(default_factory=dict)
    #: Timers to set, committed with the state.
    timers: list[SetTimer] = field(default_factory=list)
    #: Timers (their names) removed with the commit: the one that fired, and those no
    #: longer needed (the timeout of a step that replied, the timers of a run that ended).
    cleared: list[str] = field(default_factory=list)
    #: What the services' circuit breakers learn: (service, succeeded) per answered or
    #: timed-out command. Non-retryable (business) errors are not failures of the service.
    outcomes: list[tuple[str, bool]] = field(default_factory=list)
    #: Commands held back because their service's breaker is open: (service, the name of
    #: the ``unpark`` timer that releases the step), queued in the service's parked queue.
    parked: list[tuple[str, str]] = field(default_factory=list)
    #: What the per-instance breakers learn: (service, instance, succeeded) per answered
    #: or timed-out command that was routed to a registered instance.
    instance_outcomes: list[tuple[str, str, bool]] = field(default_factory=list)
    #: Timed outcomes for the metrics: commands answered or timed out, runs that ended.
    observed: list[Observation] = field(default_factory=list)
    #: The concurrency key of a run this transition (re)starts queued: the runtime asks
    #: for a slot before the commit (`mediator.core.concurrency`).
    admission: str | None = None

    def count(self, name: CounterKey, n: int = 1) -> None:
        """Add `n` to counter `name`."""
        self.counters[name] = self.counters.get(name, 0) + n

    def then(self, later: Transition) -> Transition:
        """This transition followed by `later` (computed from this one's state), as one to
        commit. A timer this one sets and `later` removes is not set at all: the commit
        removes timers before it sets them, so it would outlive its use. Likewise a step's
        command this one sends and `later` gives up (a retry that fell due in the batch
        whose cancel or deadline ended the run, or began its compensation without awaiting
        the step) is not sent at all: nothing goes out for a step no one waits on, so no
        work is done that nothing would undo."""
        removed = set(later.cleared)
        effects, later_effects = self.effects, later.effects
        dropped: list[Effect] = []
        if later.state.status is not WorkflowStatus.RUNNING:
            dropped = [e for e in effects if _given_up(e, later.state)]
        if dropped:
            # A child run whose request is not sent is not cancelled either.
            unborn = {child_run_id(e.command.command_id)
                      for e in dropped if isinstance(e, SendCommand)}  # fmt: skip
            dropped += [e for e in [*effects, *later_effects] if _cancels(e, unborn)]
            gone = {id(e) for e in dropped}
            effects = [e for e in effects if id(e) not in gone]
            later_effects = [e for e in later_effects if id(e) not in gone]
        merged = Transition(
            later.state,
            effects=[*effects, *later_effects],
            counters=dict(self.counters),
            timers=[*(t for t in self.timers if t.member not in removed), *later.timers],
            cleared=[*self.cleared, *later.cleared],
            outcomes=[*self.outcomes, *later.outcomes],
            parked=[*self.parked, *later.parked],
            instance_outcomes=[*self.instance_outcomes, *later.instance_outcomes],
            observed=[*self.observed, *later.observed],
            admission=later.admission or self.admission,
        )
        for name, delta in later.counters.items():
            merged.count(name, delta)
        for effect in dropped:
            if isinstance(effect, SendCommand):
                merged.count(svc(effect.command.service, "sent"), -1)
            elif isinstance(effect, CancelChild):
                merged.count(wf(merged.state.workflow, "children_cancelled"), -1)
        return merged


def _cancels(effect: Effect, runs: set[str]) -> bool:
    """Whether `effect` cancels one of the child `runs`."""
    return isinstance(effect, CancelChild) and effect.run in runs


def _given_up(effect: Effect, state: WorkflowState) -> bool:
    """Whether `effect` is a step's command that `state` no longer waits on: the step's
    attempt it sends is no longer running, or the run has ended (a child run's request
    still goes: the run's end cancels that child by its step's policy)."""
    if not isinstance(effect, SendCommand):
        return False
    command = effect.command
    step = state.steps.get(command.step)
    if step is None or step.command_id != command.command_id:
        return False
    if step.status is not StepStatus.RUNNING:
        return True
    return state.terminal and not command.service.startswith(CHILD_PREFIX)


def end(
    transition: Transition,
    output: Any,
    error: Failure | None,
    now_ms: int,
    status: WorkflowStatus | None = None,
    workflow: Workflow | None = None,
) -> Transition:
    """Finish the run: completed with `output`, or failed with `error` (or ended in
    `status`); publish its result (and its outcome to its parent, for a child run). Child
    runs still in flight are cancelled by their steps' policy (given `workflow`)."""
    state = transition.state
    if status is None:
        status = WorkflowStatus.FAILED if error is not None else WorkflowStatus.COMPLETED
    if workflow is not None:
        for sid, step_state in state.steps.items():
            if step_state.status is StepStatus.RUNNING:
                why = f"the run ended {status.value}"
                give_up(transition, workflow.steps[sid], step_state, why)
    state.status = status
    state.output = output
    state.error = error
    state.finished_ms = now_ms
    state.updated_ms = now_ms
    # A run that ends paused (its last reply came in, or it was cancelled with nothing to
    # undo) is over: nothing is left to hold back.
    if state.queued_ms is not None:  # ended in its key's queue (cancelled, deadline)
        transition.cleared.append(SetTimer("admit", state.workflow_id, 0, "", state.round).member)
    state.paused_ms = state.held = state.deadline_left_ms = state.queued_ms = None
    state.inbox = None  # signals kept for waits of this round: an operator's retry is another
    transition.count(wf(state.workflow, status.value))
    transition.observed.append(
        Observation("wf", state.workflow, status.value, now_ms - state.created_ms)
    )
    transition.effects.append(PublishResult(result_fields(state), state.reply_to))
    if (state.parent or state.undo_reply) is not None:
        reply = owed_reply(state, now_ms)
        if reply is not None:
            transition.effects.append(ReplyToParent(reply))
    clear_timers(transition)
    return transition


def clear_timers(transition: Transition) -> None:
    """A run that ended needs none of its timers: remove them with the commit, rather
    than let each fire once as stale. (Removing a timer that was never set is harmless.)"""
    state = transition.state
    wid = state.workflow_id
    names = [deadline_timer(state, 0).member] if state.deadline_ms is not None else []
    for sid, step in state.steps.items():
        if step.status in (StepStatus.RUNNING, StepStatus.PARKED, StepStatus.WAITING):
            names.append(SetTimer("timeout", wid, 0, sid, step.attempt).member)
            if step.status is StepStatus.PARKED:  # released from its queue, not yet fired
                names.append(SetTimer("unpark", wid, 0, sid, step.attempt).member)
        elif step.status is StepStatus.QUEUED:
            names.append(SetTimer("unpark", wid, 0, sid, step.attempt).member)
        elif step.status is StepStatus.RETRYING:
            names.append(SetTimer("retry", wid, 0, sid, step.attempt).member)
    for sid, undo in (state.compensations or {}).items():
        if undo.status is StepStatus.RUNNING:
            names.append(SetTimer("undo_timeout", wid, 0, sid, undo.attempt).member)
        elif undo.status is StepStatus.RETRYING:
            names.append(SetTimer("undo_retry", wid, 0, sid, undo.attempt).member)
    transition.timers.clear()
    transition.cleared += [name for name in names if name not in transition.cleared]


def deadline_timer(state: WorkflowState, delay_ms: int) -> SetTimer:
    """The timer of the run's deadline in its current round (named by the round, so an
    earlier round's, fired late, is known as stale)."""
    return SetTimer("deadline", state.workflow_id, delay_ms, "", state.round)


def forked(state: WorkflowState, now_ms: int, timer: Fired) -> Transition:
    """A transition on a private copy of `state`, removing the timer that fired."""
    state = fork(state)
    state.updated_ms = now_ms
    transition = Transition(state)
    transition.cleared.append(timer.member)
    return transition


def timer_name(kind: TimerKind, state: WorkflowState, step: str, attempt: int) -> str:
    return SetTimer(kind, state.workflow_id, 0, step, attempt).member


def context(state: WorkflowState, steps: dict[str, StepState]) -> dict[str, Any]:
    return {
        "payload": state.payload,
        "steps": {sid: s.output for sid, s in steps.items() if s.status is StepStatus.COMPLETED},
        "workflow": {
            "id": state.workflow_id,
            "request_id": state.request_id,
            "name": state.workflow,
        },
    }


def send(
    transition: Transition,
    step: str,
    service: str,
    action: str,
    attempt: int,
    command_id: str,
    command_input: Any,
    reply_to: str,
    now_ms: int,
    deadline_ms: int | None,
    idempotency_key: str | None = None,
) -> None:
    """Add a command for `step` to the transition's effects (and count it sent)."""
    state = transition.state
    command = CommandEvent(
        command_id=command_id,
        workflow_id=state.workflow_id,
        request_id=state.request_id,
        workflow=state.workflow,
        step=step,
        service=service,
        action=action,
        attempt=attempt,
        input=command_input,
        reply_to=reply_to,
        deadline_ms=deadline_ms,
        trace_id=state.trace_id,
        sent_ms=now_ms,
        idempotency_key=idempotency_key,
    )
    transition.effects.append(SendCommand(command))
    transition.count(svc(service, "sent"))


def withdraw(transition: Transition, command: CommandEvent) -> None:
    """Take `command` out of the effects: it is not sent (now)."""
    transition.effects = [
        e for e in transition.effects if not (isinstance(e, SendCommand) and e.command is command)
    ]
    transition.count(svc(command.service, "sent"), -1)


def observe(
    transition: Transition,
    service: str,
    outcome: str,
    step: str,
    attempt: StepState,
    now_ms: int,
    instance: str | None,
    undo: bool = False,
) -> None:
    """Note for the metrics and traces that the command of `step`'s `attempt` (or of its
    compensation: `undo`) to `service` was answered (``ok``; ``error`` when a retry may cure
    it, ``rejected`` when not) or timed out."""
    if attempt.started_ms is not None:
        transition.observed.append(
            Observation(
                "svc",
                service,
                outcome,
                now_ms - attempt.started_ms,
                instance,
                step,
                attempt.attempt,
                attempt.command_id,
                undo,
            )
        )
