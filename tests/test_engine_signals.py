"""`wait` steps in the pure engine: a signal completes the step waiting on it with its
payload, one that comes early is kept for the step, a wait times out and is retried like
any step, and a run being compensated gives its waits up."""

from __future__ import annotations

from typing import Any

from mediator.core.engine import Transition
from mediator.core.state import StepStatus, dumps, loads
from mediator.core.timers import SetTimer
from mediator.core.transition import Subscribe
from tests.engine_harness import (
    ENGINE,
    FATAL,
    T0,
    WID,
    Run,
    commands,
    fire,
    make,
    result,
    sent,
    step,
    undoable,
)
from topics.events import ControlAction, ControlEvent, WorkflowStatus


def wait(step_id: str, *deps: str, event: str = "approval", **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "depends_on": list(deps), "wait": {"event": event}, **fields}


def signal(run: Run, event: str, payload: Any, now: int, cid: str = "") -> Transition | None:
    control = ControlEvent(
        control_id=cid or f"s-{event}-{now}",
        action=ControlAction.SIGNAL,
        workflow_id=WID,
        issued_ms=now,
        signal=event,
        payload=payload,
        operator="alice",
    )
    transition = ENGINE.apply_control(run.workflow, run.state, control, now)
    if transition is not None:
        run.last, run.state = transition, transition.state
        run.outstanding.update({c.step: c for c in commands(transition)})
        run.history.append(transition)
    return transition


def test_a_signal_completes_the_waiting_step_with_its_payload() -> None:
    run = Run(
        make(step("reserve"), wait("approve", "reserve", timeout="1h"), step("pay", "approve"))
    )
    waiting = run.complete("reserve")
    assert sent(waiting) == []  # a wait sends nothing
    assert run.statuses()["approve"] == "waiting"
    assert [t.member for t in waiting.timers] == [SetTimer("timeout", WID, 0, "approve", 1).member]
    done = signal(run, "approval", {"ok": True}, T0 + 100)
    assert done is not None and sent(done) == ["pay"]
    approve = run.state.steps["approve"]
    assert (approve.status, approve.output, approve.instance) == (
        StepStatus.COMPLETED, {"ok": True}, "alice",
    )  # fmt: skip
    assert "timeout|wf-1|approve|1" in done.cleared
    assert result(run.complete("pay")).status is WorkflowStatus.COMPLETED


def test_a_signal_that_comes_early_is_kept_for_the_step() -> None:
    run = Run(make(step("reserve"), wait("approve", "reserve"), step("pay", "approve")))
    kept = signal(run, "approval", {"by": "bob"}, T0 + 5, cid="early")
    assert kept is not None and sent(kept) == []
    assert [e["id"] for e in run.state.inbox or []] == ["early"]
    assert loads(dumps(run.state)).inbox == run.state.inbox
    moved = run.complete("reserve")
    assert sent(moved) == ["pay"]  # the wait took the kept signal at once
    assert run.state.steps["approve"].output == {"by": "bob"}
    assert run.state.inbox is None
    # Delivered again (a rewind), it is not kept twice: the run remembers its id.
    again = ENGINE.apply_control(
        run.workflow,
        run.state,
        ControlEvent(
            control_id="early",
            action=ControlAction.SIGNAL,
            workflow_id=WID,
            issued_ms=T0,
            signal="approval",
        ),
        T0 + 50,
    )
    assert again is None


def test_a_wait_that_times_out_is_retried_then_fails_the_run() -> None:
    run = Run(make(wait("approve", timeout="1s", retry={"max_attempts": 2, "backoff": "1s"})))
    assert run.statuses()["approve"] == "waiting"
    timed_out = fire(run, "timeout", "approve", 1, now=T0 + 1_000)
    assert timed_out is not None and run.statuses()["approve"] == "retrying"
    again = fire(run, "retry", "approve", 1, now=T0 + 2_000)
    assert again is not None and run.statuses()["approve"] == "waiting"
    assert run.state.steps["approve"].attempt == 2
    ended = fire(run, "timeout", "approve", 2, now=T0 + 3_000)
    outcome = result(ended)
    assert outcome.status is WorkflowStatus.FAILED
    assert outcome.error is not None and "got no signal 'approval'" in outcome.error.message


def test_a_failing_run_gives_its_waits_up_and_compensates() -> None:
    run = Run(make(undoable("reserve"), wait("approve", "reserve"), step("other")))
    run.complete("reserve")
    failing = run.fail("other", FATAL)
    assert run.state.steps["approve"].status is StepStatus.FAILED
    assert run.state.steps["approve"].error["code"] == "abandoned"  # type: ignore[index]
    assert [c.action for c in commands(failing)] == ["undo_reserve"]


def test_a_signal_to_a_finished_run_does_not_apply() -> None:
    run = Run(make(step("a")))
    run.complete("a")
    assert signal(run, "approval", {}, T0 + 50) is None


def test_a_last_wait_completed_by_a_kept_signal_finishes_the_run() -> None:
    run = Run(make(step("reserve"), wait("approve", "reserve")))
    signal(run, "approval", {"ok": True}, T0 + 5)
    ended = run.complete("reserve")
    outcome = result(ended)
    assert outcome.status is WorkflowStatus.COMPLETED
    assert run.state.steps["approve"].output == {"ok": True}


def test_a_wait_takes_only_the_signals_its_match_holds_for() -> None:
    run = Run(
        make(
            step("charge"),
            {"id": "paid", "depends_on": ["charge"],
             "wait": {"event": "payment",
                      "match": "event.status == 'succeeded' && event.amount == payload.amount"}},
        ),
        {"amount": 5},
    )  # fmt: skip
    run.complete("charge")
    ignored = signal(run, "payment", {"status": "pending", "amount": 5}, T0 + 20)
    assert ignored is not None and run.statuses()["paid"] == "waiting"
    assert [e["payload"]["status"] for e in run.state.inbox or []] == ["pending"]  # kept
    wrong = signal(run, "payment", {"status": "succeeded", "amount": 9}, T0 + 21)
    assert wrong is not None and run.statuses()["paid"] == "waiting"
    done = signal(run, "payment", {"status": "succeeded", "amount": 5}, T0 + 22)
    assert done is not None and result(done).status is WorkflowStatus.COMPLETED
    assert run.state.steps["paid"].output == {"status": "succeeded", "amount": 5}


def test_a_wait_with_a_key_subscribes_its_run_to_it() -> None:
    run = Run(
        make(step("charge"), keyed_wait()),
    )
    started = run.complete("charge", {"id": "pi_42"})
    subscribed = [e for e in started.effects if isinstance(e, Subscribe)]
    assert subscribed == [Subscribe("payment", "pi_42", "paid", 1)]
    # A key the run's data does not give (absent, or not a scalar): no subscription.
    run = Run(
        make(step("charge"), keyed_wait()),
    )
    started = run.complete("charge", {"no_id": True})
    assert [e for e in started.effects if isinstance(e, Subscribe)] == []
    assert run.statuses()["paid"] == "waiting"


def keyed_wait() -> dict[str, Any]:
    wait = {"event": "payment", "key": "steps.charge.id"}
    return {"id": "paid", "depends_on": ["charge"], "wait": wait}
