"""Steps held by a flow-control limit in the pure engine: a queued step sends nothing and
has no timeout running; released (its ``unpark`` timer), it is sent and its timeout starts
then; a run that ends or is compensated gives its queued steps up."""

from __future__ import annotations

from mediator.core.parking import parked, parking_delta
from mediator.core.state import StepStatus
from mediator.core.timers import SetTimer
from tests.engine_harness import (
    ENGINE,
    T0,
    WID,
    Run,
    commands,
    control,
    fire,
    make,
    result,
    sent,
    step,
)
from topics.events import ControlAction, WorkflowStatus


def test_a_queued_step_is_sent_with_a_fresh_timeout_when_released() -> None:
    run = Run(make(step("pay", timeout="5s"), step("ship", "pay")))
    [command] = commands(run.last)
    transition = run.last
    assert ENGINE.queue(transition, command.command_id)
    assert sent(transition) == []
    timeout = SetTimer("timeout", WID, 0, "pay", 1).member
    assert timeout not in [t.member for t in transition.timers]  # not started
    run.state = transition.state
    assert run.statuses()["pay"] == "queued"
    unpark = SetTimer("unpark", WID, 0, "pay", 1).member
    assert transition.parked == [("svc", unpark)]
    assert parked(run.workflow, run.state) == {("svc", unpark)}
    # Its timeout does not fire while it waits (none is set); released much later, it
    # goes out as the same attempt and its timeout starts now.
    released = fire(run, "unpark", "pay", 1, now=T0 + 60_000)
    assert sent(released) == ["pay"] and commands(released)[0].attempt == 1
    assert [t.member for t in released.timers] == [timeout]
    assert run.state.steps["pay"].started_ms == T0 + 60_000
    assert run.state.steps["pay"].status is StepStatus.RUNNING


def test_a_step_rerouted_to_its_fallback_and_queued_there_waits_in_the_fallbacks_queue() -> None:
    # The primary's breaker is open, so the command goes to the fallback, whose own
    # flow-control limit is full: the step waits in the fallback's queue (not in no queue,
    # which would leave it to its run's deadline), and goes out again when released.
    workflow = make(step("pay", timeout="5s", fallback={"service": "backup", "action": "alt"}))
    run = Run(workflow)
    [command] = commands(run.last)
    transition = run.last
    assert ENGINE.reroute(workflow, transition, command.command_id)
    assert ENGINE.queue(transition, command.command_id)
    unpark = SetTimer("unpark", WID, 0, "pay", 1).member
    assert transition.parked == [("backup", unpark)]
    assert parking_delta(workflow, None, transition.state, transition.parked) == [
        ("+", "backup", unpark)
    ]
    run.state = transition.state
    assert parked(workflow, run.state) == {("backup", unpark)}
    released = fire(run, "unpark", "pay", 1, now=T0 + 60_000)
    assert sent(released) == ["pay"] and commands(released)[0].service == "svc"
    assert parking_delta(workflow, transition.state, released.state, released.parked) == [
        ("-", "backup", unpark)
    ]


def test_a_queued_step_holds_a_max_parallel_slot_and_is_given_up_with_its_run() -> None:
    run = Run(make(step("a"), step("b"), max_parallel=1))
    [command] = commands(run.last)
    ENGINE.queue(run.last, command.command_id)
    run.state = run.last.state
    cancelled = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.CANCEL), T0)
    assert cancelled is not None and result(cancelled).status is WorkflowStatus.CANCELLED
    assert sent(cancelled) == []  # `b` never went: `a` held the only slot
    assert SetTimer("unpark", WID, 0, "a", 1).member in cancelled.cleared
    assert parked(run.workflow, cancelled.state) == set()
