"""Child runs in the pure engine: a `workflow` step's attempt starts a child (its request
id the attempt's command id), the child's end answers the step, a parent that stops
waiting cancels the child by the step's policy, and compensating a completed child step
undoes the child's steps in reverse before the parent's compensation moves on."""

from __future__ import annotations

from typing import Any

import pytest

from mediator.core.counters import wf
from mediator.core.engine import Transition
from mediator.core.ids import workflow_id_for
from mediator.core.lineage import CancelChild, ReplyToParent, child_run_id, parent_ref
from mediator.core.state import StepStatus, dumps, loads
from mediator.core.workflow import Workflow
from mediator.definitions import Definitions
from mediator.errors import DefinitionError
from tests.engine_harness import (
    BUSY,
    ENGINE,
    FATAL,
    T0,
    WID,
    Run,
    apply,
    commands,
    control,
    fire,
    make,
    result,
    sent,
    step,
    undo_reply,
    undoable,
)
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    ReplyEvent,
    RequestEvent,
    WorkflowStatus,
)

CHILD = make(undoable("debit"), undoable("ship", "debit"), name="fulfil")


def child_step(step_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "depends_on": list(deps), "workflow": "fulfil", **fields}


class Child:
    """The child run a parent's `run` command starts, driven by hand like `Run`."""

    def __init__(self, parent: Run, command: CommandEvent, workflow: Workflow = CHILD) -> None:
        assert (command.service, command.action) == ("workflow.fulfil", "run")
        request = RequestEvent(
            request_id=command.command_id,
            workflow=workflow.name,
            payload=command.input,
            parent=parent_ref(parent.state, command.step, command.attempt, command.command_id),
        )
        self.wid = workflow_id_for(request.request_id)
        self.workflow = workflow
        self.last = ENGINE.start(workflow, request, self.wid, T0 + 20)
        self.state = self.last.state
        self.outstanding = {c.step: c for c in commands(self.last)}

    def take(self, transition: Transition | None) -> Transition:
        assert transition is not None
        self.last, self.state = transition, transition.state
        self.outstanding.update({c.step: c for c in commands(transition)})
        return transition

    def reply(self, reply: ReplyEvent, now: int = T0 + 30) -> Transition:
        return self.take(ENGINE.apply_reply(self.workflow, self.state, reply, now))

    def complete(self, step_id: str) -> Transition:
        command = self.outstanding.pop(step_id)
        return self.reply(
            ReplyEvent(
                command_id=command.command_id,
                workflow_id=self.wid,
                step=step_id,
                attempt=command.attempt,
                status="ok",
                output={"done": step_id},
            )
        )

    def fail(self, step_id: str) -> Transition:
        command = self.outstanding.pop(step_id)
        return self.reply(
            ReplyEvent(
                command_id=command.command_id,
                workflow_id=self.wid,
                step=step_id,
                attempt=command.attempt,
                status="error",
                error=FATAL,
            )
        )


def told(transition: Transition) -> ReplyEvent:
    """The one reply `transition` (a child run ending) owes its parent."""
    [reply] = [e.reply for e in transition.effects if isinstance(e, ReplyToParent)]
    return reply


def cancels(transition: Transition) -> list[CancelChild]:
    return [e for e in transition.effects if isinstance(e, CancelChild)]


def compensate(child: Child, command: CommandEvent, now: int = T0 + 70) -> Transition | None:
    """The parent's ``compensate`` command `command`, applied to `child` as its control."""
    assert command.action == "compensate" and command.input == {"run": child.wid}
    reply = parent_ref(PARENT_STATE[0], command.step, command.attempt, command.command_id)
    event = ControlEvent(
        control_id=command.command_id,
        action=ControlAction.COMPENSATE,
        workflow_id=child.wid,
        issued_ms=now,
        reply=reply,
    )
    transition = ENGINE.apply_control(child.workflow, child.state, event, now)
    if transition is not None:
        child.take(transition)
    return transition


PARENT_STATE: list[Any] = [None]


def test_a_workflow_step_starts_a_child_whose_end_completes_the_step() -> None:
    run = Run(make(step("quote"), child_step("fulfil", "quote", input={"sku": "steps.quote"})))
    started = run.complete("quote", {"n": 2})
    [command] = commands(started)
    assert command.command_id == f"{WID}.fulfil.1"
    assert command.input == {"sku": {"n": 2}}
    child = Child(run, command)
    assert child.wid == child_run_id(command.command_id)
    assert child.state.parent == {
        "workflow_id": WID, "step": "fulfil", "attempt": 1,
        "command_id": command.command_id, "depth": 1,
    }  # fmt: skip
    assert loads(dumps(child.state)).parent == child.state.parent
    child.complete("debit")
    ended = child.complete("ship")
    reply = told(ended)
    assert (reply.command_id, reply.status, reply.service) == (
        command.command_id, "ok", "workflow.fulfil",
    )  # fmt: skip
    assert reply.output == {"debit": {"done": "debit"}, "ship": {"done": "ship"}}
    done = run.reply(reply, T0 + 40)
    assert result(done).status is WorkflowStatus.COMPLETED
    assert run.state.steps["fulfil"].output == reply.output
    # The same reply again (published twice by the outbox) changes nothing.
    assert ENGINE.apply_reply(run.workflow, run.state, reply, T0 + 41) is None


def test_a_failed_child_fails_the_step_and_the_parent_compensates() -> None:
    run = Run(make(undoable("reserve"), child_step("fulfil", "reserve")))
    [command] = commands(run.complete("reserve"))
    child = Child(run, command)
    child.complete("debit")
    ended = child.fail("ship")  # the child undoes its debit first
    assert child.state.status is WorkflowStatus.COMPENSATING
    [undo] = commands(ended)
    finished = child.reply(undo_reply(undo.model_copy(update={"workflow_id": child.wid})))
    assert child.state.status is WorkflowStatus.FAILED
    reply = told(finished)
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "declined" and not reply.error.retryable
    assert "card declined" in reply.error.message
    compensating = run.reply(reply, T0 + 40)
    assert sent(compensating) == ["reserve"]  # the parent undoes its own step
    assert run.state.steps["fulfil"].status is StepStatus.FAILED


def test_a_retryable_child_failure_starts_a_new_child_for_the_next_attempt() -> None:
    run = Run(make(child_step("fulfil", retry={"max_attempts": 2, "backoff": "1s"})))
    [first] = commands(run.last)
    child = Child(run, first)
    failure = told(
        child.reply(
            ReplyEvent(
                command_id=child.outstanding["debit"].command_id,
                workflow_id=child.wid,
                step="debit",
                attempt=1,
                status="error",
                error=BUSY,
            )
        )
    )
    assert failure.error is not None and failure.error.retryable
    run.reply(failure, T0 + 40)
    assert run.state.steps["fulfil"].status is StepStatus.RETRYING
    retried = fire(run, "retry", "fulfil", 1, now=T0 + 2000)
    [second] = commands(retried)
    assert second.command_id == f"{WID}.fulfil.2"
    assert child_run_id(second.command_id) != child.wid  # a new child run


def test_a_cancelled_parent_cancels_its_running_child_and_awaits_its_end() -> None:
    run = Run(make(child_step("fulfil")))
    PARENT_STATE[0] = run.state
    [command] = commands(run.last)
    child = Child(run, command)
    cancelled = run.history[-1] = ENGINE.apply_control(
        run.workflow, run.state, control(ControlAction.CANCEL), T0 + 5
    )
    assert cancelled is not None
    [cancel] = cancels(cancelled)
    assert cancel.run == child.wid and cancel.control_id == f"{command.command_id}.cancel"
    run.state = cancelled.state
    assert run.state.status is WorkflowStatus.COMPENSATING  # it waits for the child to end
    # The child completed its work before the cancel reached it: the parent undoes it.
    child.complete("debit")
    ended = child.complete("ship")
    assert child.state.status is WorkflowStatus.COMPLETED
    undoing = run.reply(told(ended), T0 + 40)
    [undo] = commands(undoing)
    assert (undo.action, undo.input) == ("compensate", {"run": child.wid})
    # Cancelled in time, the child answers with its cancellation and nothing is undone.
    run = Run(make(child_step("fulfil")))
    [command] = commands(run.last)
    child = Child(run, command)
    run.state = ENGINE.apply_control(
        run.workflow, run.state, control(ControlAction.CANCEL), T0 + 5
    ).state  # type: ignore[union-attr]
    stopped = ENGINE.apply_control(
        child.workflow,
        child.state,
        ControlEvent(control_id=cancel.control_id, action=ControlAction.CANCEL,
                     workflow_id=child.wid, reason=cancel.reason, issued_ms=T0 + 6),
        T0 + 6,
    )  # fmt: skip
    assert stopped is not None and stopped.state.status is WorkflowStatus.CANCELLED
    finished = run.reply(told(stopped), T0 + 7)
    assert result(finished).status is WorkflowStatus.CANCELLED
    assert sent(finished) == []


def test_a_parent_abandons_a_child_its_step_leaves_to_finish() -> None:
    run = Run(make(child_step("fulfil", on_cancel="abandon")))
    cancelled = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.CANCEL), T0 + 5)
    assert cancelled is not None and cancels(cancelled) == []
    assert result(cancelled).status is WorkflowStatus.CANCELLED


def test_a_child_step_that_times_out_cancels_its_child_and_retries() -> None:
    run = Run(make(child_step("fulfil", timeout="5s", retry={"max_attempts": 2})))
    [command] = commands(run.last)
    timed_out = fire(run, "timeout", "fulfil", 1, now=T0 + 5000)
    assert [c.run for c in cancels(timed_out)] == [child_run_id(command.command_id)]
    assert run.state.steps["fulfil"].status is StepStatus.RETRYING


def test_a_child_step_input_must_be_an_object() -> None:
    run = Run(make(child_step("fulfil", input="payload.sku")), {"sku": "A-1"})
    assert run.state.status is WorkflowStatus.FAILED
    assert run.state.error is not None and run.state.error["code"] == "expression_error"
    assert "an object" in run.state.error["message"]


def test_compensating_a_completed_child_step_undoes_the_child_in_reverse() -> None:
    run = Run(make(child_step("fulfil"), step("charge", "fulfil")))
    PARENT_STATE[0] = run.state
    [command] = commands(run.last)
    child = Child(run, command)
    child.complete("debit")
    run.reply(told(child.complete("ship")), T0 + 40)
    assert child.state.status is WorkflowStatus.COMPLETED
    undoing = run.fail("charge", FATAL)
    [undo] = commands(undoing)
    assert undo.service == "workflow.fulfil"
    # Published twice, the control is applied once (its id is remembered).
    started = compensate(child, undo)
    assert started is not None and compensate(child, undo) is None
    assert child.state.status is WorkflowStatus.COMPENSATING
    assert sent(started) == ["ship"]  # the child's last step first
    [undo_ship] = commands(started)
    after_ship = child.reply(undo_reply(undo_ship.model_copy(update={"workflow_id": child.wid})))
    [undo_debit] = commands(after_ship)
    assert undo_debit.step == "debit"
    ended = child.reply(undo_reply(undo_debit.model_copy(update={"workflow_id": child.wid})))
    assert child.state.status is WorkflowStatus.CANCELLED
    assert child.state.error is not None and child.state.error["code"] == "compensated"
    reply = told(ended)
    assert (reply.command_id, reply.status) == (undo.command_id, "ok")
    finished = apply(run.workflow, run.state, reply, T0 + 90)
    assert result(finished).status is WorkflowStatus.FAILED
    assert finished.state.compensations is not None
    assert finished.state.compensations["fulfil"].status is StepStatus.COMPLETED


def test_a_child_with_nothing_to_undo_answers_at_once_and_stays_completed() -> None:
    plain = make(step("debit"), name="fulfil")
    run = Run(make(child_step("fulfil"), step("charge", "fulfil")))
    PARENT_STATE[0] = run.state
    [command] = commands(run.last)
    child = Child(run, command, plain)
    run.reply(told(child.complete("debit")), T0 + 40)
    [undo] = commands(run.fail("charge", FATAL))
    answered = compensate(child, undo)
    assert answered is not None
    assert child.state.status is WorkflowStatus.COMPLETED
    assert told(answered).status == "ok" and told(answered).command_id == undo.command_id


def test_a_compensation_retried_while_the_child_undoes_is_answered_instead() -> None:
    run = Run(make(child_step("fulfil"), step("charge", "fulfil")))
    PARENT_STATE[0] = run.state
    [command] = commands(run.last)
    child = Child(run, command)
    child.complete("debit")
    run.reply(told(child.complete("ship")), T0 + 40)
    [undo] = commands(run.fail("charge", FATAL))
    compensate(child, undo)
    again = undo.model_copy(update={"command_id": undo.command_id + "x", "attempt": 2})
    assert compensate(child, again) is not None
    assert child.state.undo_reply is not None
    assert child.state.undo_reply["command_id"] == again.command_id


def definitions(*workflows: Workflow) -> Definitions:
    loaded = Definitions(workflows)
    loaded.check_children()
    return loaded


def test_definitions_refuse_unknown_children_and_cycles() -> None:
    a = make({"id": "x", "workflow": "b"}, name="a")
    b = make({"id": "y", "workflow": "c"}, name="b")
    c = make({"id": "z", "workflow": "a"}, name="c")
    with pytest.raises(DefinitionError, match="runs workflow 'b', which is not loaded"):
        definitions(a)
    with pytest.raises(DefinitionError, match="a -> b -> c -> a"):
        definitions(a, b, c)
    pinned = make({"id": "x", "workflow": "fulfil", "version": 3}, name="p")
    with pytest.raises(DefinitionError, match="version 3"):
        definitions(pinned, CHILD)
    assert definitions(make(child_step("f"), name="p"), CHILD).child_services() == {
        "workflow.fulfil"
    }
    assert "workflow.fulfil" not in definitions(make(child_step("f"), name="p"), CHILD).services()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"workflow": "f", "service": "s"}, "drop service"),
        ({"workflow": "f", "compensate": {"action": "u"}}, "drop compensate"),
        ({"service": "s", "action": "a", "on_cancel": "abandon"}, "go with `workflow`"),
        ({"service": "workflow.x", "action": "a"}, "are the mediator's"),
    ],
)
def test_a_workflow_step_is_checked_at_load(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        make({"id": "s1", **fields})


def test_a_child_that_completes_after_its_step_timed_out_is_undone() -> None:
    run = Run(make(child_step("fulfil", timeout="5s", retry={"max_attempts": 2})))
    [first] = commands(run.last)
    child = Child(run, first)
    fire(run, "timeout", "fulfil", 1, now=T0 + 5000)  # cancels the child: too late
    child.complete("debit")
    late = told(child.complete("ship"))
    undone = ENGINE.apply_reply(run.workflow, run.state, late, T0 + 5001)
    assert undone is not None
    [order] = [e for e in undone.effects if isinstance(e, CancelChild)]
    assert (order.run, order.undo) == (child.wid, True)
    run.state = undone.state
    # Delivered again, the late reply is not acted on twice.
    assert ENGINE.apply_reply(run.workflow, run.state, late, T0 + 5002) is None
    # The child undoes itself on that order, answering no one.
    control = ControlEvent(
        control_id=order.control_id, action=ControlAction.COMPENSATE,
        workflow_id=child.wid, issued_ms=T0 + 5003,
    )  # fmt: skip
    started = child.take(ENGINE.apply_control(child.workflow, child.state, control, T0 + 5003))
    assert sent(started) == ["ship"] and child.state.undo_reply is None
    # The reply of the attempt that completed the step is no orphan.
    assert run.state.steps["fulfil"].status is StepStatus.RETRYING


def test_a_late_child_of_an_abandoning_step_is_left_alone() -> None:
    run = Run(make(child_step("fulfil", timeout="5s", on_cancel="abandon")))
    [first] = commands(run.last)
    child = Child(run, first)
    fire(run, "timeout", "fulfil", 1, now=T0 + 5000)
    child.complete("debit")
    late = told(child.complete("ship"))
    assert ENGINE.apply_reply(run.workflow, run.state, late, T0 + 5001) is None


def test_a_child_cancelled_by_an_operator_fails_the_step_not_the_parents_status() -> None:
    run = Run(make(child_step("fulfil")))
    [command] = commands(run.last)
    child = Child(run, command)
    stopped = child.take(
        ENGINE.apply_control(
            child.workflow,
            child.state,
            ControlEvent(control_id="op-1", action=ControlAction.CANCEL,
                         workflow_id=child.wid, issued_ms=T0 + 6),
            T0 + 6,
        )
    )  # fmt: skip
    reply = told(stopped)
    assert reply.error is not None and reply.error.code == "child_cancelled"
    ended = run.reply(reply, T0 + 7)
    assert result(ended).status is WorkflowStatus.FAILED  # the parent was not cancelled


def test_a_child_request_given_up_in_its_own_batch_is_neither_sent_nor_cancelled() -> None:
    # One batch: `a` completes (the child step `c` is dispatched: its run's request),
    # `x` fails for good (the compensation begins; `c` has no timeout, so the child is
    # cancelled and awaited), then the deadline gives everything up. The child was never
    # started: neither its request nor a cancel for it goes out.
    workflow = make(undoable("a"), step("x"), child_step("c", "a"), timeout="1m")
    run = Run(workflow)
    started = run.complete("a")
    assert [(c.step, c.service) for c in commands(started)] == [("c", "workflow.fulfil")]
    failed = run.fail("x", FATAL)
    assert any(isinstance(e, CancelChild) for e in failed.effects)
    deadline = fire(run, "deadline", now=T0 + 60_000)
    merged = started.then(failed).then(deadline)
    assert run.state.steps["c"].status is StepStatus.FAILED
    assert [(c.step, c.action) for c in commands(merged)] == [("a", "undo_a")]
    assert not [e for e in merged.effects if isinstance(e, CancelChild)]
    assert merged.counters.get(wf("wf", "children_cancelled"), 0) == 0
