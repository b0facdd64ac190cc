"""Pausing and resuming a run in the pure engine: nothing is dispatched while paused,
replies are still applied, timers that would dispatch are held and set again on resume,
and the deadline's clock stops only when asked."""

from __future__ import annotations

from typing import Any

from mediator.core.counters import wf
from mediator.core.engine import Transition
from mediator.core.state import StepStatus, dumps, loads
from mediator.core.timers import SetTimer
from tests.engine_harness import (
    BUSY,
    ENGINE,
    FATAL,
    T0,
    WID,
    Run,
    apply_undo,
    commands,
    fire,
    make,
    result,
    results,
    sent,
    step,
    undo_reply,
    undoable,
)
from topics.events import ControlAction, ControlEvent, WorkflowStatus


def _control(
    run: Run, action: ControlAction, now: int, cid: str = "", **fields: Any
) -> Transition | None:
    control = ControlEvent(
        control_id=cid or f"c-{action.value}-{now}",
        action=action,
        workflow_id=WID,
        issued_ms=now,
        **fields,
    )
    transition = ENGINE.apply_control(run.workflow, run.state, control, now)
    if transition is not None:
        run.last = transition
        run.state = transition.state
        run.outstanding.update({c.step: c for c in commands(transition)})
        run.history.append(transition)
    return transition


def _timers(transition: Transition) -> list[str]:
    return [t.member for t in transition.timers]


def test_a_paused_run_applies_replies_but_sends_nothing_until_resumed() -> None:
    run = Run(make(step("a"), step("b", "a"), step("c", "b")))
    paused = _control(run, ControlAction.PAUSE, T0 + 5)
    assert paused is not None and sent(paused) == []
    assert paused.counters[wf("wf", "paused")] == 1
    assert run.state.paused_ms == T0 + 5
    assert run.state.condition == "running, paused"
    # The reply to the step in flight is applied; the next step stays pending.
    after = run.complete("a", {"n": 1})
    assert sent(after) == []
    assert run.statuses() == {"a": "completed", "b": "pending", "c": "pending"}
    # Pausing again does not apply; nor does resuming a run that is not paused.
    assert _control(run, ControlAction.PAUSE, T0 + 20) is None
    resumed = _control(run, ControlAction.RESUME, T0 + 30)
    assert resumed is not None and sent(resumed) == ["b"]
    assert run.state.paused_ms is None
    assert resumed.counters[wf("wf", "resumed")] == 1
    assert _control(run, ControlAction.RESUME, T0 + 40) is None
    run.complete("b")
    assert result(run.complete("c")).status is WorkflowStatus.COMPLETED


def test_a_pause_is_kept_in_the_stored_state() -> None:
    run = Run(make(step("a", retry={"max_attempts": 3, "backoff": "1s"})))
    _control(run, ControlAction.PAUSE, T0 + 5)
    run.fail("a", BUSY, now=T0 + 10)
    fire(run, "retry", "a", 1, now=T0 + 1_010)
    again = loads(dumps(run.state))
    assert (again.paused_ms, again.held) == (T0 + 5, [["retry", "a", 1]])


def test_a_retry_falling_due_while_paused_is_held_and_sent_on_resume() -> None:
    run = Run(make(step("a", retry={"max_attempts": 3, "backoff": "1s"}), step("b", "a")))
    _control(run, ControlAction.PAUSE, T0 + 5)
    failing = run.fail("a", BUSY, now=T0 + 10)
    assert [t.kind for t in failing.timers] == ["retry"]  # the backoff is still counted
    held = fire(run, "retry", "a", 1, now=T0 + 1_010)
    assert held is not None and sent(held) == []
    assert held.cleared == ["retry|wf-1|a|1"]  # the fired timer is claimed
    assert run.state.steps["a"].status is StepStatus.RETRYING
    assert run.state.held == [["retry", "a", 1]]
    resumed = _control(run, ControlAction.RESUME, T0 + 5_000)
    assert resumed is not None and sent(resumed) == []
    assert _timers(resumed) == [SetTimer("retry", WID, 0, "a", 1).member]
    assert run.state.held is None
    again = fire(run, "retry", "a", 1, now=T0 + 5_001)
    assert sent(again) == ["a"] and commands(again)[0].attempt == 2


def test_a_step_timeout_keeps_running_while_paused() -> None:
    run = Run(make(step("a", timeout="1s")))
    _control(run, ControlAction.PAUSE, T0 + 5)
    timed_out = fire(run, "timeout", "a", 1, now=T0 + 1_000)
    assert timed_out is not None
    assert result(timed_out).error is not None
    assert result(timed_out).error.code == "timeout"  # type: ignore[union-attr]
    assert run.state.paused_ms is None  # a run that ended is not paused any more


def test_compensation_waits_for_resume() -> None:
    run = Run(make(undoable("a"), step("b", "a")))
    run.complete("a")
    _control(run, ControlAction.PAUSE, T0 + 20)
    failing = run.fail("b", FATAL, now=T0 + 30)
    assert run.state.status is WorkflowStatus.COMPENSATING
    assert sent(failing) == [] and run.state.compensations == {}
    resumed = _control(run, ControlAction.RESUME, T0 + 40)
    assert resumed is not None
    undo = commands(resumed)
    assert [(c.step, c.action) for c in undo] == [("a", "undo_a")]
    ended = apply_undo(run, undo_reply(undo[0]))
    assert result(ended).status is WorkflowStatus.FAILED


def test_a_paused_run_can_be_cancelled_and_compensates_once_resumed() -> None:
    run = Run(make(undoable("a"), step("b", "a")))
    run.complete("a")
    _control(run, ControlAction.PAUSE, T0 + 20)
    cancelled = _control(run, ControlAction.CANCEL, T0 + 30)
    assert cancelled is not None and run.state.status is WorkflowStatus.COMPENSATING
    # b was in flight when the cancel came: no timeout, so it is given up.
    assert sent(cancelled) == [] and run.state.paused_ms == T0 + 20
    resumed = _control(run, ControlAction.RESUME, T0 + 40)
    assert resumed is not None and [c.action for c in commands(resumed)] == ["undo_a"]


def test_a_finished_run_cannot_be_paused() -> None:
    run = Run(make(step("a")))
    run.complete("a")
    assert _control(run, ControlAction.PAUSE, T0 + 20) is None


def test_the_deadline_keeps_running_unless_the_pause_stops_it() -> None:
    workflow = make(step("a"), step("b", "a"), timeout="10s")
    run = Run(workflow)
    _control(run, ControlAction.PAUSE, T0 + 1_000)
    assert run.state.deadline_ms == T0 + 10_000
    fired = fire(run, "deadline", "", 0, now=T0 + 10_000)
    assert fired is not None and result(fired).error is not None

    run = Run(workflow)
    paused = _control(run, ControlAction.PAUSE, T0 + 1_000, pause_deadline=True)
    assert paused is not None
    assert paused.cleared == [SetTimer("deadline", WID, 0, "", 0).member]
    assert (run.state.deadline_ms, run.state.deadline_left_ms) == (None, 9_000)
    # The deadline timer fired before the pause's commit removed it: it is stale.
    assert fire(run, "deadline", "", 0, now=T0 + 10_000) is None
    run.complete("a", now=T0 + 20_000)
    resumed = _control(run, ControlAction.RESUME, T0 + 60_000)
    assert resumed is not None and sent(resumed) == ["b"]
    assert run.state.deadline_ms == T0 + 69_000
    assert _timers(resumed) == [SetTimer("deadline", WID, 9_000, "", 0).member]


def test_a_pause_delivered_again_changes_nothing() -> None:
    run = Run(make(step("a"), step("b", "a")))
    assert _control(run, ControlAction.PAUSE, T0 + 5, cid="p-1") is not None
    _control(run, ControlAction.RESUME, T0 + 6, cid="r-1")
    assert _control(run, ControlAction.PAUSE, T0 + 7, cid="p-1") is None  # redelivered
    assert run.state.paused_ms is None


def test_a_deadline_timer_claimed_before_a_pause_and_applied_after_the_resume_waits() -> None:
    """The deadline timer fell due and was claimed, then a pause that stops the deadline
    and a resume committed before it was applied: it stands for the old deadline, so it
    is set again for the new one instead of failing the run early."""
    run = Run(make(step("a"), timeout="10s"))
    _control(run, ControlAction.PAUSE, T0 + 1_000, pause_deadline=True)
    _control(run, ControlAction.RESUME, T0 + 5_000)
    assert run.state.deadline_ms == T0 + 14_000
    early = fire(run, "deadline", "", 0, now=T0 + 10_000)
    assert early is not None and results(early) == []
    assert _timers(early) == [SetTimer("deadline", WID, 4_000, "", 0).member]
    due = fire(run, "deadline", "", 0, now=T0 + 14_000)
    assert due is not None and result(due).error is not None


def test_a_pause_does_not_stop_a_deadline_that_fired_already() -> None:
    """The deadline fired (the run compensates, awaiting a step in flight): a pause asked
    to stop the deadline leaves it as it is, so a resume cannot fire it a second time."""
    run = Run(make(undoable("a"), step("b", timeout="1h"), step("c", "a", "b"), timeout="10s"))
    run.complete("a")
    fire(run, "deadline", "", 0, now=T0 + 10_000)
    assert run.state.status is WorkflowStatus.COMPENSATING
    paused = _control(run, ControlAction.PAUSE, T0 + 11_000, pause_deadline=True)
    assert paused is not None and paused.cleared == []
    assert (run.state.deadline_ms, run.state.deadline_left_ms) == (T0 + 10_000, None)
    resumed = _control(run, ControlAction.RESUME, T0 + 12_000)
    assert resumed is not None and _timers(resumed) == []
