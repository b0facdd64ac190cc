"""What happens to a command between its transition and Kafka (pure): parked behind an
open breaker, rerouted to a fallback, routed to an instance, or refused (too large)."""

from __future__ import annotations

from mediator.core import saga
from mediator.core.counters import QUEUED, QUEUED_BY_KEY, svc, wf
from mediator.core.expressions import ExpressionError
from mediator.core.lineage import ReplyToParent
from mediator.core.progress import Progress
from mediator.core.state import Failure, StepState, StepStatus, WorkflowState, evolve, fork
from mediator.core.timers import SetTimer
from mediator.core.transition import (
    PublishResult,
    SendCommand,
    Transition,
    context,
    end,
    withdraw,
)
from mediator.core.workflow import Workflow
from topics.events import (
    CommandEvent,
    WorkflowStatus,
)


class Sends(Progress):
    """Changes a transition's commands before it commits."""

    def park(self, transition: Transition, command_id: str) -> bool:
        """Hold back the command `command_id` of `transition` (not yet committed): its
        service's breaker is open. The step waits as `parked`, its timeout still running,
        until the parked queue releases it. False when the command is not a step's
        current attempt (a compensation: those are never parked)."""
        command, step_state = _forward_command(transition, command_id)
        if step_state is None:
            return False
        state = transition.state
        withdraw(transition, command)
        state.steps[command.step] = evolve(step_state, status=StepStatus.PARKED, via=None)
        primary = command.service if step_state.via is None else step_state.via
        transition.count(svc(primary, "parked"))
        unpark = SetTimer("unpark", state.workflow_id, 0, command.step, command.attempt)
        transition.parked.append((primary, unpark.member))
        return True

    def queue(self, transition: Transition, command_id: str, by_key: bool = False) -> bool:
        """Hold back the command `command_id` of `transition` (not yet committed): its
        service is at its flow-control limit (or, `by_key`, its step's concurrency key is
        at its limit). The step waits as `queued` in the service's queue (the parked
        queue; `by_key`: the key's queue, kept by the runtime) until capacity frees; its
        timeout has not started (the timer the dispatch set is dropped: it is set when the
        command goes out). False when the command is not a step's current attempt (a
        compensation: never held). A command rerouted to its step's fallback waits in the
        fallback's queue (its limit refused it), and the step keeps that service as `via`
        so that the queue it waits in can be named from its state (`parking.parked`)."""
        command, step_state = _forward_command(transition, command_id)
        if step_state is None:
            return False
        state = transition.state
        _take_back(transition, command)
        via = command.service if step_state.via == command.service else None
        state.steps[command.step] = evolve(step_state, status=StepStatus.QUEUED, via=via)
        transition.count(svc(command.service, "queued"))
        transition.count(QUEUED_BY_KEY if by_key else QUEUED)
        if not by_key:
            unpark = SetTimer("unpark", state.workflow_id, 0, command.step, command.attempt)
            transition.parked.append((command.service, unpark.member))
        return True

    def hold(
        self,
        workflow: Workflow,
        transition: Transition,
        command_id: str,
        now_ms: int,
        by_key: bool = False,
    ) -> None:
        """The command `command_id` of `transition` (not yet committed) gets no capacity
        (a flow-control permit, or `by_key` its step's concurrency slot): a running run's
        step waits for it in the queue (`queue`). A run being compensated cannot wait: its
        forward command (a retry that fell due in the batch whose deadline or cancel
        began the compensation) is withdrawn instead (`withhold`)."""
        if transition.state.status is WorkflowStatus.RUNNING:
            self.queue(transition, command_id, by_key)
            return
        self.withhold(workflow, transition, command_id, now_ms)

    def withhold(
        self, workflow: Workflow, transition: Transition, command_id: str, now_ms: int
    ) -> bool:
        """Withdraw the forward command `command_id` of a run being compensated (not yet
        committed), which cannot go out now (no capacity, or its service's breaker is
        open): it has not gone out, so there is nothing to await or undo; its step is given
        up and the compensation goes on. False (nothing done) for a run not compensating
        or a command that is not a step's current attempt."""
        if transition.state.status is not WorkflowStatus.COMPENSATING:
            return False
        command, step_state = _forward_command(transition, command_id)
        if step_state is None:
            return False
        _take_back(transition, command)
        failure = saga.abandoned(command.step)
        transition.state.steps[command.step] = evolve(
            step_state, status=StepStatus.FAILED, error=failure, finished_ms=now_ms
        )
        saga.progress(self.replies_topic, workflow, transition, now_ms)
        return True

    def reroute(self, workflow: Workflow, transition: Transition, command_id: str) -> bool:
        """Send the command `command_id` of `transition` (not yet committed) to its step's
        fallback instead: its service's breaker is open. False when the step declares no
        fallback (or its input cannot be rendered): park it then."""
        command, step_state = _forward_command(transition, command_id)
        if step_state is None:
            return False
        step = workflow.steps[command.step]
        fallback = step.fallback
        if fallback is None or step_state.via is not None:
            return False
        state = transition.state
        try:
            alt_input = fallback.input.render(context(state, state.steps))
        except ExpressionError:
            return False
        rerouted = command.model_copy(
            update={"service": fallback.service, "action": fallback.action, "input": alt_input}
        )
        transition.effects = [
            SendCommand(rerouted) if isinstance(e, SendCommand) and e.command is command else e
            for e in transition.effects
        ]
        transition.count(svc(command.service, "sent"), -1)
        transition.count(svc(command.service, "rerouted"))
        transition.count(svc(fallback.service, "sent"))
        state.steps[command.step] = evolve(step_state, via=fallback.service)
        return True

    def route(self, transition: Transition, command_id: str, instance: str, partition: int) -> None:
        """Address the command `command_id` of `transition` (not yet committed) to one
        registered `instance` of its service, through `partition`, which it owns; a step's
        current attempt records it, so the attempt counts as in flight there until it
        moves on."""
        command, step_state = _forward_command(transition, command_id)
        routed = SendCommand(command.model_copy(update={"instance": instance}), partition)
        transition.effects = [
            routed if isinstance(e, SendCommand) and e.command is command else e
            for e in transition.effects
        ]
        if step_state is not None:
            transition.state.steps[command.step] = evolve(step_state, instance=instance)

    def refuse_command(
        self,
        workflow: Workflow,
        transition: Transition,
        command_id: str,
        error: Failure,
        now_ms: int,
    ) -> Transition:
        """`transition` (not yet committed) sends a command that cannot be delivered, e.g.
        it is larger than the broker accepts: the command is withdrawn, its step fails with
        `error` and the run ends (its other new forward commands are withdrawn too), or, if
        it is compensating already, its compensation goes on (its undos stay)."""
        state = transition.state
        command, step_state = _forward_command(transition, command_id)
        transition.count(svc(command.service, "refused"))
        failure: Failure = {**error, "step": command.step}
        if step_state is None:  # a compensation's command
            return saga.refuse_undo(
                self.replies_topic, workflow, transition, command, failure, now_ms
            )
        withdraw(transition, command)
        state.steps[command.step] = evolve(
            step_state, status=StepStatus.FAILED, output=None, error=failure, finished_ms=now_ms
        )
        for effect in list(transition.effects):
            if not isinstance(effect, SendCommand):
                continue
            other, was = _forward_command(transition, effect.command.command_id)
            if was is None:
                continue  # an undo: the compensation it belongs to goes on
            withdraw(transition, other)
            # Never sent: the attempt number is free again (ids stay unique).
            state.steps[other.step] = StepState(
                attempt=was.attempt - 1, history=was.history, base=was.base, sent=was.sent
            )
        if state.status is WorkflowStatus.COMPENSATING:
            return saga.progress(self.replies_topic, workflow, transition, now_ms)
        return self._finish(workflow, transition, now_ms, failure)

    @staticmethod
    def refuse_result(transition: Transition, error: Failure, now_ms: int) -> Transition:
        """The result `transition` publishes cannot be delivered (too large): the run fails
        with `error` instead, and its result says so without the output."""
        state = transition.state
        transition.count(wf(state.workflow, state.status.value), -1)
        transition.effects = [
            e for e in transition.effects if not isinstance(e, PublishResult | ReplyToParent)
        ]
        if state.error is not None:
            cause = state.error.get("message", "")
            error = {**error, "message": f"{error['message']} (the run had failed: {cause})"}
        status = state.status if state.status is WorkflowStatus.COMPENSATION_FAILED else None
        return end(transition, None, error, now_ms, status)

    @staticmethod
    def abandon(state: WorkflowState, error: Failure, now_ms: int) -> Transition:
        """Fail a running run that cannot advance (its definition is gone) with `error`."""
        return end(Transition(fork(state)), None, error, now_ms)

    # -- internals -------------------------------------------------------------------------


def _forward_command(
    transition: Transition, command_id: str
) -> tuple[CommandEvent, StepState | None]:
    """The command `command_id` among the transition's effects, and the state of the step
    whose current attempt it is (None for a compensation's command)."""
    command = next(
        e.command
        for e in transition.effects
        if isinstance(e, SendCommand) and e.command.command_id == command_id
    )
    step_state = transition.state.steps.get(command.step)
    if step_state is None or step_state.command_id != command_id:
        return command, None
    return command, step_state


def _take_back(transition: Transition, command: CommandEvent) -> None:
    """Withdraw `command`, not yet sent, with the timeout its dispatch set (it is set when
    the command goes out). An attempt sent again (a parked step released) kept the timer
    its first dispatch committed: that one is removed with the commit."""
    withdraw(transition, command)
    timeout = SetTimer("timeout", transition.state.workflow_id, 0, command.step, command.attempt)
    transition.timers = [t for t in transition.timers if t.member != timeout.member]
    transition.cleared.append(timeout.member)
