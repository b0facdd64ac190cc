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

import heapq
from collections.abc import Iterable
from typing import Any

from mediator.core import saga
from mediator.core.expressions import ExpressionError
from mediator.core.results import history_of, result_of
from mediator.core.state import SATISFIED, StepState, StepStatus, WorkflowState, evolve, fork
from mediator.core.timers import Fired, SetTimer, retry_delay_ms
from mediator.core.transition import (
    Effect,
    PublishResult,
    SendCommand,
    Transition,
    context,
    deadline_timer,
    end,
    forked,
    observe,
    send,
    timer_name,
    withdraw,
)
from mediator.core.workflow import Compensation, Step, Workflow
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    WorkflowStatus,
)
from topics.headers import w3c_trace_id

#: Steps that hold one of a workflow's `max_parallel` slots.
_BUSY = frozenset({StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.PARKED})

#: How many times one step's attempts are sent again because their instance was marked
#: down, without spending its retry budget.
MAX_DEATH_REROUTES = 3

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


def command_id(workflow_id: str, step: str, attempt: int) -> str:
    """The id of one attempt of one step: deterministic, so recomputation is idempotent."""
    return f"{workflow_id}.{step}.{attempt}"


def idempotency_key(workflow_id: str, step: str, round_: int) -> str:
    """The key of a step's work in one round of its run: the same for every attempt,
    reroute and hand-on of the step in that round, another after an operator's retry."""
    return f"{workflow_id}.{step}.r{round_}"


class Engine:
    """Drives workflow runs. Holds only configuration; every method is pure."""

    def __init__(self, replies_topic: str) -> None:
        self.replies_topic = replies_topic

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
        )
        transition = Transition(state)
        transition.count(f"wf:{workflow.name}:started")
        if workflow.timeout_ms:
            transition.timers.append(deadline_timer(state, workflow.timeout_ms))
        return self._advance(workflow, transition, now_ms)

    def apply_reply(
        self, workflow: Workflow, state: WorkflowState, reply: ReplyEvent, now_ms: int
    ) -> Transition | None:
        """Apply a service's reply; None when it is a duplicate, stale or unknown."""
        step_state = state.steps.get(reply.step)
        if step_state is None or state.terminal:
            return None
        if step_state.command_id != reply.command_id:
            undo = state.compensations.get(reply.step) if state.compensations else None
            if (
                undo is None
                or undo.command_id != reply.command_id
                or undo.status is not StepStatus.RUNNING
                or undo.attempt != reply.attempt
                or not _from(reply, saga.compensation(workflow.steps[reply.step], step_state))
            ):
                return None
            return saga.undo_replied(self.replies_topic, workflow, state, reply, now_ms)
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
                step_state.base,
                step_state.via,
            )
            transition.count(f"svc:{service}:ok")
            transition.outcomes.append((service, True))
            observe(transition, service, "ok", reply.step, step_state, now_ms, reply.instance)
            if reply.instance:
                transition.instance_outcomes.append((service, reply.instance, True))
            if state.status is WorkflowStatus.COMPENSATING:
                return self._compensate(workflow, transition, now_ms)
            return self._advance(workflow, transition, now_ms, workflow.dependants[reply.step])
        error = reply.error or ErrorInfo(message="service replied error without details")
        failure = error.model_dump(exclude_none=True)
        failure["step"] = reply.step
        transition.count(f"svc:{service}:error")
        observe(transition, service, "error", reply.step, step_state, now_ms, reply.instance)
        if error.retryable:
            transition.outcomes.append((service, False))
            if reply.instance:
                transition.instance_outcomes.append((service, reply.instance, False))
        return self._fail_attempt(workflow, transition, step, failure, now_ms, reply.instance)

    def apply_timer(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        """A timer fell due; None when the run or step has moved on since (stale)."""
        if state.terminal:
            return None
        if timer.kind == "deadline":
            return self._deadline(workflow, state, timer, now_ms)
        if timer.kind in ("undo_timeout", "undo_retry"):
            return saga.undo_timer(self.replies_topic, workflow, state, timer, now_ms)
        step_state = state.steps.get(timer.step)
        if step_state is None or step_state.attempt != timer.attempt:
            return None
        step = workflow.steps[timer.step]
        status = step_state.status
        if timer.kind == "timeout" and status in (StepStatus.RUNNING, StepStatus.PARKED):
            transition = forked(state, now_ms, timer)
            if status is StepStatus.PARKED:
                transition.count(f"svc:{step.service}:parked_timeout")
                message = (
                    f"step {step.id!r} attempt {timer.attempt} stayed parked for "
                    f"{step.timeout_ms} ms: the circuit breaker of {step.service!r} is open"
                )
                code = "circuit_open"
            else:
                service = step_state.via or step.service
                transition.count(f"svc:{service}:timeout")
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
                    f"step {step.id!r} attempt {timer.attempt} got no reply within "
                    f"{step.timeout_ms} ms"
                )
                code = "timeout"
            failure = {"message": message, "code": code, "retryable": True, "step": step.id}
            return self._fail_attempt(workflow, transition, step, failure, now_ms, None)
        if state.status is not WorkflowStatus.RUNNING:
            return None
        if timer.kind == "retry" and status is StepStatus.RETRYING:
            transition = forked(state, now_ms, timer)
            transition.count(f"svc:{step.service}:retried")
            return self._redispatch(workflow, transition, step, now_ms, step_state.attempt + 1)
        if timer.kind == "reroute" and status is StepStatus.RUNNING:
            return self._moved_off_dead(workflow, forked(state, now_ms, timer), step, now_ms)
        if timer.kind == "unpark" and status is StepStatus.PARKED:
            transition = forked(state, now_ms, timer)
            transition.count(f"svc:{step.service}:unparked")
            return self._redispatch(workflow, transition, step, now_ms, step_state.attempt)
        return None

    def apply_control(
        self, workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
    ) -> Transition | None:
        """An operator's cancel or retry; None when it does not apply to the run as it is
        (cancel of a finished run, retry of one that did not fail) or was applied already
        (the same control delivered again: its id is remembered with the run)."""
        if control.control_id in (state.controls or ()):
            return None
        reason = control.reason or "no reason given"
        who = f" by {control.operator}" if control.operator else ""
        if control.action is ControlAction.CANCEL:
            if state.status is not WorkflowStatus.RUNNING:
                return None
            transition = Transition(fork(state))
            transition.state.updated_ms = now_ms
            transition.count(f"wf:{workflow.name}:cancel_requested")
            error = {"message": f"cancelled{who}: {reason}", "code": "cancelled"}
            transition = self._finish(workflow, transition, now_ms, error)
        elif control.action is ControlAction.RETRY:
            if state.status not in _RETRYABLE_RUNS:
                return None
            transition = self._reopen(workflow, state, now_ms)
        else:
            return None
        applied = transition.state
        applied.controls = [*(applied.controls or ())[-(MAX_CONTROLS_KEPT - 1) :],
                            control.control_id]  # fmt: skip
        return transition

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
        transition.count(f"svc:{primary}:parked")
        unpark = SetTimer("unpark", state.workflow_id, 0, command.step, command.attempt)
        transition.parked.append((primary, unpark.member))
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
        transition.count(f"svc:{command.service}:sent", -1)
        transition.count(f"svc:{command.service}:rerouted")
        transition.count(f"svc:{fallback.service}:sent")
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
        error: dict[str, Any],
        now_ms: int,
    ) -> Transition:
        """`transition` (not yet committed) sends a command that cannot be delivered, e.g.
        it is larger than the broker accepts: the command is withdrawn, its step fails with
        `error` and the run ends (its other new commands are withdrawn too)."""
        state = transition.state
        command, step_state = _forward_command(transition, command_id)
        transition.count(f"svc:{command.service}:refused")
        failure = {**error, "step": command.step}
        if step_state is None:  # a compensation's command
            return saga.refuse_undo(
                self.replies_topic, workflow, transition, command, failure, now_ms
            )
        state.steps[command.step] = evolve(
            step_state, status=StepStatus.FAILED, output=None, error=failure, finished_ms=now_ms
        )
        for effect in list(transition.effects):
            if isinstance(effect, SendCommand):
                withdraw(transition, effect.command)
                withdrawn = effect.command.step
                if withdrawn != command.step:
                    # Never sent: the attempt number is free again (ids stay unique).
                    was = state.steps[withdrawn]
                    state.steps[withdrawn] = StepState(
                        attempt=was.attempt - 1, history=was.history, base=was.base
                    )
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
        status = state.status if state.status is WorkflowStatus.COMPENSATION_FAILED else None
        return end(transition, None, error, now_ms, status)

    @staticmethod
    def abandon(state: WorkflowState, error: dict[str, Any], now_ms: int) -> Transition:
        """Fail a running run that cannot advance (its definition is gone) with `error`."""
        return end(Transition(fork(state)), None, error, now_ms)

    # -- internals -------------------------------------------------------------------------

    def _deadline(
        self, workflow: Workflow, state: WorkflowState, timer: Fired, now_ms: int
    ) -> Transition | None:
        if timer.attempt != state.round:
            return None  # an earlier round's deadline, fired late
        transition = forked(state, now_ms, timer)
        limit = workflow.timeout_ms or 0
        transition.count(f"wf:{workflow.name}:deadline_exceeded")
        if state.status is WorkflowStatus.COMPENSATING:
            # Undoing already: stop waiting for steps still in flight, compensate the rest.
            saga.abandon_in_flight(workflow, transition, now_ms, everything=True)
            return self._compensate(workflow, transition, now_ms)
        error = {
            "message": f"workflow {workflow.name!r} did not finish within {limit} ms",
            "code": "deadline_exceeded",
        }
        return self._finish(workflow, transition, now_ms, error)

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
        transition.count(f"svc:{service}:instance_down")
        failure = {
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
        transition.count(f"svc:{service}:rerouted_on_death")
        state.steps[step.id] = evolve(
            current, error=failure, finished_ms=now_ms, base=current.base + 1
        )
        return self._redispatch(workflow, transition, step, now_ms, current.attempt + 1)

    def _reopen(self, workflow: Workflow, state: WorkflowState, now_ms: int) -> Transition:
        """An operator's retry: the run runs again from the steps that did not complete
        (or whose work was compensated), keeping the outputs of the others."""
        state = fork(state)
        transition = Transition(state)
        undone = state.compensations or {}
        if undone:
            # The next round's compensations go on from these attempt numbers.
            state.undo_base = {**(state.undo_base or {}),
                               **{sid: undo.attempt for sid, undo in undone.items()}}  # fmt: skip
        for sid, step_state in state.steps.items():
            kept = step_state.status is StepStatus.COMPLETED and (
                sid not in undone or undone[sid].status is not StepStatus.COMPLETED
            )
            if kept or step_state.status is StepStatus.PENDING:
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
        transition.count(f"wf:{workflow.name}:retried")
        return self._advance(workflow, transition, now_ms)

    def _redispatch(
        self, workflow: Workflow, transition: Transition, step: Step, now_ms: int, attempt: int
    ) -> Transition:
        """Send `attempt` of `step` (the next after a retry's backoff, or a parked one)."""
        state = transition.state
        previous = state.steps[step.id]
        try:
            command_input = step.input.render(context(state, state.steps))
        except ExpressionError as exc:
            failure = _expression_failure(step, str(exc))
            state.steps[step.id] = evolve(
                previous, status=StepStatus.FAILED, error=failure, finished_ms=now_ms
            )
            return self._finish(workflow, transition, now_ms, failure)
        if attempt == previous.attempt:  # a parked attempt: its timeout is running
            history, started = previous.history, previous.started_ms
        else:
            history, started = history_of(previous), None
        state.steps[step.id] = self._dispatch(
            transition, step, command_input, now_ms, attempt, history, previous.base, started
        )
        return transition

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
            if values is None or step.when is not None:
                values = context(state, steps)
            try:
                if step.when is not None and not step.when.holds(values):
                    steps[step_id] = evolve(
                        steps[step_id], status=StepStatus.SKIPPED, finished_ms=now_ms
                    )
                    transition.count("steps:skipped")
                    _release(workflow, step_id, heap, queued)
                elif not workflow.max_parallel or running < workflow.max_parallel:
                    ready.append((step, step.input.render(values)))
                    running += 1
            except ExpressionError as exc:
                failure = _expression_failure(step, str(exc))
                steps[step_id] = evolve(
                    steps[step_id], status=StepStatus.FAILED, error=failure, finished_ms=now_ms
                )
                break
        if failure is not None:
            return self._finish(workflow, transition, now_ms, failure)
        for step, command_input in ready:
            previous = steps[step.id]
            steps[step.id] = self._dispatch(
                transition,
                step,
                command_input,
                now_ms,
                previous.attempt + 1,
                previous.history,
                previous.base,
            )
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
        return StepState(
            StepStatus.RUNNING, attempt, cid, None, None, started, None, None, history, base
        )

    def _finish(
        self,
        workflow: Workflow,
        transition: Transition,
        now_ms: int,
        error: dict[str, Any] | None,
    ) -> Transition:
        """End the run: completed with its output, or failed with `error`, after
        compensating its completed steps if any declares a compensation."""
        output: Any = None
        if error is None:
            try:
                output = _output(workflow, transition.state)
            except ExpressionError as exc:
                error = {"message": f"output mapping failed: {exc}", "code": "expression_error"}
        if error is not None:
            if saga.needed(workflow, transition.state):
                transition.state.error = error
                saga.begin(workflow, transition, now_ms)
                return self._compensate(workflow, transition, now_ms)
            status = WorkflowStatus.CANCELLED if error.get("code") == "cancelled" else None
            return end(transition, None, error, now_ms, status)
        return end(transition, output, error, now_ms)

    def _compensate(self, workflow: Workflow, transition: Transition, now_ms: int) -> Transition:
        return saga.progress(self.replies_topic, workflow, transition, now_ms)


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


def _release(
    workflow: Workflow, step_id: str, heap: list[tuple[int, str]], queued: set[str]
) -> None:
    """Queue the dependants of a skipped step: the skip may have made them ready."""
    for dependant in workflow.dependants[step_id]:
        if dependant not in queued:
            queued.add(dependant)
            heapq.heappush(heap, (workflow.position[dependant], dependant))


def _output(workflow: Workflow, state: WorkflowState) -> Any:
    values = context(state, state.steps)
    if workflow.output is not None:
        return workflow.output.render(values)
    return values["steps"]


def _expression_failure(step: Step, reason: str) -> dict[str, Any]:
    return {
        "message": f"step {step.id!r} could not evaluate its input or condition: {reason}",
        "code": "expression_error",
        "step": step.id,
    }


def _from(reply: ReplyEvent, compensation: Compensation | None) -> bool:
    """Whether `reply` may answer `compensation`'s command: it names no service, or that
    one."""
    return compensation is not None and reply.service in (None, compensation.service)
