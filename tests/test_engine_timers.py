"""The pure engine's timers: step timeouts, replay with backoff, the workflow deadline."""

from __future__ import annotations

from typing import Any

import pytest

from mediator.core.engine import SetTimer, Transition
from mediator.core.state import StepStatus
from mediator.core.timers import Fired, retry_delay_ms
from mediator.core.workflow import RetryPolicy
from tests.engine_harness import ENGINE, T0, Run, commands, make, ok, result, step
from topics import ErrorInfo, WorkflowStatus


def fire(run: Run, timer: SetTimer, now: int) -> Transition | None:
    fired = Fired.parse(timer.member)
    assert fired is not None
    transition = ENGINE.apply_timer(run.workflow, run.state, fired, now)
    if transition is not None:
        run.state = transition.state
        run.last = transition
        run.outstanding.update({c.step: c for c in commands(transition)})
    return transition


def the_timer(transition: Transition, kind: str) -> SetTimer:
    [timer] = [t for t in transition.timers if t.kind == kind]
    return timer


RETRY3: dict[str, Any] = {"max_attempts": 3, "backoff": "100ms", "multiplier": 2, "jitter": 0.2}


def test_a_step_with_a_timeout_sets_a_timer_per_attempt() -> None:
    run = Run(make(step("a", timeout="2s")))
    timer = the_timer(run.last, "timeout")
    assert (timer.step, timer.attempt, timer.delay_ms) == ("a", 1, 2000)
    assert timer.member == f"timeout|{run.state.workflow_id}|a|1"


def test_a_timeout_with_no_retries_left_fails_the_run_with_a_timeout_error() -> None:
    run = Run(make(step("a", timeout="2s"), step("b", "a")))
    timer = the_timer(run.last, "timeout")

    transition = fire(run, timer, T0 + 2000)

    assert transition is not None and transition.cleared == [timer.member]
    assert run.state.status is WorkflowStatus.FAILED
    outcome = result(transition)
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert outcome.steps["a"].status == "failed" and outcome.steps["b"].status == "pending"
    assert transition.timers == []


def test_a_timer_for_a_step_that_moved_on_is_stale() -> None:
    run = Run(make(step("a", timeout="2s"), step("b", "a")))
    timer = the_timer(run.last, "timeout")
    run.complete("a", {"x": 1})

    assert fire(run, timer, T0 + 2000) is None
    assert run.state.steps["a"].status is StepStatus.COMPLETED


def test_a_retryable_error_is_replayed_after_the_backoff_with_a_new_command_id() -> None:
    run = Run(make(step("a", timeout="5s", retry=RETRY3)))
    first = run.outstanding["a"]
    run.fail("a", ErrorInfo(message="busy", code="busy", retryable=True), now=T0 + 30)
    assert run.state.steps["a"].status is StepStatus.RETRYING
    retry = the_timer(run.last, "retry")
    policy = run.workflow.steps["a"].retry
    assert retry.delay_ms == retry_delay_ms(policy, 1, first.command_id)
    assert 80 <= retry.delay_ms <= 120
    assert commands(run.last) == []

    transition = fire(run, retry, T0 + 30 + retry.delay_ms)

    assert transition is not None
    [second] = commands(transition)
    assert (second.attempt, second.command_id) == (2, first.command_id[:-1] + "2")
    assert the_timer(transition, "timeout").attempt == 2
    # The first attempt's late reply is stale now.
    assert ENGINE.apply_reply(run.workflow, run.state, _ok(first), T0 + 500) is None
    done = run.complete("a", {"ok": True}, now=T0 + 600)
    summary = result(done).steps["a"]
    assert (summary.status, summary.attempts) == ("completed", 2)
    [earlier] = summary.history
    assert earlier.attempt == 1 and earlier.error is not None and earlier.error.code == "busy"


def test_backoff_grows_and_the_last_attempt_fails_the_run() -> None:
    run = Run(make(step("a", retry=RETRY3)))
    delays = []
    for attempt in (1, 2):
        run.fail("a", ErrorInfo(message="busy", retryable=True))
        retry = the_timer(run.last, "retry")
        assert retry.attempt == attempt
        delays.append(retry.delay_ms)
        fire(run, retry, T0 + 1000 * attempt)
    final = run.fail("a", ErrorInfo(message="busy", retryable=True))

    assert 80 <= delays[0] <= 120 and 160 <= delays[1] <= 240
    assert run.state.status is WorkflowStatus.FAILED
    summary = result(final).steps["a"]
    assert summary.attempts == 3 and [h.attempt for h in summary.history] == [1, 2]


def test_a_non_retryable_error_is_not_retried() -> None:
    run = Run(make(step("a", retry=RETRY3)))
    transition = run.fail("a", ErrorInfo(message="no such card", retryable=False))
    assert run.state.status is WorkflowStatus.FAILED and transition.timers == []


def test_the_workflow_deadline_fails_a_run_still_going() -> None:
    run = Run(make(step("a"), timeout="10s"))
    deadline = the_timer(run.last, "deadline")
    assert deadline.delay_ms == 10_000

    transition = fire(run, deadline, T0 + 10_000)

    assert transition is not None
    outcome = result(transition)
    assert outcome.status is WorkflowStatus.FAILED
    assert outcome.error is not None and outcome.error.code == "deadline_exceeded"


def test_the_deadline_of_a_finished_run_is_stale() -> None:
    run = Run(make(step("a"), timeout="10s"))
    deadline = the_timer(run.last, "deadline")
    run.complete("a")
    assert fire(run, deadline, T0 + 10_000) is None


@pytest.mark.parametrize("attempt", [1, 2, 5, 30])
def test_retry_delay_is_deterministic_capped_and_within_the_jitter(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=50, backoff_ms=100, max_backoff_ms=3000, jitter=0.25)
    base = min(3000, 100 * 2 ** (attempt - 1))
    delays = {retry_delay_ms(policy, attempt, f"wf-{n}.a.{attempt}") for n in range(200)}
    assert min(delays) >= base * 0.75 and max(delays) <= base * 1.25
    assert len(delays) > 10  # spread by command id
    assert retry_delay_ms(policy, attempt, "x") == retry_delay_ms(policy, attempt, "x")


def test_timer_names_round_trip_and_junk_is_refused() -> None:
    timer = SetTimer("retry", "wf-1", 100, "charge", 2)
    fired = Fired.parse(timer.member)
    assert fired == Fired("retry", "wf-1", "charge", 2, timer.member)
    for junk in ("", "retry|wf", "later|wf|a|1", "retry|wf|a|x"):
        assert Fired.parse(junk) is None


def _ok(command: Any) -> Any:
    return ok(command, {"late": True})


def test_a_reply_clears_its_attempts_timeout_and_an_ended_run_clears_its_timers() -> None:
    run = Run(make(step("a", timeout="2s"), step("b", "a", timeout="2s"), timeout="1m"))
    wid = run.state.workflow_id
    after_a = run.complete("a")
    assert after_a.cleared == [f"timeout|{wid}|a|1"]
    assert the_timer(after_a, "timeout").step == "b"

    done = run.complete("b")

    assert run.state.status is WorkflowStatus.COMPLETED
    assert sorted(done.cleared) == sorted([f"timeout|{wid}|b|1", f"deadline|{wid}||0"])
    assert done.timers == []


def test_a_run_failing_while_another_step_waits_to_retry_clears_that_retry() -> None:
    run = Run(make(step("a", retry=RETRY3), step("b", timeout="2s")))
    wid = run.state.workflow_id
    run.fail("a", ErrorInfo(message="busy", retryable=True))
    failed = run.fail("b", ErrorInfo(message="broken", retryable=False))

    assert run.state.status is WorkflowStatus.FAILED
    assert f"retry|{wid}|a|1" in failed.cleared and failed.timers == []
