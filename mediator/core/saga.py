"""Saga compensation (pure): undoing the completed steps of a run that failed for good,
passed its deadline or was cancelled.

When compensation begins the run is ``compensating``: steps waiting to retry or parked
give up, and steps still in flight that have a timeout are awaited (their reply or timeout
decides whether they completed, and so need undoing); in-flight steps without a timeout
are not awaited (child runs are cancelled and awaited: `mediator.core.children`). Then
every completed step that declares ``compensate`` is undone (and, ``after: attempted``,
every step an attempt of which went out in this round: `owed`), in reverse dependency
order: a step's compensation starts only once every step that
depended on it, directly or not, has settled and been compensated. Each compensation is
retried by its own policy. When nothing is left in flight the run ends: ``failed`` (or
``cancelled``) with the original error, or ``compensation_failed`` when an undo gave up.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mediator.core.counters import svc, wf
from mediator.core.expressions import ExpressionError
from mediator.core.lineage import COMPENSATED, child_run_id, give_up
from mediator.core.results import history_of
from mediator.core.state import (
    Failure,
    StepState,
    StepStatus,
    WorkflowState,
    evolve,
    failure_of,
    fork,
)
from mediator.core.timers import Fired, SetTimer, retry_delay_ms
from mediator.core.transition import (
    SendCommand,
    Transition,
    context,
    end,
    forked,
    observe,
    send,
    timer_name,
    withdraw,
)
from mediator.core.workflow import Compensation, Step, Workflow
from topics.events import CommandEvent, ErrorInfo, ReplyEvent, ReplyStatus, WorkflowStatus

__all__ = [
    "abandon_in_flight",
    "begin",
    "compensation",
    "compensation_at",
    "mark_sent",
    "needed",
    "owed",
    "progress",
    "refuse_undo",
    "undelivered",
    "undo_command_id",
    "undo_compensation",
    "undo_key",
    "undo_replied",
    "undo_timer",
]

_IN_FLIGHT = frozenset({StepStatus.RUNNING, StepStatus.RETRYING})
#: A step given up or failed, or put back to pending by a withdrawn retry: it will not run
#: again in this round.
_SETTLED = frozenset({StepStatus.FAILED, StepStatus.PENDING})


def undo_command_id(workflow_id: str, step: str, attempt: int) -> str:
    """The id of one attempt of a step's compensation (never equal to a forward one:
    step ids hold no dots)."""
    return f"{workflow_id}.{step}.undo.{attempt}"


def undo_key(workflow_id: str, step: str, round_: int, service: str | None = None) -> str:
    """The idempotency key of a step's compensation in one round of its run; of the undo
    of its work at `service`, when that work was done at more than one."""
    key = f"{workflow_id}.{step}.undo.r{round_}"
    return key if service is None else f"{key}.{service}"


def compensation(step: Step, forward: StepState) -> Compensation | None:
    """How `step` is undone, given how it ran: whoever did the work undoes it. A step that
    ran on its fallback is undone by the fallback's own ``compensate``, else by the step's
    compensation sent to the fallback's service. A step that did not complete is undone
    by the service its last attempt that went out was sent to."""
    return compensation_at(step, _worked_at(forward))


def _worked_at(forward: StepState) -> str | None:
    """The service whose work `compensation` undoes: the one the step completed at or,
    when no attempt is recorded as sent, the one it was routed to (None: its own); else
    the one its last attempt that went out was sent to."""
    if forward.sent is None or forward.status is StepStatus.COMPLETED:
        return forward.via
    return _sent(forward)[-1]


def compensation_at(step: Step, service: str | None) -> Compensation | None:
    """How work `step` did at `service` (None: its own) is undone."""
    fallback = step.fallback
    if service is None or fallback is None or service != fallback.service:
        return step.compensate
    if fallback.compensate is not None:
        return fallback.compensate
    if step.compensate is None:
        return None
    return dataclasses.replace(step.compensate, service=fallback.service)


def undo_compensation(step: Step, forward: StepState, undo: StepState) -> Compensation | None:
    """The compensation that `undo` (the state of `step`'s undo) runs."""
    return compensation_at(step, undo.via) if undo.via is not None else compensation(step, forward)


def owed(step: Step, forward: StepState) -> tuple[str, ...]:
    """The services whose work `step`, settled, is owed an undo for, in the order they are
    asked: the one where it completed (if its compensation there is declared); then every
    service an attempt went to in this round whose compensation is ``after: attempted``
    (with a fallback: the step's own and the fallback's), latest first. Empty: nothing
    is owed (or the step is not settled)."""
    if forward.status is StepStatus.COMPLETED:
        where = forward.via or step.service
        first = [where] if compensation_at(step, forward.via) is not None else []
    elif forward.status in _SETTLED:
        first = []
    else:
        return ()
    rest = [service for service in reversed(_sent(forward))
            if service not in first and _attempted_at(step, service)]  # fmt: skip
    return (*first, *rest)


def _attempted_at(step: Step, service: str) -> bool:
    undo = compensation_at(step, service)
    return undo is not None and undo.attempted


def _sent(forward: StepState) -> list[str]:
    """The services attempts of the step went to in this round, the latest last."""
    return forward.sent.split(",") if forward.sent else []


def _next(targets: tuple[str, ...], undo: StepState) -> str | None:
    """The service to undo at next, `undo` (at one of `targets`) having completed; None
    when it was the last, or has not completed (an undo given up ends the sequence: the
    run ends ``compensation_failed``)."""
    if undo.status is not StepStatus.COMPLETED or undo.via is None or undo.via not in targets:
        return None
    at = targets.index(undo.via) + 1
    return targets[at] if at < len(targets) else None


def needed(workflow: Workflow, state: WorkflowState) -> bool:
    """Whether ending `state` now would leave work to undo: a step with a compensation
    completed, or is in flight and may still complete, or (``after: attempted``) had an
    attempt go out."""
    for sid, s in state.steps.items():
        step = workflow.steps[sid]
        if s.status is StepStatus.COMPLETED and owed(step, s):
            return True
        if s.status is StepStatus.RUNNING and compensation_at(step, s.via) is not None:
            return True
        if any(_attempted_at(step, service) for service in _sent(s)):
            return True
    return False


#: The codes of the error reply the outbox gives a step whose command Kafka refused for
#: good (`mediator.runtime.failures.failure_code`): that attempt did not go out.
UNDELIVERED = frozenset({"too_large", "unknown_topic", "not_authorized", "unprocessable"})


def undelivered(forward: StepState, error: ErrorInfo, instance: str | None) -> bool:
    """Whether an error reply says the step's only attempt never went out: the outbox's
    reply for a command Kafka refused (no instance answered it) to a step with no attempt
    before it, so that nothing of the step went out in this round."""
    return error.code in UNDELIVERED and instance is None and not forward.history


def mark_sent(workflow: Workflow, transition: Transition) -> None:
    """Note, in the state about to be committed, where each step undone once attempted
    (`Workflow.undo_attempts`) had its attempt sent: called with the commands that will go
    out, after whatever held, queued or withdrew some of them."""
    steps = transition.state.steps
    for effect in transition.effects:
        if not isinstance(effect, SendCommand) or effect.command.step not in workflow.undo_attempts:
            continue
        command = effect.command
        current = steps.get(command.step)
        if current is not None and current.command_id == command.command_id:
            went = [service for service in _sent(current) if service != command.service]
            sent = ",".join([*went, command.service])
            if current.sent != sent:
                steps[command.step] = evolve(current, sent=sent)


def begin(workflow: Workflow, transition: Transition, now_ms: int) -> None:
    """Enter ``compensating`` (the cause is already in ``state.error``)."""
    state = transition.state
    state.status = WorkflowStatus.COMPENSATING
    state.compensations = {}
    transition.count(wf(workflow.name, "compensating"))
    abandon_in_flight(workflow, transition, now_ms, everything=False)


def abandon_in_flight(
    workflow: Workflow, transition: Transition, now_ms: int, *, everything: bool
) -> None:
    """Stop forward work: steps waiting to retry or parked fail with their last error;
    steps in flight are given up too when they have no timeout (or `everything`)."""
    state = transition.state
    for sid, s in list(state.steps.items()):
        child = workflow.steps[sid].child
        if s.status is StepStatus.RUNNING and child and child.on_cancel == "cancel":
            # Cancelled, the child run ends and answers: awaited, as a step with a timeout
            # is, so that work it completed meanwhile is undone rather than left standing.
            give_up(transition, workflow.steps[sid], s, "the run is being compensated")
            if not everything:
                continue
        if s.status is StepStatus.RETRYING:
            transition.cleared.append(timer_name("retry", state, sid, s.attempt))
        elif s.status is StepStatus.QUEUED:  # released from its queue, maybe, not yet fired
            transition.cleared.append(timer_name("unpark", state, sid, s.attempt))
        elif s.status in (StepStatus.PARKED, StepStatus.WAITING) or (
            s.status is StepStatus.RUNNING and (everything or not workflow.steps[sid].timeout_ms)
        ):
            transition.cleared.append(timer_name("timeout", state, sid, s.attempt))
        else:
            continue
        error = s.error if s.status is StepStatus.RETRYING else None
        state.steps[sid] = evolve(
            s, status=StepStatus.FAILED, error=error or abandoned(sid), finished_ms=now_ms
        )


def abandoned(sid: str) -> Failure:
    """Why a step given up because its run began to compensate failed."""
    return {
        "message": f"step {sid!r} was given up: the run is being compensated",
        "code": "abandoned",
        "step": sid,
    }


def progress(reply_to: str, workflow: Workflow, transition: Transition, now_ms: int) -> Transition:
    """Start every compensation whose turn has come; end the run when none is left."""
    state = transition.state
    steps = state.steps
    undos = dict(state.compensations or {})
    state.compensations = undos
    busy: dict[str, bool] = {}
    for sid in reversed(workflow.order):
        step = workflow.steps[sid]
        forward = steps[sid]
        below = any(busy[d] for d in workflow.dependants[sid])
        undo = undos.get(sid)
        targets = owed(step, forward)
        # An undo says whose work it undoes (`via`) unless it is the one `compensation`
        # names: with work done at more than one service, each does.
        named = (_worked_at(forward) or step.service,)
        first = targets[0] if targets and targets != named else None
        if targets and not below and state.paused_ms is None:
            if undo is None:
                base = (state.undo_base or {}).get(sid, 0)
                undo = undos[sid] = _dispatch(
                    reply_to, transition, step, now_ms, base + 1, None, base, first
                )
            elif then := _next(targets, undo):
                # Undone there: the next service's undo, its retries counted afresh.
                undo = undos[sid] = _dispatch(
                    reply_to, transition, step, now_ms, undo.attempt + 1, history_of(undo),
                    undo.attempt, then,
                )  # fmt: skip
        busy[sid] = (
            below
            or forward.status in _IN_FLIGHT
            or bool(targets and (undo is None or undo.status in _IN_FLIGHT or _next(targets, undo)))
        )  # a paused run's undo not yet sent keeps it compensating until it is resumed
    if any(busy.values()):
        return transition
    failed = any(u.status is StepStatus.FAILED for u in undos.values())
    cancelled = state.error is not None and state.error.get("code") in ("cancelled", COMPENSATED)
    status = (
        WorkflowStatus.COMPENSATION_FAILED
        if failed
        else WorkflowStatus.CANCELLED
        if cancelled
        else WorkflowStatus.FAILED
    )
    if undos and not failed:
        transition.count(wf(workflow.name, "compensated"))
    return end(transition, None, state.error, now_ms, status, workflow)


def undo_replied(
    reply_to: str, workflow: Workflow, state: WorkflowState, reply: ReplyEvent, now_ms: int
) -> Transition:
    """A reply to the current attempt of a step's compensation."""
    state = fork(state)
    state.updated_ms = now_ms
    transition = Transition(state)
    undos = state.compensations = dict(state.compensations or {})
    undo = undos[reply.step]
    step = workflow.steps[reply.step]
    compensate = undo_compensation(step, state.steps[step.id], undo)
    assert compensate is not None  # an undo was only started for a step that has one
    if compensate.timeout_ms:
        transition.cleared.append(timer_name("undo_timeout", state, step.id, undo.attempt))
    if reply.status is ReplyStatus.OK:
        undos[step.id] = evolve(
            undo,
            status=StepStatus.COMPLETED,
            output=reply.output,
            finished_ms=now_ms,
            instance=reply.instance,
        )
        transition.count(svc(compensate.service, "ok"))
        transition.outcomes.append((compensate.service, True))
        observe(
            transition, compensate.service, "ok", step.id, undo, now_ms, reply.instance, undo=True
        )
        return progress(reply_to, workflow, transition, now_ms)
    error = reply.error or ErrorInfo(message="service replied error without details")
    failure = failure_of(error)
    failure["step"] = step.id
    outcome = "error" if error.retryable else "rejected"
    transition.count(svc(compensate.service, outcome))
    observe(
        transition, compensate.service, outcome, step.id, undo, now_ms, reply.instance, undo=True
    )
    if error.retryable:
        transition.outcomes.append((compensate.service, False))
    return _fail(reply_to, workflow, transition, step, failure, now_ms, reply.instance)


def undo_timer(
    reply_to: str, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
) -> Transition | None:
    """A compensation's timeout or retry timer fell due; None when it is stale."""
    undo = (state.compensations or {}).get(timer.step)
    if undo is None or undo.attempt != timer.attempt:
        return None
    step = workflow.steps[timer.step]
    compensate = undo_compensation(step, state.steps[step.id], undo)
    if compensate is None:
        return None
    if timer.kind == "undo_timeout" and undo.status is StepStatus.RUNNING:
        transition = forked(state, now_ms, timer)
        transition.count(svc(compensate.service, "timeout"))
        transition.outcomes.append((compensate.service, False))
        observe(
            transition,
            compensate.service,
            "timeout",
            step.id,
            undo,
            now_ms,
            undo.instance,
            undo=True,
        )
        failure: Failure = {
            "message": f"compensation of step {step.id!r} attempt {timer.attempt} got no "
            f"reply within {compensate.timeout_ms} ms",
            "code": "timeout",
            "retryable": True,
            "step": step.id,
        }
        return _fail(reply_to, workflow, transition, step, failure, now_ms, None)
    if timer.kind == "undo_retry" and undo.status is StepStatus.RETRYING:
        transition = forked(state, now_ms, timer)
        undos = transition.state.compensations = dict(state.compensations or {})
        transition.count(svc(compensate.service, "retried"))
        undos[step.id] = _dispatch(
            reply_to, transition, step, now_ms, undo.attempt + 1, history_of(undo), undo.base,
            undo.via,
        )  # fmt: skip
        return progress(reply_to, workflow, transition, now_ms)
    return None


def refuse_undo(
    reply_to: str,
    workflow: Workflow,
    transition: Transition,
    command: CommandEvent,
    failure: Failure,
    now_ms: int,
) -> Transition:
    """A compensation's command cannot be delivered (too large): that undo fails."""
    state = transition.state
    withdraw(transition, command)
    undos = state.compensations = dict(state.compensations or {})
    undos[command.step] = evolve(
        undos[command.step], status=StepStatus.FAILED, error=failure, finished_ms=now_ms
    )
    return progress(reply_to, workflow, transition, now_ms)


def _fail(
    reply_to: str,
    workflow: Workflow,
    transition: Transition,
    step: Step,
    failure: Failure,
    now_ms: int,
    instance: str | None,
) -> Transition:
    """An attempt of a compensation failed: retry it by its policy, or give it up."""
    state = transition.state
    undos = state.compensations = dict(state.compensations or {})
    undo = undos[step.id]
    compensate = undo_compensation(step, state.steps[step.id], undo)
    assert compensate is not None
    policy = compensate.retry
    if failure.get("retryable") and undo.attempt - undo.base < policy.max_attempts:
        undos[step.id] = evolve(
            undo, status=StepStatus.RETRYING, error=failure, finished_ms=now_ms, instance=instance
        )
        delay = retry_delay_ms(policy, undo.attempt - undo.base, undo.command_id or "")
        transition.timers.append(
            SetTimer("undo_retry", state.workflow_id, delay, step.id, undo.attempt)
        )
        return transition
    undos[step.id] = evolve(
        undo, status=StepStatus.FAILED, error=failure, finished_ms=now_ms, instance=instance
    )
    transition.count(wf(workflow.name, "compensation_failed_steps"))
    return progress(reply_to, workflow, transition, now_ms)


def _dispatch(
    reply_to: str,
    transition: Transition,
    step: Step,
    now_ms: int,
    attempt: int,
    history: list[dict[str, Any]] | None,
    base: int = 0,
    service: str | None = None,
) -> StepState:
    """Send `attempt` of `step`'s compensation (`base` of them were made in earlier
    rounds or at another service) of the work done at `service` (None: the one
    `compensation` names); its state."""
    state = transition.state
    compensate = (
        compensation_at(step, service)
        if service is not None
        else compensation(step, state.steps[step.id])
    )
    assert compensate is not None
    try:
        if step.child is not None:  # the child run the step's completed attempt started
            undo_input: Any = {"run": child_run_id(state.steps[step.id].command_id or "")}
        else:
            undo_input = compensate.input.render(context(state, state.steps))
    except ExpressionError as exc:
        error: Failure = {
            "message": f"compensation of step {step.id!r} could not evaluate its input: {exc}",
            "code": "expression_error",
            "step": step.id,
        }
        return StepState(
            StepStatus.FAILED,
            attempt=attempt,
            error=error,
            started_ms=now_ms,
            finished_ms=now_ms,
            history=history,
            base=base,
            via=service,
        )
    cid = undo_command_id(state.workflow_id, step.id, attempt)
    timeout = compensate.timeout_ms
    deadline = now_ms + timeout if timeout else None
    send(
        transition,
        step.id,
        compensate.service,
        compensate.action,
        attempt,
        cid,
        undo_input,
        reply_to,
        now_ms,
        deadline,
        undo_key(state.workflow_id, step.id, state.round, service),
    )
    transition.count(svc(compensate.service, "compensations"))
    if compensate.timeout_ms:
        transition.timers.append(
            SetTimer("undo_timeout", state.workflow_id, compensate.timeout_ms, step.id, attempt)
        )
    return StepState(
        StepStatus.RUNNING,
        attempt=attempt,
        command_id=cid,
        started_ms=now_ms,
        history=history,
        base=base,
        via=service,
    )
