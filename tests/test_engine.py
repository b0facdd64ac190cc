"""The pure engine, driven event by event: dispatch, fan-in, conditions, failures, replays."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from mediator.core.counters import STEPS_SKIPPED, svc, wf
from mediator.core.engine import Transition, command_id
from mediator.core.state import StepState, StepStatus, WorkflowState, dumps, loads
from tests.engine_harness import (
    ENGINE,
    T0,
    WID,
    Run,
    apply,
    commands,
    failed,
    make,
    ok,
    result,
    results,
    sent,
    start,
    step,
)
from topics.events import (
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyStatus,
    WorkflowStatus,
)

# -- dispatch order -----------------------------------------------------------------------


def test_sequential_chain() -> None:
    run = Run(make(step("a"), step("b", "a"), step("c", "b")))
    assert sent(run.last) == ["a"]
    assert run.statuses() == {"a": "running", "b": "pending", "c": "pending"}
    assert sent(run.complete("a", {"n": 1})) == ["b"]
    assert sent(run.complete("b", {"n": 2})) == ["c"]
    assert results(run.history[-1]) == []
    last = run.complete("c", {"n": 3})
    assert sent(last) == []
    assert result(last).status is WorkflowStatus.COMPLETED
    assert run.state.status is WorkflowStatus.COMPLETED
    assert run.state.terminal


def test_fan_out_dispatches_every_root_at_once_and_fan_in_waits_for_all() -> None:
    run = Run(make(step("a"), step("b"), step("c"), step("join", "a", "b", "c")))
    assert sorted(sent(run.last)) == ["a", "b", "c"]
    assert sent(run.complete("b")) == []
    assert sent(run.complete("a")) == []
    assert run.statuses()["join"] == "pending"
    assert sent(run.complete("c")) == ["join"]
    assert result(run.complete("join")).status is WorkflowStatus.COMPLETED


def test_diamond() -> None:
    run = Run(
        make(step("top"), step("left", "top"), step("right", "top"), step("end", "left", "right"))
    )
    assert sent(run.last) == ["top"]
    assert sorted(sent(run.complete("top"))) == ["left", "right"]
    assert sent(run.complete("right")) == []
    assert sent(run.complete("left")) == ["end"]


def test_max_parallel_limits_and_releases() -> None:
    run = Run(make(*(step(s) for s in "abcde"), max_parallel=2))
    assert sent(run.last) == ["a", "b"]
    assert run.running() == {"a", "b"}
    assert sent(run.complete("b")) == ["c"]
    assert run.running() == {"a", "c"}
    assert sent(run.complete("a")) == ["d"]
    assert sent(run.complete("d")) == ["e"]
    assert sent(run.complete("c")) == []
    assert run.running() == {"e"}
    assert result(run.complete("e")).status is WorkflowStatus.COMPLETED


def test_max_parallel_one_runs_independent_steps_one_by_one() -> None:
    run = Run(make(step("a"), step("b"), step("c", "a"), max_parallel=1))
    order = [*sent(run.last)]
    while run.outstanding:
        [only] = run.outstanding
        assert len(run.running()) == 1
        order += sent(run.complete(only))
    assert order == ["a", "b", "c"]
    assert run.state.status is WorkflowStatus.COMPLETED


def test_skipped_steps_do_not_take_a_parallel_slot() -> None:
    run = Run(
        make(step("a", when="payload.go"), step("b"), step("c"), max_parallel=1),
        {"go": False},
    )
    assert sent(run.last) == ["b"]
    assert run.statuses() == {"a": "skipped", "b": "running", "c": "pending"}


# -- conditions ---------------------------------------------------------------------------


def test_false_condition_skips_and_dependants_still_run() -> None:
    workflow = make(step("a"), step("b", "a", when="payload.express"), step("c", "b"))
    run = Run(workflow, {"express": False})
    last = run.complete("a")
    assert sent(last) == ["c"]
    assert run.statuses() == {"a": "completed", "b": "skipped", "c": "running"}
    assert last.counters[STEPS_SKIPPED] == 1
    final = result(run.complete("c", "done"))
    assert final.status is WorkflowStatus.COMPLETED
    assert final.steps["b"].status == "skipped"
    assert final.steps["b"].attempts == 0
    assert final.steps["b"].duration_ms is None
    # A skipped step has no output: the default output leaves it out.
    assert final.output == {"a": None, "c": "done"}


def test_a_chain_of_skips_releases_a_step_written_before_it() -> None:
    # b waits for x and for c; c is freed only by a's skip. b is written first, so only
    # examining steps in plan order (not in the order they were queued) finds it ready.
    workflow = make(
        step("x"),
        step("b", "x", "c"),
        step("a", "x", when="payload.never"),
        step("c", "a", when="payload.never"),
    )
    run = Run(workflow, {})
    last = run.complete("x")
    assert sent(last) == ["b"]
    assert run.statuses() == {"x": "completed", "b": "running", "a": "skipped", "c": "skipped"}


def test_true_condition_runs_the_step() -> None:
    run = Run(make(step("a"), step("b", "a", when="payload.express")), {"express": "yes"})
    last = run.complete("a")
    assert sent(last) == ["b"]
    assert STEPS_SKIPPED not in last.counters


def test_skipped_root_chain_completes_at_start() -> None:
    transition = start(
        make(step("a", when="payload.x"), step("b", "a", when="payload.x")), {"x": []}
    )
    assert sent(transition) == []
    assert transition.counters[STEPS_SKIPPED] == 2
    final = result(transition)
    assert final.status is WorkflowStatus.COMPLETED
    assert final.output == {}
    assert {s.status for s in final.steps.values()} == {"skipped"}


def test_condition_on_payload_and_earlier_outputs() -> None:
    workflow = make(
        step("screen"),
        step("charge", "screen", when="steps.screen.approved && payload.amount > `0`"),
        step("review", "screen", when="!(steps.screen.approved)"),
    )
    approved = Run(workflow, {"amount": 5})
    assert sent(approved.complete("screen", {"approved": True})) == ["charge"]
    assert approved.statuses()["review"] == "skipped"

    rejected = Run(workflow, {"amount": 5})
    assert sent(rejected.complete("screen", {"approved": False})) == ["review"]
    assert rejected.statuses()["charge"] == "skipped"

    free = Run(workflow, {"amount": 0})
    free.complete("screen", {"approved": True})
    assert free.statuses() == {"screen": "completed", "charge": "skipped", "review": "skipped"}
    assert free.state.status is WorkflowStatus.COMPLETED


@pytest.mark.parametrize(
    ("value", "runs"),
    [
        (None, False),
        (False, False),
        ("", False),
        ([], False),
        ({}, False),
        (0, True),
        (0.0, True),
        ([0], True),
        (True, True),
        ("x", True),
    ],
)
def test_condition_uses_jmespath_truthiness(value: Any, runs: bool) -> None:
    transition = start(make(step("a", when="payload.v")), {"v": value})
    assert sent(transition) == (["a"] if runs else [])


# -- input mappings -----------------------------------------------------------------------


def test_input_mapping_renders_payload_steps_and_workflow() -> None:
    workflow = make(
        step("reserve"),
        step(
            "charge",
            "reserve",
            input={
                "amount": "payload.amount",
                "reservation": "steps.reserve.id",
                "ids": ["workflow.id", "workflow.request_id", "workflow.name"],
                "literal": 5,
                "flag": True,
                "text": '`"EUR"`',
                "nested": {"sku": "payload.items[0].sku"},
            },
        ),
        name="shop",
    )
    run = Run(workflow, {"amount": 12, "items": [{"sku": "X1"}]})
    [charge] = commands(run.complete("reserve", {"id": "R-9"}))
    assert charge.input == {
        "amount": 12,
        "reservation": "R-9",
        "ids": [WID, "req-1", "shop"],
        "literal": 5,
        "flag": True,
        "text": "EUR",
        "nested": {"sku": "X1"},
    }


def test_default_input_is_the_payload() -> None:
    [command] = commands(start(make(step("a")), {"k": [1, 2]}))
    assert command.input == {"k": [1, 2]}


def test_scalar_input_expression() -> None:
    [command] = commands(start(make(step("a", input="payload.n")), {"n": 7}))
    assert command.input == 7


@pytest.mark.parametrize(
    "fields",
    [{"input": {"n": "abs(payload.name)"}}, {"when": "abs(payload.name)"}],
    ids=["input", "when"],
)
def test_failing_expression_fails_the_workflow(fields: dict[str, Any]) -> None:
    workflow = make(step("ok"), step("bad", **fields), step("after", "ok"))
    transition = start(workflow, {"name": "not a number"}, reply_to="client.results")
    # No command goes out for a run that is already failed, not even for the good root.
    assert sent(transition) == []
    [published] = results(transition)
    assert published.reply_to == "client.results"
    final = published.result
    assert final.status is WorkflowStatus.FAILED
    assert final.error is not None
    assert final.error.code == "expression_error"
    assert final.error.step == "bad"
    assert "step 'bad' could not evaluate its input or condition" in final.error.message
    assert "abs" in final.error.message
    assert final.steps["bad"].status == "failed"
    assert transition.state.status is WorkflowStatus.FAILED
    assert transition.counters == {wf("wf", "started"): 1, wf("wf", "failed"): 1}


def test_failing_expression_after_a_reply() -> None:
    workflow = make(step("a"), step("b", "a", input="abs(steps.a)"), step("c", "a"))
    run = Run(workflow)
    last = run.complete("a", "text")
    assert sent(last) == []
    final = result(last)
    assert final.status is WorkflowStatus.FAILED
    assert final.error is not None
    assert (final.error.code, final.error.step) == ("expression_error", "b")
    assert run.statuses() == {"a": "completed", "b": "failed", "c": "pending"}
    assert last.counters == {svc("svc", "ok"): 1, wf("wf", "failed"): 1}


# -- outputs and results ------------------------------------------------------------------


def test_default_output_is_the_completed_step_outputs() -> None:
    run = Run(make(step("a"), step("b", "a")))
    run.complete("a", {"x": 1})
    final = result(run.complete("b", [1, 2]))
    assert final.output == {"a": {"x": 1}, "b": [1, 2]}
    assert run.state.output == final.output


def test_custom_output_mapping() -> None:
    workflow = make(
        step("a"),
        step("b", "a"),
        output={"total": "steps.b.total", "who": "payload.user", "run": "workflow.id"},
    )
    run = Run(workflow, {"user": "ada"})
    run.complete("a", {"ignored": True})
    final = result(run.complete("b", {"total": 42}))
    assert final.output == {"total": 42, "who": "ada", "run": WID}


def test_failing_output_mapping_fails_the_workflow() -> None:
    run = Run(make(step("a"), output="abs(steps.a)"))
    last = run.complete("a", "text")
    final = result(last)
    assert final.status is WorkflowStatus.FAILED
    assert final.output is None
    assert final.error is not None
    assert final.error.code == "expression_error"
    assert final.error.message.startswith("output mapping failed: ")
    assert last.counters[wf("wf", "failed")] == 1
    assert wf("wf", "completed") not in last.counters


def test_result_fields_and_step_summary() -> None:
    run = Run(
        make(step("a"), step("b", "a"), step("c", "a", when="payload.c")),
        {"c": False},
        reply_to="client.results",
        trace_id="trace-7",
    )
    run.complete("a", 1, now=T0 + 30)
    last = run.complete("b", 2, now=T0 + 100)
    [published] = results(last)
    assert published.reply_to == "client.results"
    final = published.result
    assert (final.request_id, final.workflow_id, final.workflow) == ("req-1", WID, "wf")
    assert (final.started_ms, final.finished_ms) == (T0, T0 + 100)
    assert final.trace_id == "trace-7"
    assert final.error is None
    summary = {s: (v.status, v.attempts, v.duration_ms) for s, v in final.steps.items()}
    assert summary == {
        "a": ("completed", 1, 30),
        "b": ("completed", 1, 70),
        "c": ("skipped", 0, None),
    }
    assert run.state.finished_ms == T0 + 100


def test_result_without_reply_to() -> None:
    run = Run(make(step("a")))
    [published] = results(run.complete("a"))
    assert published.reply_to is None


# -- error replies ------------------------------------------------------------------------


def test_error_reply_fails_the_workflow_with_the_step_error() -> None:
    run = Run(make(step("a"), step("b"), step("c", "a", "b")))
    run.complete("a")
    error = ErrorInfo(message="card declined", code="declined", retryable=False)
    last = run.fail("b", error, now=T0 + 50)
    assert sent(last) == []
    final = result(last)
    assert final.status is WorkflowStatus.FAILED
    assert final.error == ErrorInfo(message="card declined", code="declined", step="b")
    assert final.output is None
    assert final.steps["b"].status == "failed"
    assert final.steps["c"].status == "pending"
    assert run.state.steps["b"].error == {
        "message": "card declined",
        "code": "declined",
        "retryable": False,
        "step": "b",
    }
    assert run.state.status is WorkflowStatus.FAILED
    assert last.counters == {svc("svc", "rejected"): 1, wf("wf", "failed"): 1}


def test_error_reply_without_details() -> None:
    run = Run(make(step("a")))
    final = result(run.fail("a", None))
    assert final.error is not None
    assert final.error.message == "service replied error without details"
    assert final.error.step == "a"


def test_error_stops_the_run_while_others_are_still_running() -> None:
    run = Run(make(step("a"), step("b"), step("c", "a")))
    in_flight = run.outstanding["a"]
    run.fail("b", ErrorInfo(message="boom"))
    # The late reply of a step that was running when the run failed changes nothing.
    assert ENGINE.apply_reply(run.workflow, run.state, ok(in_flight), T0 + 99) is None
    assert run.statuses() == {"a": "running", "b": "failed", "c": "pending"}


# -- duplicates and stale replies ---------------------------------------------------------


def test_duplicate_reply_is_ignored() -> None:
    run = Run(make(step("a"), step("b", "a")))
    reply = ok(run.outstanding["a"], {"x": 1})
    run.reply(reply, T0 + 10)
    assert ENGINE.apply_reply(run.workflow, run.state, reply, T0 + 20) is None
    as_error = reply.model_copy(update={"status": ReplyStatus.ERROR, "output": None})
    assert ENGINE.apply_reply(run.workflow, run.state, as_error, T0 + 20) is None


@pytest.mark.parametrize(
    "change",
    [
        {"attempt": 2},
        {"command_id": f"{WID}.a.2"},
        {"command_id": "other.a.1"},
        {"step": "nope"},
        {"step": "b"},
    ],
    ids=["attempt", "command-id-attempt", "command-id-workflow", "unknown-step", "pending-step"],
)
def test_stale_reply_is_ignored(change: dict[str, Any]) -> None:
    run = Run(make(step("a"), step("b", "a")))
    reply = ok(run.outstanding["a"]).model_copy(update=change)
    before = dumps(run.state)
    assert ENGINE.apply_reply(run.workflow, run.state, reply, T0 + 5) is None
    assert dumps(run.state) == before
    # The genuine reply still works afterwards.
    assert sent(run.complete("a")) == ["b"]


def test_reply_after_completion_is_ignored() -> None:
    run = Run(make(step("a")))
    reply = ok(run.outstanding["a"])
    run.reply(reply, T0 + 1)
    assert run.state.terminal
    assert ENGINE.apply_reply(run.workflow, run.state, reply, T0 + 2) is None


def test_reply_to_a_terminal_state_is_ignored_even_if_the_step_looks_running() -> None:
    run = Run(make(step("a"), step("b")))
    reply = ok(run.outstanding["a"])
    finished = replace(run.state, status=WorkflowStatus.FAILED)
    assert ENGINE.apply_reply(run.workflow, finished, reply, T0 + 1) is None


# -- commands and counters ----------------------------------------------------------------


def test_command_fields() -> None:
    workflow = make(
        step("a", service="payment", timeout="5s"), step("b", service="shipping"), name="order"
    )
    transition = start(workflow, {"p": 1}, trace_id="trace-1", reply_to="client")
    a, b = commands(transition)
    assert a.command_id == f"{WID}.a.1" == command_id(WID, "a", 1)
    assert (a.workflow_id, a.request_id, a.workflow) == (WID, "req-1", "order")
    assert (a.step, a.service, a.action, a.attempt) == ("a", "payment", "do_a", 1)
    assert a.reply_to == "r"
    assert a.deadline_ms == T0 + 5_000
    assert a.trace_id == "trace-1"
    assert a.sent_ms == T0
    assert b.command_id == f"{WID}.b.1"
    assert b.service == "shipping"
    assert b.deadline_ms is None
    state = transition.state
    assert state.steps["a"] == StepState(
        status=StepStatus.RUNNING, attempt=1, command_id=f"{WID}.a.1", started_ms=T0
    )
    assert (state.reply_to, state.trace_id, state.payload) == ("client", "trace-1", {"p": 1})


def test_command_deadline_uses_the_dispatch_time() -> None:
    run = Run(make(step("a"), step("b", "a", timeout="250ms")))
    [b] = commands(run.complete("a", now=T0 + 400))
    assert (b.sent_ms, b.deadline_ms) == (T0 + 400, T0 + 650)
    assert run.state.steps["b"].started_ms == T0 + 400


def test_workflow_timeout_sets_the_deadline() -> None:
    assert start(make(step("a"), timeout="2m")).state.deadline_ms == T0 + 120_000
    assert start(make(step("a"))).state.deadline_ms is None


def test_counters_over_a_run() -> None:
    workflow = make(
        step("a", service="pay"),
        step("b", service="ship"),
        step("c", "a", service="pay", when="payload.c"),
        name="order",
    )
    run = Run(workflow, {"c": False})
    assert run.last.counters == {
        wf("order", "started"): 1,
        svc("pay", "sent"): 1,
        svc("ship", "sent"): 1,
    }
    assert run.complete("a").counters == {svc("pay", "ok"): 1, STEPS_SKIPPED: 1}
    assert run.complete("b").counters == {svc("ship", "ok"): 1, wf("order", "completed"): 1}


def test_transition_count() -> None:
    transition = Transition(start(make(step("a"))).state)
    transition.count("x")
    transition.count("x", 4)
    assert transition.counters == {"x": 5}


# -- determinism and purity ---------------------------------------------------------------


def test_start_is_deterministic() -> None:
    workflow = make(step("a", timeout="1s"), step("b"), step("c", "a", "b"), timeout="1m")
    first, second = start(workflow, {"x": 1}), start(workflow, {"x": 1})
    assert first.effects == second.effects
    assert first.counters == second.counters
    assert first.state == second.state


def test_same_reply_against_same_state_gives_equal_effects() -> None:
    workflow = make(step("a"), step("b", "a", input={"v": "steps.a.v"}), step("c", "a"))
    run = Run(workflow)
    reply = ok(run.outstanding["a"], {"v": 3})
    first = apply(workflow, run.state, reply, T0 + 7)
    second = apply(workflow, run.state, reply, T0 + 7)
    assert first.effects == second.effects
    assert first.counters == second.counters
    assert dumps(first.state) == dumps(second.state)
    assert len(commands(first)) == 2


def test_the_input_state_is_not_mutated() -> None:
    workflow = make(step("a"), step("b", "a"), step("c", "a", when="payload.no"))
    run = Run(workflow, {"no": False})
    state = run.state
    before = dumps(state)
    steps_before = dict(state.steps)
    ok_transition = apply(workflow, state, ok(run.outstanding["a"], {"o": 1}))
    assert ok_transition.state is not state
    assert dumps(state) == before
    assert state.steps == steps_before
    error_transition = apply(workflow, state, failed(run.outstanding["a"], ErrorInfo(message="x")))
    assert error_transition.state.status is WorkflowStatus.FAILED
    assert dumps(state) == before
    assert state.status is WorkflowStatus.RUNNING


# -- state blobs --------------------------------------------------------------------------


def _states() -> dict[str, WorkflowState]:
    workflow = make(step("a"), step("b", "a"), step("c", "a", when="payload.c"), step("d", "b"))
    running = Run(workflow, {"c": False}, reply_to="out", trace_id="t-1")
    running.complete("a", {"n": [1, 2], "s": "é"})
    failed_run = Run(workflow, {"c": True})
    failed_run.complete("a", 0)
    failed_run.fail("b", ErrorInfo(message="nope", code="bad", retryable=True))
    done = Run(make(step("a"), timeout="1m"))
    done.complete("a", False)
    retrying = Run(make(step("a", timeout="1s", retry={"max_attempts": 3})))
    retrying.fail("a", ErrorInfo(message="busy", retryable=True))
    undo = {"action": "undo", "retry": {"max_attempts": 2}}
    saga = make(step("a", compensate=undo), step("p", timeout="1s"), step("b", "a"))
    compensating = Run(saga)
    parked = compensating.outstanding["p"]
    assert ENGINE.park(compensating.last, parked.command_id)
    compensating.complete("a", {"id": 1})
    compensating.fail("b", ErrorInfo(message="no"))
    cancelled = Run(make(step("a")))
    stop = ControlEvent(control_id="c", action=ControlAction.CANCEL, workflow_id=WID, issued_ms=1)
    cancelled_state = ENGINE.apply_control(cancelled.workflow, cancelled.state, stop, T0 + 5)
    assert cancelled_state is not None
    broken = Run(make(step("a", compensate={"action": "undo"}), step("b", "a")))
    broken.complete("a")
    [undo_cmd] = commands(broken.fail("b", ErrorInfo(message="no")))
    broken.reply(
        failed(undo_cmd, ErrorInfo(message="undo refused")).model_copy(
            update={"command_id": undo_cmd.command_id}
        ),
        T0 + 20,
    )
    waiting = Run(make(step("a", timeout="1s"), step("b")))
    assert ENGINE.park(waiting.last, waiting.outstanding["a"].command_id)
    signalled = Run(make(step("a"), {"id": "ok", "wait": {"event": "approval"}}))
    held = Run(make(step("a"), step("b")))
    assert ENGINE.queue(held.last, held.outstanding["b"].command_id)
    return {
        "queued": held.last.state,
        "waiting": signalled.state,
        "parked": waiting.state,
        "compensating": compensating.state,
        "cancelled": cancelled_state.state,
        "compensation_failed": broken.state,
        "fresh": start(workflow, {"nested": {"k": [None, 1.5]}}).state,
        "running": replace(running.state, rev=7),
        "completed": done.state,
        "failed": failed_run.state,
        "retrying": retrying.state,
    }


@pytest.mark.parametrize(
    "name",
    [
        "fresh",
        "running",
        "completed",
        "failed",
        "retrying",
        "parked",
        "waiting",
        "compensating",
        "cancelled",
        "compensation_failed",
    ],
)
def test_state_round_trip(name: str) -> None:
    state = _states()[name]
    blob = dumps(state)
    again = loads(blob)
    assert again == state
    assert dumps(again) == blob
    assert loads(blob.decode()) == state


def test_state_round_trip_covers_every_status() -> None:
    states = _states().values()
    assert {s.status for s in states} == set(WorkflowStatus)
    assert {st.status for s in states for st in s.steps.values()} == set(StepStatus)


def test_state_blob_leaves_defaults_out() -> None:
    state = _states()["running"]
    doc = orjson.loads(dumps(state))
    assert doc["steps"]["d"] == {}
    assert doc["steps"]["c"] == {"status": "skipped", "finished_ms": T0 + 10}
    assert doc["rev"] == 7
    assert "deadline_ms" not in doc
    assert "error" not in doc
    assert doc["reply_to"] == "out"


def test_loaded_statuses_are_enums() -> None:
    state = loads(dumps(_states()["failed"]))
    assert state.status is WorkflowStatus.FAILED
    assert state.steps["b"].status is StepStatus.FAILED
    assert state.steps["d"].status is StepStatus.PENDING
    assert state.terminal
