"""The pure engine under faults: compensation (saga), operator controls, parking and
rerouting while a circuit breaker is open."""

from __future__ import annotations

from mediator.core.counters import svc, wf
from mediator.core.state import Failure, StepStatus
from mediator.core.workflow import Workflow
from tests.engine_harness import (
    BUSY,
    ENGINE,
    FATAL,
    T0,
    WID,
    Run,
    apply_undo,
    commands,
    control,
    fire,
    make,
    result,
    results,
    step,
    undo_reply,
    undoable,
)
from topics.events import ControlAction
from topics.events import WorkflowStatus as WS


def chain() -> Workflow:
    return make(undoable("reserve"), undoable("charge", "reserve"), step("ship", "charge"))


def test_failure_compensates_completed_steps_in_reverse_order() -> None:
    run = Run(chain())
    run.complete("reserve", {"id": "r1"})
    run.complete("charge", {"id": "c1"})
    failing = run.fail("ship", FATAL)
    assert run.state.status is WS.COMPENSATING
    assert results(failing) == []
    [undo_charge] = commands(failing)
    assert (undo_charge.step, undo_charge.action) == ("charge", "undo_charge")
    assert undo_charge.command_id == f"{WID}.charge.undo.1"
    second = apply_undo(run, undo_reply(undo_charge))
    [undo_reserve] = commands(second)
    assert undo_reserve.step == "reserve"
    last = apply_undo(run, undo_reply(undo_reserve))
    outcome = result(last)
    assert outcome.status is WS.FAILED
    assert outcome.error is not None and outcome.error.step == "ship"
    assert outcome.error.message == "card declined"
    assert {k: v.status for k, v in outcome.compensations.items()} == {
        "charge": "completed",
        "reserve": "completed",
    }
    assert last.counters[wf("wf", "compensated")] == 1


def test_a_step_is_compensated_only_after_every_step_that_depended_on_it() -> None:
    run = Run(
        make(
            undoable("top"),
            undoable("left", "top"),
            step("middle", "top"),
            undoable("right", "middle"),
            step("end", "left", "right"),
        )
    )
    run.complete("top")
    run.complete("left")
    run.complete("middle")
    run.complete("right")
    failing = run.fail("end", FATAL)
    undos = {c.step: c for c in commands(failing)}
    assert sorted(undos) == ["left", "right"]  # independent branches undo together
    after_left = apply_undo(run, undo_reply(undos["left"]))
    assert commands(after_left) == []  # `top` waits for `right` (through `middle`)
    after_right = apply_undo(run, undo_reply(undos["right"]))
    [undo_top] = commands(after_right)
    assert undo_top.step == "top"


def test_a_failing_compensation_is_retried_by_its_policy_then_fails_the_run_distinctly() -> None:
    workflow = make(
        step(
            "reserve",
            compensate={"action": "release", "retry": {"max_attempts": 2, "backoff": "1s"}},
        ),
        step("charge", "reserve"),
    )
    run = Run(workflow)
    run.complete("reserve")
    [undo] = commands(run.fail("charge", FATAL))
    retrying = apply_undo(run, undo_reply(undo, ok=False, retryable=True))
    assert run.state.compensations is not None
    assert run.state.compensations["reserve"].status is StepStatus.RETRYING
    [timer] = retrying.timers
    assert (timer.kind, timer.delay_ms // 100) in {("undo_retry", d) for d in range(8, 13)}
    again = fire(run, "undo_retry", "reserve", 1)
    [second] = commands(again)
    assert second.command_id == f"{WID}.reserve.undo.2"
    last = apply_undo(run, undo_reply(second, ok=False, retryable=True))
    outcome = result(last)
    assert outcome.status is WS.COMPENSATION_FAILED
    assert outcome.compensations["reserve"].status == "failed"
    assert outcome.compensations["reserve"].attempts == 2


def test_a_compensation_that_times_out_is_retried() -> None:
    workflow = make(
        step("a", timeout="5s", compensate={"action": "undo", "timeout": "2s"}), step("b", "a")
    )
    run = Run(workflow)
    run.complete("a")
    [undo] = commands(run.fail("b", FATAL))
    assert undo.deadline_ms is not None
    assert [t.kind for t in run.last.timers] == ["undo_timeout"]
    fire(run, "undo_timeout", "a", 1)
    assert run.state.compensations is not None
    assert run.state.compensations["a"].error is not None
    assert run.state.compensations["a"].status is StepStatus.RETRYING


def test_a_step_in_flight_is_awaited_and_compensated_if_it_completes() -> None:
    workflow = make(undoable("a", timeout="10s"), undoable("b"), step("c", "a", "b"))
    run = Run(workflow)
    failing = run.fail("b", FATAL)  # `a` is still running, with a timeout
    assert run.state.status is WS.COMPENSATING
    assert commands(failing) == []
    late = run.complete("a")
    [undo] = commands(late)
    assert undo.step == "a"
    outcome = result(apply_undo(run, undo_reply(undo)))
    assert outcome.status is WS.FAILED
    assert set(outcome.compensations) == {"a"}


def test_a_step_without_timeout_is_not_awaited() -> None:
    workflow = make(undoable("a"), undoable("b"), step("c", "a", "b"))
    run = Run(workflow)
    run.complete("b")
    ended = run.fail("a", FATAL)  # ... a failed: b completed, undo b
    [undo] = commands(ended)
    assert undo.step == "b"


def test_retryable_errors_do_not_retry_once_compensating() -> None:
    workflow = make(
        undoable("a", timeout="10s", retry={"max_attempts": 3}), undoable("b"), step("c", "a", "b")
    )
    run = Run(workflow)
    run.fail("b", FATAL)
    last = run.fail("a", BUSY)
    assert run.state.steps["a"].status is StepStatus.FAILED
    assert result(last).status is WS.FAILED


def test_deadline_while_compensating_gives_up_steps_in_flight() -> None:
    workflow = make(undoable("a", timeout="1h"), step("x"), step("c", "a", "x"), timeout="1m")
    run = Run(workflow)
    run.fail("x", FATAL)  # `a` is in flight with a timeout: awaited
    assert run.state.status is WS.COMPENSATING
    ended = fire(run, "deadline", now=T0 + 60_000)
    assert run.state.steps["a"].status is StepStatus.FAILED
    assert run.state.steps["a"].error is not None
    assert run.state.steps["a"].error["code"] == "abandoned"
    outcome = result(ended)
    assert outcome.status is WS.FAILED
    assert outcome.error is not None and outcome.error.step == "x"
    assert f"timeout|{WID}|a|1" in ended.cleared


def test_deadline_compensates_and_fails_with_deadline_exceeded() -> None:
    run = Run(make(undoable("a"), step("b", "a"), timeout="1m"))
    run.complete("a")
    fired = fire(run, "deadline", now=T0 + 60_000)
    [undo] = commands(fired)
    outcome = result(apply_undo(run, undo_reply(undo)))
    assert outcome.status is WS.FAILED
    assert outcome.error is not None and outcome.error.code == "deadline_exceeded"


def test_cancel_compensates_and_ends_cancelled() -> None:
    run = Run(chain())
    run.complete("reserve")
    transition = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.CANCEL), T0)
    assert transition is not None
    run.state = transition.state
    [undo] = commands(transition)
    assert undo.step == "reserve"
    outcome = result(apply_undo(run, undo_reply(undo)))
    assert outcome.status is WS.CANCELLED
    assert outcome.error is not None and outcome.error.code == "cancelled"
    assert "ops" in outcome.error.message
    again = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.CANCEL), T0)
    assert again is None  # a finished run is not cancelled twice


def test_cancel_without_compensations_ends_at_once() -> None:
    run = Run(make(step("a"), step("b", "a")))
    transition = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.CANCEL), T0)
    assert transition is not None
    assert result(transition).status is WS.CANCELLED


def test_retry_reruns_a_failed_run_from_its_failed_step_keeping_outputs() -> None:
    workflow = make(step("a"), step("b", "a", retry={"max_attempts": 2}), step("c", "b"))
    run = Run(workflow)
    run.complete("a", {"n": 1})
    run.fail("b", FATAL)
    assert run.state.status is WS.FAILED
    transition = ENGINE.apply_control(workflow, run.state, control(ControlAction.RETRY), T0 + 100)
    assert transition is not None
    run.state = transition.state
    run.outstanding = {c.step: c for c in commands(transition)}
    [again] = commands(transition)
    assert again.step == "b" and again.attempt == 2
    assert again.command_id == f"{WID}.b.2"
    assert run.state.status is WS.RUNNING
    assert run.state.steps["a"].output == {"n": 1}
    # The retry policy counts attempts in this round: b may still be retried once.
    run.fail("b", BUSY, now=T0 + 200)
    assert run.state.steps["b"].status is StepStatus.RETRYING
    assert len(run.state.steps["b"].history or []) == 1
    assert ENGINE.apply_control(workflow, run.state, control(ControlAction.RETRY), T0) is None


def test_a_retried_run_ending_within_the_same_millisecond_reports_a_new_result() -> None:
    """Consumers deduplicate results on `result_id`: the result of a round the retry
    re-opened is another result, even when both rounds end at the same millisecond."""
    workflow = make(step("a"))
    run = Run(workflow)
    cancelled = ENGINE.apply_control(workflow, run.state, control(ControlAction.CANCEL), T0)
    assert cancelled is not None
    run.state = cancelled.state
    first = result(cancelled)
    again = control(ControlAction.RETRY).model_copy(update={"control_id": "c-2"})
    retry = ENGINE.apply_control(workflow, run.state, again, T0)
    assert retry is not None
    run.state = retry.state
    run.outstanding = {c.step: c for c in commands(retry)}
    second = result(run.complete("a", now=T0))
    assert (first.status, second.status) == (WS.CANCELLED, WS.COMPLETED)
    assert first.finished_ms == second.finished_ms
    assert first.result_id != second.result_id


def test_retry_reruns_compensated_steps() -> None:
    run = Run(chain())
    run.complete("reserve")
    run.complete("charge")
    [undo_charge] = commands(run.fail("ship", FATAL))
    [undo_reserve] = commands(apply_undo(run, undo_reply(undo_charge)))
    apply_undo(run, undo_reply(undo_reserve))
    assert run.state.status is WS.FAILED
    transition = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.RETRY), T0)
    assert transition is not None
    [first] = commands(transition)
    assert (first.step, first.attempt) == ("reserve", 2)
    assert transition.state.compensations is None


def test_park_holds_the_command_and_unpark_sends_the_same_attempt() -> None:
    workflow = make(step("a", timeout="5s"))
    run = Run(workflow)
    [command] = commands(run.last)
    assert ENGINE.park(run.last, command.command_id)
    assert commands(run.last) == []
    assert run.state.steps["a"].status is StepStatus.PARKED
    assert run.last.parked == [("svc", f"unpark|{WID}|a|1")]
    assert run.last.counters[svc("svc", "sent")] == 0
    released = fire(run, "unpark", "a", 1)
    [again] = commands(released)
    assert again.command_id == command.command_id
    assert again.deadline_ms == command.deadline_ms  # its timeout kept running
    assert released.timers == []


def test_a_parked_step_times_out_and_is_retried() -> None:
    workflow = make(step("a", timeout="5s", retry={"max_attempts": 2}))
    run = Run(workflow)
    [command] = commands(run.last)
    ENGINE.park(run.last, command.command_id)
    timed_out = fire(run, "timeout", "a", 1)
    assert run.state.steps["a"].status is StepStatus.RETRYING
    assert run.state.steps["a"].error is not None
    assert run.state.steps["a"].error["code"] == "circuit_open"
    assert timed_out.outcomes == []  # the service was never asked: not its failure
    assert fire(run, "unpark", "a", 1) is None  # stale now


def test_reroute_sends_the_command_to_the_fallback() -> None:
    workflow = make(step("a", fallback={"service": "backup", "action": "alt"}))
    run = Run(workflow)
    [command] = commands(run.last)
    assert ENGINE.reroute(workflow, run.last, command.command_id)
    [rerouted] = commands(run.last)
    assert (rerouted.service, rerouted.action) == ("backup", "alt")
    assert rerouted.command_id == command.command_id
    run.outstanding["a"] = rerouted
    last = run.complete("a")
    assert last.outcomes == [("backup", True)]
    assert result(last).steps["a"].service == "backup"


def test_breaker_outcomes_count_timeouts_and_retryable_errors_only() -> None:
    run2 = Run(make(step("a"), step("b")))
    assert run2.fail("a", BUSY).outcomes == [("svc", False)]
    run3 = Run(make(step("a"), step("b")))
    assert run3.fail("a", FATAL).outcomes == []
    run4 = Run(make(step("a", timeout="1s"), step("b")))
    assert fire(run4, "timeout", "a", 1).outcomes == [("svc", False)]


def test_a_retry_due_in_the_batch_whose_cancel_ends_the_run_is_not_sent() -> None:
    # The retry timer and the cancel are applied in one batch and committed as one
    # transition: the run ends cancelled (nothing to undo), so the retry's attempt, which
    # no one would wait on, must not go out.
    workflow = make(step("a", retry={"max_attempts": 3, "backoff": "10ms"}))
    run = Run(workflow)
    run.fail("a", BUSY)
    assert run.state.steps["a"].status is StepStatus.RETRYING
    retry = fire(run, "retry", "a", 1)
    assert [c.attempt for c in commands(retry)] == [2]
    cancel = ENGINE.apply_control(workflow, run.state, control(ControlAction.CANCEL), T0 + 60)
    assert cancel is not None
    merged = retry.then(cancel)
    assert result(merged).status is WS.CANCELLED
    assert commands(merged) == []
    assert merged.counters.get(svc("svc", "sent"), 0) == 0


def test_a_retry_due_in_the_batch_whose_deadline_gives_its_step_up_is_not_sent() -> None:
    # A step without a timeout is given up when its run begins to compensate: its retry's
    # attempt, applied first in the same batch, is not sent (only the undo of `a` is).
    workflow = make(
        undoable("a"), step("b", "a", retry={"max_attempts": 3, "backoff": "10ms"}), timeout="1m"
    )
    run = Run(workflow)
    run.complete("a")
    run.fail("b", BUSY)
    retry = fire(run, "retry", "b", 1, now=T0 + 59_000)
    assert [c.step for c in commands(retry)] == ["b"]
    deadline = fire(run, "deadline", now=T0 + 60_000)
    merged = retry.then(deadline)
    assert run.state.steps["b"].status is StepStatus.FAILED
    assert [(c.step, c.action) for c in commands(merged)] == [("a", "undo_a")]


def test_a_command_refused_while_compensating_leaves_the_undos_in_flight() -> None:
    # `u` completed; in one batch `s`'s retry falls due and `t` fails for good: the
    # compensation sends u's undo while s (it has a timeout) is awaited; then s's command
    # turns out too large. The undo must stay, and u must stay completed.
    workflow = make(
        undoable("u"),
        step("s", timeout="5s", retry={"max_attempts": 2}),
        step("t"),
        step("end", "u", "s", "t"),
    )
    run = Run(workflow)
    run.complete("u")
    run.fail("s", BUSY)
    retry = fire(run, "retry", "s", 1, now=T0 + 5_000)
    [s_command] = commands(retry)
    failing = run.fail("t", FATAL, now=T0 + 5_000)
    merged = retry.then(failing)
    assert sorted(c.step for c in commands(merged)) == ["s", "u"]
    too_large: Failure = {"message": "too large", "code": "payload_too_large"}
    refused = ENGINE.refuse_command(workflow, merged, s_command.command_id, too_large, T0)
    [undo] = commands(refused)
    assert (undo.step, undo.action) == ("u", "undo_u")
    state = refused.state
    assert state.status is WS.COMPENSATING
    assert state.steps["u"].status is StepStatus.COMPLETED
    assert state.steps["s"].status is StepStatus.FAILED
    assert state.compensations is not None and state.compensations["u"].status is StepStatus.RUNNING
