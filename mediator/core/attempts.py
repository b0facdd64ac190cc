"""One attempt of a step ending without a reply (pure): its timeout passed, its instance
was marked down, or it failed; and the next attempt of a step sent (after a retry's
backoff, a parked one released, a wait begun again)."""

from __future__ import annotations

from mediator.core import signals
from mediator.core.counters import svc, wf
from mediator.core.expressions import ExpressionError
from mediator.core.lineage import give_up
from mediator.core.progress import _expression_failure, render_input
from mediator.core.results import history_of
from mediator.core.sends import Sends
from mediator.core.state import Failure, StepStatus, WorkflowState, evolve
from mediator.core.timers import Fired, SetTimer, retry_delay_ms
from mediator.core.transition import Transition, context, forked, observe, timer_name
from mediator.core.workflow import Step, Workflow
from topics.events import WorkflowStatus

__all__ = ["MAX_DEATH_REROUTES", "Attempts"]

#: How many times one step's attempts are sent again because their instance was marked
#: down, without spending its retry budget.
MAX_DEATH_REROUTES = 3


class Attempts(Sends):
    """Ends attempts that got no reply, and sends the next ones."""

    def _timed_out(
        self, workflow: Workflow, state: WorkflowState, step: Step, timer: Fired, now_ms: int
    ) -> Transition:
        """The current attempt of `step` got no reply (or stayed parked) for its timeout."""
        step_state = state.steps[step.id]
        status = step_state.status
        transition = forked(state, now_ms, timer)
        if status is StepStatus.WAITING:
            transition.count(wf(workflow.name, "wait_timeout"))
            message = (
                f"step {step.id!r} attempt {timer.attempt} got no signal {step.wait!r} within "
                f"{step.timeout_ms} ms"
            )
            code = "timeout"
        elif status is StepStatus.PARKED:
            transition.count(svc(step.service, "parked_timeout"))
            message = (
                f"step {step.id!r} attempt {timer.attempt} stayed parked for "
                f"{step.timeout_ms} ms: the circuit breaker of {step.service!r} is open"
            )
            code = "circuit_open"
        else:
            service = step_state.via or step.service
            give_up(transition, step, step_state, f"step {step.id!r} timed out")
            transition.count(svc(service, "timeout"))
            transition.outcomes.append((service, False))
            observe(
                transition,
                service,
                "timeout",
                step.id,
                step_state,
                now_ms,
                step_state.instance,
            )
            if step_state.instance:
                transition.instance_outcomes.append((service, step_state.instance, False))
            message = (
                f"step {step.id!r} attempt {timer.attempt} got no reply within {step.timeout_ms} ms"
            )
            code = "timeout"
        failure: Failure = {
            "message": message,
            "code": code,
            "retryable": True,
            "step": step.id,
        }
        return self._fail_attempt(workflow, transition, step, failure, now_ms, None)

    def _fail_attempt(
        self,
        workflow: Workflow,
        transition: Transition,
        step: Step,
        failure: Failure,
        now_ms: int,
        instance: str | None,
    ) -> Transition:
        """An attempt failed: schedule the next after its backoff if the error is retryable
        and attempts are left (replay), else the step fails and so does the run."""
        state = transition.state
        current = state.steps[step.id]
        policy = step.retry
        replay = bool(
            failure.get("retryable")
            and state.status is WorkflowStatus.RUNNING
            and current.attempt - current.base < policy.max_attempts
        )
        state.steps[step.id] = evolve(
            current,
            status=StepStatus.RETRYING if replay else StepStatus.FAILED,
            output=None,
            error=failure,
            finished_ms=now_ms,
            instance=instance or current.instance,
        )
        if replay:
            delay = retry_delay_ms(policy, current.attempt - current.base, current.command_id or "")
            transition.timers.append(
                SetTimer("retry", state.workflow_id, delay, step.id, current.attempt)
            )
            return transition
        if state.status is WorkflowStatus.COMPENSATING:
            return self._compensate(workflow, transition, now_ms)
        return self._finish(workflow, transition, now_ms, failure)

    def _moved_off_dead(
        self, workflow: Workflow, transition: Transition, step: Step, now_ms: int
    ) -> Transition:
        """The instance running the step's current attempt was marked down: the attempt
        failed, and the next one goes out now (to be routed elsewhere) without spending the
        retry budget, up to `MAX_DEATH_REROUTES` times per step. Past that the attempt
        fails like a timeout would: a command that kills every instance it reaches is not
        passed around for ever."""
        state = transition.state
        current = state.steps[step.id]
        service = current.via or step.service
        transition.count(svc(service, "instance_down"))
        failure: Failure = {
            "message": f"instance {current.instance!r} of {service!r} was marked down with "
            f"attempt {current.attempt} of step {step.id!r} in flight",
            "code": "instance_down",
            "retryable": True,
            "step": step.id,
        }
        if step.timeout_ms:
            transition.cleared.append(timer_name("timeout", state, step.id, current.attempt))
        moved = sum(
            1
            for h in current.history or ()
            if (h.get("error") or {}).get("code") == "instance_down"
        )
        if moved >= MAX_DEATH_REROUTES:
            return self._fail_attempt(workflow, transition, step, failure, now_ms, None)
        transition.count(svc(service, "rerouted_on_death"))
        state.steps[step.id] = evolve(
            current, error=failure, finished_ms=now_ms, base=current.base + 1
        )
        return self._redispatch(workflow, transition, step, now_ms, current.attempt + 1)

    def _redispatch(
        self, workflow: Workflow, transition: Transition, step: Step, now_ms: int, attempt: int
    ) -> Transition:
        """Send `attempt` of `step` (the next after a retry's backoff, or a parked one)."""
        state = transition.state
        previous = state.steps[step.id]
        try:
            command_input = render_input(step, context(state, state.steps))
        except ExpressionError as exc:
            failure = _expression_failure(step, str(exc))
            state.steps[step.id] = evolve(
                previous, status=StepStatus.FAILED, error=failure, finished_ms=now_ms
            )
            return self._finish(workflow, transition, now_ms, failure)
        if attempt == previous.attempt and previous.status is StepStatus.QUEUED:
            history, started = previous.history, None  # its timeout starts now
        elif attempt == previous.attempt:  # a parked attempt: its timeout is running
            history, started = previous.history, previous.started_ms
        else:
            history, started = history_of(previous), None
        if step.wait is not None:  # a wait retried: it waits again
            state.steps[step.id] = signals.start_wait(
                transition, step, now_ms, attempt, history, previous.base
            )
            if state.steps[step.id].status is StepStatus.COMPLETED:
                return self._advance(workflow, transition, now_ms, workflow.dependants[step.id])
            return transition
        state.steps[step.id] = self._dispatch(
            transition, step, command_input, now_ms, attempt, history, previous.base, started
        )
        return transition
