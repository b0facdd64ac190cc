"""Moving a run on (pure): the steps whose dependencies are met dispatched, a run with
nothing left to do finished, compensated when it failed."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from mediator.core import concurrency, saga, signals
from mediator.core.counters import STEPS_SKIPPED
from mediator.core.expressions import ExpressionError
from mediator.core.lineage import COMPENSATED
from mediator.core.state import SATISFIED, Failure, StepState, StepStatus, WorkflowState, evolve
from mediator.core.timers import SetTimer
from mediator.core.transition import (
    Transition,
    context,
    end,
    send,
)
from mediator.core.workflow import Step, Workflow
from topics.events import (
    WorkflowStatus,
)

#: Error codes a run ends `cancelled` with: an operator's cancel, a parent's compensate.
_CANCELS = frozenset({"cancelled", COMPENSATED})

#: Steps that hold one of a workflow's `max_parallel` slots.
_BUSY = frozenset({StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.PARKED, StepStatus.QUEUED})


def command_id(workflow_id: str, step: str, attempt: int) -> str:
    """The id of one attempt of one step: deterministic, so recomputation is idempotent."""
    return f"{workflow_id}.{step}.{attempt}"


def idempotency_key(workflow_id: str, step: str, round_: int) -> str:
    """The key of a step's work in one round of its run: the same for every attempt,
    reroute and hand-on of the step in that round, another after an operator's retry."""
    return f"{workflow_id}.{step}.r{round_}"


class Progress:
    """Dispatches ready steps and finishes runs. Holds only configuration."""

    def __init__(self, replies_topic: str) -> None:
        self.replies_topic = replies_topic

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
        values: dict[str, Any] | None = None
        failure: Failure | None = None
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
            if values is None or step.when is not None:
                values = context(state, steps)
            try:
                if step.when is not None and not step.when.holds(values):
                    steps[step_id] = evolve(
                        steps[step_id], status=StepStatus.SKIPPED, finished_ms=now_ms
                    )
                    transition.count(STEPS_SKIPPED)
                    _release(workflow, step_id, heap, queued)
                elif not workflow.max_parallel or running < workflow.max_parallel:
                    ready.append((step, render_input(step, values)))
                    running += 1
            except ExpressionError as exc:
                failure = _expression_failure(step, str(exc))
                steps[step_id] = evolve(
                    steps[step_id], status=StepStatus.FAILED, error=failure, finished_ms=now_ms
                )
                break
        if failure is not None:
            return self._finish(workflow, transition, now_ms, failure)
        if ready and (state.paused_ms is not None or state.queued_ms is not None):
            return transition  # they stay pending: resuming (admitting) the run sends them
        signalled = self._start(workflow, transition, ready, now_ms)
        if signalled:  # waits a kept signal completed at once: their dependants may be ready
            after = [d for sid in signalled for d in workflow.dependants[sid]]
            return self._advance(workflow, transition, now_ms, after)
        if not ready and all(s.status in SATISFIED for s in steps.values()):
            return self._finish(workflow, transition, now_ms, None)
        return transition

    def _start(
        self, workflow: Workflow, transition: Transition, ready: list[tuple[Step, Any]], now_ms: int
    ) -> list[str]:
        """Send the ready steps' commands, and start the ready `wait` steps; those a kept
        signal completed at once."""
        steps = transition.state.steps
        signalled: list[str] = []
        for step, command_input in ready:
            previous = steps[step.id]
            attempt = previous.attempt + 1
            if step.wait is not None:
                steps[step.id] = signals.start_wait(
                    transition, step, now_ms, attempt, previous.history, previous.base
                )
                if steps[step.id].status is StepStatus.COMPLETED:
                    signalled.append(step.id)
                continue
            steps[step.id] = self._dispatch(
                transition, step, command_input, now_ms, attempt, previous.history, previous.base
            )
        return signalled

    def _dispatch(
        self,
        transition: Transition,
        step: Step,
        command_input: Any,
        now_ms: int,
        attempt: int = 1,
        history: list[dict[str, Any]] | None = None,
        base: int = 0,
        started_ms: int | None = None,
    ) -> StepState:
        """Send `attempt` of `step`; its state. `started_ms` is given for an attempt that
        was parked: its timeout timer was set then, and its deadline counts from then."""
        state = transition.state
        cid = command_id(state.workflow_id, step.id, attempt)
        started = now_ms if started_ms is None else started_ms
        deadline = started + step.timeout_ms if step.timeout_ms else None
        send(
            transition,
            step.id,
            step.service,
            step.action,
            attempt,
            cid,
            command_input,
            self.replies_topic,
            now_ms,
            deadline,
            idempotency_key(state.workflow_id, step.id, state.round),
        )
        if step.timeout_ms and started_ms is None:
            transition.timers.append(
                SetTimer("timeout", state.workflow_id, step.timeout_ms, step.id, attempt)
            )
        key = None
        if step.concurrency is not None:
            key = concurrency.step_key(step, context(state, state.steps))
        return StepState(
            StepStatus.RUNNING,
            attempt=attempt,
            command_id=cid,
            started_ms=started,
            history=history,
            base=base,
            key=key,
            sent=state.steps[step.id].sent,  # what went out before this attempt
        )

    def _finish(
        self,
        workflow: Workflow,
        transition: Transition,
        now_ms: int,
        error: Failure | None,
    ) -> Transition:
        """End the run: completed with its output, or failed with `error`, after
        compensating its completed steps if any declares a compensation."""
        output: Any = None
        if error is None:
            try:
                output = _output(workflow, transition.state)
            except ExpressionError as exc:
                error = Failure(message=f"output mapping failed: {exc}", code="expression_error")
        if error is not None:
            if saga.needed(workflow, transition.state):
                transition.state.error = error
                saga.begin(workflow, transition, now_ms)
                return self._compensate(workflow, transition, now_ms)
            status = WorkflowStatus.CANCELLED if error.get("code") in _CANCELS else None
            return end(transition, None, error, now_ms, status, workflow)
        return end(transition, output, error, now_ms, None, workflow)

    def _compensate(self, workflow: Workflow, transition: Transition, now_ms: int) -> Transition:
        return saga.progress(self.replies_topic, workflow, transition, now_ms)


def render_input(step: Step, values: dict[str, Any]) -> Any:
    """The input of `step`'s command from the run's `values`; a child run's payload must
    be an object (`ExpressionError` when it is not)."""
    rendered = step.input.render(values)
    concurrency.step_key(step, values)  # a key that does not render fails like the input
    if step.child is not None and not isinstance(rendered, dict):
        msg = f"the input of a `workflow` step is the child's payload: an object, not {rendered!r}"
        raise ExpressionError(msg)
    return rendered


def _output(workflow: Workflow, state: WorkflowState) -> Any:
    values = context(state, state.steps)
    if workflow.output is not None:
        return workflow.output.render(values)
    return values["steps"]


def _expression_failure(step: Step, reason: str) -> Failure:
    return {
        "message": f"step {step.id!r} could not evaluate its input or condition: {reason}",
        "code": "expression_error",
        "step": step.id,
    }


def _release(
    workflow: Workflow, step_id: str, heap: list[tuple[int, str]], queued: set[str]
) -> None:
    """Queue the dependants of a skipped step: the skip may have made them ready."""
    for dependant in workflow.dependants[step_id]:
        if dependant not in queued:
            queued.add(dependant)
            heapq.heappush(heap, (workflow.position[dependant], dependant))
