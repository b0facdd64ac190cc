"""Concurrency keys in the pure engine: a run of a workflow with a key starts queued
(nothing sent, its key on the transition); admitted (in the same transition, or later by
its ``admit`` timer) it runs; a cancel or its deadline ends it in the queue; an operator's
retry queues it again under a new round."""

from __future__ import annotations

import pytest

from mediator.core import concurrency
from mediator.core.state import evolve, fork
from mediator.core.stream import transitions
from mediator.errors import DefinitionError
from mediator.storage.slots import slot_score
from tests.engine_harness import (
    ENGINE,
    FATAL,
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

LIMITED = {"concurrency": {"key": "payload.customer", "limit": 2}}


def test_a_run_under_a_key_starts_queued_and_runs_once_admitted() -> None:
    run = Run(make(step("a"), step("b", "a"), **LIMITED), {"customer": "c-7"}, priority=6)
    state = run.state
    assert sent(run.last) == []
    assert state.status is WorkflowStatus.RUNNING and state.queued_ms == T0
    assert run.last.admission == "c-7" and state.concurrency_key == "c-7"
    assert state.priority == 6
    stored = evolve(fork(state), rev=1)
    assert [e.kind for e in transitions(None, stored, T0)] == ["run_started", "run_queued"]
    # Admitted before the commit (a slot was free): the same transition sends `a`.
    admitted = ENGINE.admit(run.workflow, run.last, T0)
    assert sent(admitted) == ["a"] and admitted.state.queued_ms is None
    kinds = [e.kind for e in transitions(stored, evolve(admitted.state, rev=2), T0)]
    assert kinds == ["run_admitted", "step_sent"]


def test_a_queued_run_is_admitted_by_its_timer_of_its_round_only() -> None:
    run = Run(make(step("a"), **LIMITED), {"customer": 42})
    assert run.state.concurrency_key == "42"
    assert fire(run, "admit", attempt=1) is None  # another round's: stale
    admitted = fire(run, "admit", attempt=0, now=T0 + 5_000)
    assert sent(admitted) == ["a"]
    assert run.state.steps["a"].started_ms == T0 + 5_000
    assert fire(run, "admit", attempt=0) is None  # admitted already


def test_a_queued_run_cancelled_or_past_its_deadline_ends_without_sending() -> None:
    workflow = make(step("a"), timeout="30s", **LIMITED)
    run = Run(workflow, {"customer": "c"})
    cancelled = ENGINE.apply_control(workflow, run.state, control(ControlAction.CANCEL), T0 + 1)
    assert cancelled is not None and sent(cancelled) == []
    assert result(cancelled).status is WorkflowStatus.CANCELLED
    assert cancelled.state.queued_ms is None
    assert concurrency.admit_timer(run.state).member in cancelled.cleared
    run = Run(workflow, {"customer": "c"})
    expired = fire(run, "deadline", attempt=0, now=T0 + 30_000)
    assert result(expired).status is WorkflowStatus.FAILED
    assert result(expired).error is not None and result(expired).error.code == "deadline_exceeded"


def test_a_paused_queued_run_holds_its_admission_until_resumed() -> None:
    run = Run(make(step("a"), **LIMITED), {"customer": "c"})
    paused = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.PAUSE), T0)
    assert paused is not None
    run.state = paused.state
    held = fire(run, "admit", attempt=0)
    assert sent(held) == [] and run.state.queued_ms is not None
    resume = control(ControlAction.RESUME).model_copy(update={"control_id": "c-2"})
    resumed = ENGINE.apply_control(run.workflow, run.state, resume, T0 + 100)
    assert resumed is not None and sent(resumed) == []  # the admit timer is set again
    assert concurrency.admit_timer(run.state).member in [t.member for t in resumed.timers]
    run.state = resumed.state
    assert sent(fire(run, "admit", attempt=0, now=T0 + 200)) == ["a"]


def test_an_operators_retry_queues_the_run_again_under_a_new_round() -> None:
    run = Run(make(step("a"), **LIMITED), {"customer": "c"})
    fire(run, "admit", attempt=0)
    failed = run.fail("a", FATAL)
    assert result(failed).status is WorkflowStatus.FAILED
    retried = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.RETRY), T0 + 99)
    assert retried is not None and sent(retried) == []
    assert retried.state.round == 1 and retried.state.queued_ms == T0 + 99
    assert retried.admission == "c"
    run.state = retried.state
    assert fire(run, "admit", attempt=0) is None  # the first round's timer
    assert sent(fire(run, "admit", attempt=1)) == ["a"]


def test_a_key_that_is_not_a_string_or_number_fails_the_run_at_once() -> None:
    run = Run(make(step("a"), **LIMITED), {"customer": {"id": 1}})
    assert result(run.last).status is WorkflowStatus.FAILED
    error = result(run.last).error
    assert error is not None and error.code == "expression_error"
    assert "concurrency key" in error.message and run.last.admission is None


def test_queue_order_is_priority_first_then_age() -> None:
    assert slot_score(9, T0 + 500) < slot_score(0, T0)
    assert slot_score(3, T0) < slot_score(3, T0 + 1)


def test_a_concurrency_key_must_compile_and_its_limit_be_positive() -> None:
    with pytest.raises(DefinitionError):
        make(step("a"), concurrency={"key": "payload.[", "limit": 1})
    with pytest.raises(DefinitionError):
        make(step("a"), concurrency={"key": "payload.c", "limit": 0})
    assert make(step("a"), concurrency={"key": "payload.c"}).concurrency is not None
    assert WID


def test_a_keyed_step_records_its_key_and_queues_by_key_not_in_its_services_queue() -> None:
    keyed = step("pay", concurrency={"key": "payload.tenant", "limit": 1})
    run = Run(make(step("a"), {**keyed, "depends_on": ["a"]}), {"tenant": "t-1"})
    assert run.state.steps["a"].key is None
    run.complete("a")
    [command] = [c for c in commands(run.last) if c.step == "pay"]
    assert run.state.steps["pay"].key == "t-1"
    assert ENGINE.queue(run.last, command.command_id, by_key=True)
    assert sent(run.last) == [] and run.last.parked == []  # the key's queue, not the service's
    run.state = run.last.state
    assert run.state.steps["pay"].status.value == "queued" and run.state.steps["pay"].key == "t-1"
    released = fire(run, "unpark", "pay", 1, now=T0 + 900)
    assert sent(released) == ["pay"] and commands(released)[0].command_id == command.command_id


def test_a_step_key_that_does_not_render_fails_like_its_input() -> None:
    keyed = step("pay", concurrency={"key": "payload.tenant", "limit": 1})
    run = Run(make(keyed), {})
    error = result(run.last).error
    assert error is not None and error.code == "expression_error"
    assert "concurrency key of step 'pay'" in error.message


def test_concurrency_is_refused_on_a_wait_step() -> None:
    with pytest.raises(DefinitionError, match="concurrency"):
        make({"id": "w", "wait": {"event": "go"}, "concurrency": {"key": "payload.t"}})
