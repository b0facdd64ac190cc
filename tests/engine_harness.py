"""Driving the pure engine by hand, event by event: the harness of the engine, saga,
timer, routing and effect tests.

`step` here is a step of a workflow definition whose action is ``do_<id>`` and whose
dependencies are positional (``step("b", "a")``); `tests.helpers.step` is the one the
end-to-end tests use, whose action defaults to the step's id.
"""

from __future__ import annotations

from typing import Any

from mediator.core import saga
from mediator.core.engine import Engine, PublishResult, SendCommand, Transition
from mediator.core.state import StepStatus, WorkflowState, evolve
from mediator.core.timers import Fired
from mediator.core.workflow import Workflow, parse_workflows
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
)

#: The engine every test drives; its replies topic is ``r``.
ENGINE = Engine(replies_topic="r")
WID = "wf-1"
T0 = 1_000


def make(*steps: dict[str, Any], name: str = "wf", **fields: Any) -> Workflow:
    """The one workflow `name` of `steps` (and the workflow's other `fields`)."""
    [workflow] = parse_workflows({"name": name, "steps": list(steps), **fields})
    return workflow


def step(step_id: str, *deps: str, service: str = "svc", **fields: Any) -> dict[str, Any]:
    """A step `step_id` running ``do_<step_id>`` on `service` once `deps` are done."""
    return {
        "id": step_id,
        "service": service,
        "action": f"do_{step_id}",
        "depends_on": list(deps),
        **fields,
    }


def start(workflow: Workflow, payload: dict[str, Any] | None = None, **fields: Any) -> Transition:
    """The first transition of run WID of `workflow`, at T0."""
    request = RequestEvent(
        request_id="req-1", workflow=workflow.name, payload=payload or {}, **fields
    )
    return ENGINE.start(workflow, request, WID, T0)


def commands(transition: Transition) -> list[CommandEvent]:
    """The commands `transition` sends."""
    return [e.command for e in transition.effects if isinstance(e, SendCommand)]


def sent(transition: Transition) -> list[str]:
    """The steps `transition` sends a command for."""
    return [c.step for c in commands(transition)]


def results(transition: Transition) -> list[PublishResult]:
    """The results `transition` publishes."""
    return [e for e in transition.effects if isinstance(e, PublishResult)]


def result(transition: Transition) -> ResultEvent:
    """The one result `transition` publishes."""
    [published] = results(transition)
    return published.result


def ok(command: CommandEvent, output: Any = None, **fields: Any) -> ReplyEvent:
    """A successful reply to `command`."""
    return ReplyEvent(
        command_id=command.command_id,
        workflow_id=command.workflow_id,
        step=command.step,
        attempt=command.attempt,
        status=ReplyStatus.OK,
        output=output,
        **fields,
    )


def failed(command: CommandEvent, error: ErrorInfo | None = None) -> ReplyEvent:
    """An error reply to `command`."""
    return ReplyEvent(
        command_id=command.command_id,
        workflow_id=command.workflow_id,
        step=command.step,
        attempt=command.attempt,
        status=ReplyStatus.ERROR,
        error=error,
    )


def apply(
    workflow: Workflow, state: WorkflowState, reply: ReplyEvent, now: int = T0 + 10
) -> Transition:
    """The transition `reply` makes from `state`; fails if the engine ignores it."""
    transition = ENGINE.apply_reply(workflow, state, reply, now)
    assert transition is not None, f"reply for {reply.step} was ignored"
    return transition


class Run:
    """One run driven by hand: keeps the state and the commands still awaiting a reply."""

    def __init__(self, workflow: Workflow, payload: dict[str, Any] | None = None, **fields: Any):
        self.workflow = workflow
        self.last = start(workflow, payload, **fields)
        self.state = self.last.state
        self.outstanding = {c.step: c for c in commands(self.last)}
        self.history: list[Transition] = [self.last]

    def commit(self) -> None:
        """What the runtime does to the last transition as it commits it (before any
        other transition starts from its state)."""
        if self.workflow.undo_attempts:
            saga.mark_sent(self.workflow, self.last)

    def reply(self, reply: ReplyEvent, now: int) -> Transition:
        self.commit()
        self.last = apply(self.workflow, self.state, reply, now)
        self.state = self.last.state
        self.outstanding.pop(reply.step, None)
        self.outstanding.update({c.step: c for c in commands(self.last)})
        self.history.append(self.last)
        return self.last

    def complete(self, step_id: str, output: Any = None, now: int = T0 + 10) -> Transition:
        return self.reply(ok(self.outstanding[step_id], output), now)

    def fail(self, step_id: str, error: ErrorInfo | None, now: int = T0 + 10) -> Transition:
        return self.reply(failed(self.outstanding[step_id], error), now)

    def running(self) -> set[str]:
        return {s for s, st in self.state.steps.items() if st.status is StepStatus.RUNNING}

    def statuses(self) -> dict[str, str]:
        return {s: st.status.value for s, st in self.state.steps.items()}


# -- saga: compensation, controls and timers ---------------------------------------------

#: A failure no retry mends, and one a retry may.
FATAL = ErrorInfo(message="card declined", code="declined")
BUSY = ErrorInfo(message="busy", retryable=True)


def undoable(step_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    """A `step` compensated by ``undo_<step_id>``."""
    return step(step_id, *deps, compensate={"action": f"undo_{step_id}"}, **fields)


def control(action: ControlAction, reason: str = "ops") -> ControlEvent:
    """An operator's `action` on run WID."""
    return ControlEvent(
        control_id="c-1", action=action, workflow_id=WID, reason=reason, issued_ms=T0
    )


def fire(run: Run, kind: str, step_id: str = "", attempt: int = 0, now: int = T0 + 50) -> Any:
    """Fire `run`'s timer `kind` (for `step_id`, `attempt`) and keep what it does in `run`."""
    fired = Fired.parse(f"{kind}|{WID}|{step_id}|{attempt}")
    assert fired is not None
    run.commit()
    transition = ENGINE.apply_timer(run.workflow, run.state, fired, now)
    if transition is not None:
        run.last = transition
        run.state = transition.state
        run.outstanding.update({c.step: c for c in commands(transition)})
        run.history.append(transition)
    return transition


def undo_reply(command: CommandEvent, ok: bool = True, retryable: bool = False) -> ReplyEvent:
    """A reply to the compensating `command`: done, or failed (`retryable` or not)."""
    return ReplyEvent(
        command_id=command.command_id,
        workflow_id=WID,
        step=command.step,
        attempt=command.attempt,
        status=ReplyStatus.OK if ok else ReplyStatus.ERROR,
        error=None if ok else ErrorInfo(message="undo failed", retryable=retryable),
    )


def apply_undo(run: Run, reply: ReplyEvent, now: int = T0 + 60) -> Transition:
    """Apply the reply to a compensating command to `run`."""
    run.commit()
    transition = ENGINE.apply_reply(run.workflow, run.state, reply, now)
    assert transition is not None
    run.last = transition
    run.state = transition.state
    run.history.append(transition)
    return transition


# -- stored states ------------------------------------------------------------------------

#: A wall clock for states that are stored (with retention and leases), in ms.
NOW = 1_800_000_000_000


def started(wid: str, name: str = "wf") -> WorkflowState:
    """A freshly started run `wid` of a two-step workflow `name`, at revision 1."""
    workflow = make(step("a"), step("b", "a"), name=name)
    request = RequestEvent(request_id=f"req-{wid}", workflow=name)
    return evolve(Engine("r").start(workflow, request, wid, NOW).state, rev=1)
