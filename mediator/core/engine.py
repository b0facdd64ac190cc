"""The engine: a pure state machine ``(state, event, now) -> (state', effects)``.

It performs no I/O and reads no clock: the runtime loads state, calls the engine, and
commits the returned `Transition` (new state, effects to publish, counters) atomically.
Because command ids are derived from ``(workflow id, step, attempt)``, replaying the same
event against the same state yields byte-identical effects, so a transition lost to a
compare-and-set conflict can simply be recomputed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mediator.core.expressions import ExpressionError
from mediator.core.state import SATISFIED, StepState, StepStatus, WorkflowState, fork
from mediator.core.timers import Fired, SetTimer, retry_delay_ms
from mediator.core.workflow import Step, Workflow
from topics.events import (
    AttemptSummary,
    CommandEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
    StepSummary,
    WorkflowStatus,
)

#: Steps that hold one of a workflow's `max_parallel` slots.
_BUSY = frozenset({StepStatus.RUNNING, StepStatus.RETRYING})

__all__ = [
    "Effect",
    "Engine",
    "PublishResult",
    "SendCommand",
    "SetTimer",
    "Transition",
    "command_id",
]


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Publish a command to the step's service."""

    command: CommandEvent


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Publish the workflow's result to the requester."""

    result: ResultEvent
    reply_to: str | None


Effect = SendCommand | PublishResult


@dataclass(slots=True)
class Transition:
    """The outcome of one event: the new state, what to publish and what to count."""

    state: WorkflowState
    effects: list[Effect] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    #: Timers to set, committed with the state.
    timers: list[SetTimer] = field(default_factory=list)
    #: Timers (their names) removed with the commit: the one that fired, and those no
    #: longer needed (the timeout of a step that replied, the timers of a run that ended).
    cleared: list[str] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to counter `name`."""
        self.counters[name] = self.counters.get(name, 0) + n


def command_id(workflow_id: str, step: str, attempt: int) -> str:
    """The id of one attempt of one step: deterministic, so recomputation is idempotent."""
    return f"{workflow_id}.{step}.{attempt}"


class Engine:
    """Drives workflow runs. Holds only configuration; every method is pure."""

    def __init__(self, replies_topic: str) -> None:
        self.replies_topic = replies_topic

    def start(
        self, workflow: Workflow, request: RequestEvent, workflow_id: str, now_ms: int
    ) -> Transition:
        """A new run for `request`: dispatch the steps that are ready at once."""
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
            trace_id=request.trace_id,
            deadline_ms=now_ms + workflow.timeout_ms if workflow.timeout_ms else None,
        )
        transition = Transition(state)
        transition.count(f"wf:{workflow.name}:started")
        if workflow.timeout_ms:
            transition.timers.append(SetTimer("deadline", workflow_id, workflow.timeout_ms))
        return self._advance(workflow, transition, now_ms)

    def apply_reply(
        self, workflow: Workflow, state: WorkflowState, reply: ReplyEvent, now_ms: int
    ) -> Transition | None:
        """Apply a service's reply; None when it is a duplicate, stale or unknown."""
        step_state = state.steps.get(reply.step)
        if (
            step_state is None
            or step_state.status is not StepStatus.RUNNING
            or step_state.command_id != reply.command_id
            or step_state.attempt != reply.attempt
            or state.terminal
        ):
            return None
        step = workflow.steps[reply.step]
        state = fork(state)
        state.updated_ms = now_ms
        transition = Transition(state)
        if step.timeout_ms:  # answered: its timeout timer is not needed any more
            timeout = SetTimer("timeout", state.workflow_id, 0, step.id, step_state.attempt)
            transition.cleared.append(timeout.member)
        if reply.status is ReplyStatus.OK:
            state.steps[reply.step] = StepState(
                StepStatus.COMPLETED,
                step_state.attempt,
                step_state.command_id,
                reply.output,
                None,
                step_state.started_ms,
                now_ms,
                reply.instance,
                step_state.history,
            )
            transition.count(f"svc:{step.service}:ok")
            return self._advance(workflow, transition, now_ms, workflow.dependants[reply.step])
        error = reply.error or ErrorInfo(message="service replied error without details")
        failure = error.model_dump(exclude_none=True)
        failure["step"] = reply.step
        transition.count(f"svc:{step.service}:error")
        return self._fail_attempt(workflow, transition, step, failure, now_ms, reply.instance)

    def apply_timer(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        """A timer fell due; None when the run or step has moved on since (stale)."""
        if state.terminal:
            return None
        step_state = state.steps.get(timer.step) if timer.step else None
        if timer.kind == "deadline":
            transition = Transition(fork(state))
            transition.state.updated_ms = now_ms
            transition.cleared.append(timer.member)
            limit = workflow.timeout_ms or 0
            error = {
                "message": f"workflow {workflow.name!r} did not finish within {limit} ms",
                "code": "deadline_exceeded",
            }
            transition.count(f"wf:{workflow.name}:deadline_exceeded")
            return self._finish(workflow, transition, now_ms, error)
        if step_state is None or step_state.attempt != timer.attempt:
            return None
        step = workflow.steps[timer.step]
        if timer.kind == "timeout" and step_state.status is StepStatus.RUNNING:
            state = fork(state)
            state.updated_ms = now_ms
            transition = Transition(state)
            transition.cleared.append(timer.member)
            transition.count(f"svc:{step.service}:timeout")
            failure = {
                "message": f"step {step.id!r} attempt {timer.attempt} got no reply within "
                f"{step.timeout_ms} ms",
                "code": "timeout",
                "retryable": True,
                "step": step.id,
            }
            return self._fail_attempt(workflow, transition, step, failure, now_ms, None)
        if timer.kind == "retry" and step_state.status is StepStatus.RETRYING:
            state = fork(state)
            state.updated_ms = now_ms
            transition = Transition(state)
            transition.cleared.append(timer.member)
            try:
                command_input = step.input.render(_context(state, state.steps))
            except ExpressionError as exc:
                failure = _expression_failure(step, str(exc))
                state.steps[step.id] = StepState(
                    StepStatus.FAILED, step_state.attempt, step_state.command_id, None, failure,
                    step_state.started_ms, now_ms, None, step_state.history,
                )  # fmt: skip
                return self._finish(workflow, transition, now_ms, failure)
            previous = step_state
            state.steps[step.id] = self._dispatch(
                transition, step, command_input, now_ms, previous.attempt + 1, _history(previous)
            )
            transition.count(f"svc:{step.service}:retried")
            return transition
        return None

    def _fail_attempt(
        self,
        workflow: Workflow,
        transition: Transition,
        step: Step,
        failure: dict[str, Any],
        now_ms: int,
        instance: str | None,
    ) -> Transition:
        """An attempt failed: schedule the next after its backoff if the error is retryable
        and attempts are left (replay), else the step fails and so does the run."""
        state = transition.state
        current = state.steps[step.id]
        policy = step.retry
        if failure.get("retryable") and current.attempt < policy.max_attempts:
            state.steps[step.id] = StepState(
                StepStatus.RETRYING, current.attempt, current.command_id, None, failure,
                current.started_ms, now_ms, instance, current.history,
            )  # fmt: skip
            delay = retry_delay_ms(policy, current.attempt, current.command_id or "")
            transition.timers.append(
                SetTimer("retry", state.workflow_id, delay, step.id, current.attempt)
            )
            return transition
        state.steps[step.id] = StepState(
            StepStatus.FAILED, current.attempt, current.command_id, None, failure,
            current.started_ms, now_ms, instance, current.history,
        )  # fmt: skip
        return self._finish(workflow, transition, now_ms, failure)

    def refuse_command(
        self,
        workflow: Workflow,
        transition: Transition,
        command_id: str,
        error: dict[str, Any],
        now_ms: int,
    ) -> Transition:
        """`transition` (not yet committed) sends a command that cannot be delivered, e.g.
        it is larger than the broker accepts: the command is withdrawn, its step fails with
        `error` and the run ends (its other new commands are withdrawn too)."""
        state = transition.state
        command = next(
            e.command
            for e in transition.effects
            if isinstance(e, SendCommand) and e.command.command_id == command_id
        )
        step_state = state.steps[command.step]
        failure = {**error, "step": command.step}
        state.steps[command.step] = StepState(
            StepStatus.FAILED,
            step_state.attempt,
            step_state.command_id,
            None,
            failure,
            step_state.started_ms,
            now_ms,
        )
        transition.count(f"svc:{command.service}:refused")
        kept: list[Effect] = []
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                transition.count(f"svc:{effect.command.service}:sent", -1)
                withdrawn = effect.command.step
                if withdrawn != command.step:
                    state.steps[withdrawn] = StepState()
            else:
                kept.append(effect)
        transition.effects = kept
        return self._finish(workflow, transition, now_ms, failure)

    @staticmethod
    def refuse_result(transition: Transition, error: dict[str, Any], now_ms: int) -> Transition:
        """The result `transition` publishes cannot be delivered (too large): the run fails
        with `error` instead, and its result says so without the output."""
        state = transition.state
        transition.count(f"wf:{state.workflow}:{state.status.value}", -1)
        transition.effects = [e for e in transition.effects if not isinstance(e, PublishResult)]
        if state.error is not None:
            cause = state.error.get("message", "")
            error = {**error, "message": f"{error['message']} (the run had failed: {cause})"}
        return _end(transition, None, error, now_ms)

    @staticmethod
    def abandon(state: WorkflowState, error: dict[str, Any], now_ms: int) -> Transition:
        """Fail a running run that cannot advance (its definition is gone) with `error`."""
        return _end(Transition(fork(state)), None, error, now_ms)

    # -- internals -------------------------------------------------------------------------

    def _advance(
        self,
        workflow: Workflow,
        transition: Transition,
        now_ms: int,
        candidates: Iterable[str] | None = None,
    ) -> Transition:
        """Skip or dispatch every pending step whose dependencies are satisfied.

        `candidates` are the steps that may have become ready (the dependants of the step
        that just completed); None means every step. A step held back by `max_parallel`
        is not among the dependants, so a limited workflow always looks at every step.
        """
        state = transition.state
        steps = state.steps
        if candidates is None or workflow.max_parallel:
            candidates = workflow.order
        running = (
            sum(1 for s in steps.values() if s.status in _BUSY) if workflow.max_parallel else 0
        )
        context: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        # Commands go out only once the whole pass evaluated: a later step's failing
        # expression fails the run, and no service should be asked to work for it.
        ready: list[tuple[Step, Any]] = []
        # Examine candidates in plan order (a heap of positions): a step is looked at only
        # after every step before it that was queued, so a skip that frees it comes first.
        position = workflow.position
        heap = [(position[step_id], step_id) for step_id in candidates]
        heapq.heapify(heap)
        queued = {step_id for _, step_id in heap}
        while heap:
            _, step_id = heapq.heappop(heap)
            step = workflow.steps[step_id]
            if steps[step_id].status is not StepStatus.PENDING or not all(
                steps[dep].status in SATISFIED for dep in step.depends_on
            ):
                continue
            if context is None or step.when is not None:
                context = _context(state, steps)
            try:
                if step.when is not None and not step.when.holds(context):
                    steps[step_id] = StepState(status=StepStatus.SKIPPED, finished_ms=now_ms)
                    transition.count("steps:skipped")
                    _release(workflow, step_id, heap, queued)
                elif not workflow.max_parallel or running < workflow.max_parallel:
                    ready.append((step, step.input.render(context)))
                    running += 1
            except ExpressionError as exc:
                failure = _expression_failure(step, str(exc))
                steps[step_id] = StepState(
                    status=StepStatus.FAILED, error=failure, finished_ms=now_ms
                )
                break
        if failure is not None:
            return self._finish(workflow, transition, now_ms, failure)
        for step, command_input in ready:
            steps[step.id] = self._dispatch(transition, step, command_input, now_ms)
        if not ready and all(s.status in SATISFIED for s in steps.values()):
            return self._finish(workflow, transition, now_ms, None)
        return transition

    def _dispatch(
        self,
        transition: Transition,
        step: Step,
        command_input: Any,
        now_ms: int,
        attempt: int = 1,
        history: list[dict[str, Any]] | None = None,
    ) -> StepState:
        state = transition.state
        cid = command_id(state.workflow_id, step.id, attempt)
        command = CommandEvent(
            command_id=cid,
            workflow_id=state.workflow_id,
            request_id=state.request_id,
            workflow=state.workflow,
            step=step.id,
            service=step.service,
            action=step.action,
            attempt=attempt,
            input=command_input,
            reply_to=self.replies_topic,
            deadline_ms=now_ms + step.timeout_ms if step.timeout_ms else None,
            trace_id=state.trace_id,
            sent_ms=now_ms,
        )
        transition.effects.append(SendCommand(command))
        transition.count(f"svc:{step.service}:sent")
        if step.timeout_ms:
            transition.timers.append(
                SetTimer("timeout", state.workflow_id, step.timeout_ms, step.id, attempt)
            )
        return StepState(StepStatus.RUNNING, attempt, cid, None, None, now_ms, None, None, history)

    def _finish(
        self,
        workflow: Workflow,
        transition: Transition,
        now_ms: int,
        error: dict[str, Any] | None,
    ) -> Transition:
        output: Any = None
        if error is None:
            try:
                output = _output(workflow, transition.state)
            except ExpressionError as exc:
                error = {"message": f"output mapping failed: {exc}", "code": "expression_error"}
        return _end(transition, output, error, now_ms)


def _end(
    transition: Transition, output: Any, error: dict[str, Any] | None, now_ms: int
) -> Transition:
    """Finish the run: completed with `output`, or failed with `error`; publish its result."""
    state = transition.state
    status = WorkflowStatus.FAILED if error is not None else WorkflowStatus.COMPLETED
    state.status = status
    state.output = output
    state.error = error
    state.finished_ms = now_ms
    state.updated_ms = now_ms
    transition.count(f"wf:{state.workflow}:{status.value}")
    transition.effects.append(PublishResult(result_of(state), state.reply_to))
    _clear_timers(transition)
    return transition


def _clear_timers(transition: Transition) -> None:
    """A run that ended needs none of its timers: remove them with the commit, rather
    than let each fire once as stale. (Removing a timer that was never set is harmless.)"""
    state = transition.state
    wid = state.workflow_id
    names = [SetTimer("deadline", wid, 0).member] if state.deadline_ms is not None else []
    for sid, step in state.steps.items():
        if step.status is StepStatus.RUNNING:
            names.append(SetTimer("timeout", wid, 0, sid, step.attempt).member)
        elif step.status is StepStatus.RETRYING:
            names.append(SetTimer("retry", wid, 0, sid, step.attempt).member)
    transition.timers.clear()
    transition.cleared += [name for name in names if name not in transition.cleared]


def _release(
    workflow: Workflow, step_id: str, heap: list[tuple[int, str]], queued: set[str]
) -> None:
    """Queue the dependants of a skipped step: the skip may have made them ready."""
    for dependant in workflow.dependants[step_id]:
        if dependant not in queued:
            queued.add(dependant)
            heapq.heappush(heap, (workflow.position[dependant], dependant))


def result_of(state: WorkflowState) -> ResultEvent:
    """The result event of a finished run (also used to re-send it for a duplicate request)."""
    finished_ms = state.finished_ms or state.updated_ms
    return ResultEvent(
        result_id=f"{state.workflow_id}@{finished_ms}",
        request_id=state.request_id,
        workflow_id=state.workflow_id,
        workflow=state.workflow,
        status=state.status,
        output=state.output,
        error=ErrorInfo.model_validate(state.error) if state.error else None,
        steps={
            sid: StepSummary(
                status=step.status.value,
                attempts=step.attempt,
                duration_ms=step.finished_ms - step.started_ms
                if step.finished_ms is not None and step.started_ms is not None
                else None,
                error=_error_info(step.error),
                history=[_attempt(h) for h in step.history or ()],
            )
            for sid, step in state.steps.items()
        },
        started_ms=state.created_ms,
        finished_ms=finished_ms,
        trace_id=state.trace_id,
    )


def _history(step: StepState) -> list[dict[str, Any]]:
    """`step`'s earlier attempts, and the one that just failed."""
    entry: dict[str, Any] = {"attempt": step.attempt}
    for name in ("started_ms", "finished_ms", "error"):
        value = getattr(step, name)
        if value is not None:
            entry[name] = value
    return [*(step.history or ()), entry]


def _attempt(entry: dict[str, Any]) -> AttemptSummary:
    return AttemptSummary.model_validate({**entry, "error": _error_info(entry.get("error"))})


def _error_info(error: dict[str, Any] | None) -> ErrorInfo | None:
    if not error:
        return None
    return ErrorInfo.model_validate({k: error[k] for k in _ERROR_FIELDS if k in error})


_ERROR_FIELDS = ("message", "code", "retryable", "step")


def _context(state: WorkflowState, steps: dict[str, StepState]) -> dict[str, Any]:
    return {
        "payload": state.payload,
        "steps": {sid: s.output for sid, s in steps.items() if s.status is StepStatus.COMPLETED},
        "workflow": {
            "id": state.workflow_id,
            "request_id": state.request_id,
            "name": state.workflow,
        },
    }


def _output(workflow: Workflow, state: WorkflowState) -> Any:
    context = _context(state, state.steps)
    if workflow.output is not None:
        return workflow.output.render(context)
    return context["steps"]


def _expression_failure(step: Step, reason: str) -> dict[str, Any]:
    return {
        "message": f"step {step.id!r} could not evaluate its input or condition: {reason}",
        "code": "expression_error",
        "step": step.id,
    }
