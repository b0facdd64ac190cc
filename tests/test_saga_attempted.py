"""Compensations ``after: attempted``: a step whose work may have been done without a
success reply (its attempt timed out, its instance died, the run gave it up in flight)
is undone as a completed one is; a step none of whose attempts went out is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from mediator.core import saga
from mediator.core.state import Failure, StepStatus, dumps, loads
from mediator.core.stream import transition_fields
from mediator.definitions import load_file
from mediator.errors import DefinitionError
from mediator.runtime.failures import failure_code
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
    step,
    undo_reply,
)
from topics.events import ControlAction, ErrorInfo
from topics.events import WorkflowStatus as WS


def attempted(step_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    """A step undone by ``undo_<step_id>`` once an attempt of it went out."""
    undo = {"action": f"undo_{step_id}", "after": "attempted"}
    return step(step_id, *deps, compensate=undo, **fields)


@pytest.mark.parametrize("after", ["completed", "attempted"])
def test_a_step_that_timed_out_for_good_is_undone_only_after_attempted(after: str) -> None:
    undo = {"action": "refund", "after": after}
    run = Run(make(step("charge", timeout="2s", compensate=undo), step("ship", "charge")))
    ended = fire(run, "timeout", "charge", 1)
    if after == "completed":
        assert result(ended).status is WS.FAILED  # nothing completed: nothing to undo
        assert commands(ended) == []
        return
    assert run.state.status is WS.COMPENSATING
    [refund] = commands(ended)
    assert (refund.step, refund.action, refund.service) == ("charge", "refund", "svc")
    outcome = result(apply_undo(run, undo_reply(refund)))
    assert outcome.status is WS.FAILED
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert {k: v.status for k, v in outcome.compensations.items()} == {"charge": "completed"}


def test_a_step_given_up_in_flight_is_undone_and_a_step_never_sent_is_not() -> None:
    # `hold` (no timeout) is in flight when `pay` fails for good; `late` never went out:
    # its breaker was open, so it was parked.
    workflow = make(attempted("hold"), attempted("late"), step("pay"), step("end", "hold", "pay"))
    run = Run(workflow)
    parked = run.outstanding.pop("late")
    assert ENGINE.park(run.last, parked.command_id)
    failing = run.fail("pay", FATAL)
    assert run.state.steps["hold"].status is StepStatus.FAILED
    assert run.state.steps["late"].status is StepStatus.FAILED
    [undo] = commands(failing)
    assert (undo.step, undo.action) == ("hold", "undo_hold")
    outcome = result(apply_undo(run, undo_reply(undo)))
    assert set(outcome.compensations) == {"hold"}


def test_a_retry_withheld_still_undoes_the_attempt_that_went_out_before_it() -> None:
    workflow = make(
        attempted("charge", timeout="2s", retry={"max_attempts": 3}), step("x"), step("e", "x")
    )
    run = Run(workflow)
    fire(run, "timeout", "charge", 1)  # attempt 1 went out and timed out: it may have run
    assert run.state.steps["charge"].status is StepStatus.RETRYING
    again = fire(run, "retry", "charge", 1, now=T0 + 5_000)
    [retry] = commands(again)
    assert ENGINE.park(again, retry.command_id)  # attempt 2 never goes out
    failing = run.fail("x", FATAL)
    [undo] = commands(failing)
    assert undo.step == "charge"
    assert result(apply_undo(run, undo_reply(undo))).status is WS.FAILED


def test_a_parked_attempt_that_times_out_owes_no_undo() -> None:
    run = Run(make(attempted("charge", timeout="2s"), step("ship", "charge")))
    [command] = commands(run.last)
    assert ENGINE.park(run.last, command.command_id)  # it never went out
    ended = fire(run, "timeout", "charge", 1)
    assert commands(ended) == []
    assert result(ended).status is WS.FAILED


def test_the_undo_goes_to_the_service_the_last_attempt_went_to() -> None:
    undo = {"action": "refund", "after": "attempted"}
    workflow = make(
        step("charge", timeout="2s", compensate=undo, fallback={"service": "backup"}),
        step("ship", "charge"),
    )
    run = Run(workflow)
    [command] = commands(run.last)
    assert ENGINE.reroute(workflow, run.last, command.command_id)
    [refund] = commands(fire(run, "timeout", "charge", 1))
    assert (refund.service, refund.action) == ("backup", "refund")


def test_a_retryable_failure_then_success_is_undone_once_like_any_completed_step() -> None:
    workflow = make(attempted("charge", retry={"max_attempts": 2}), step("ship", "charge"))
    run = Run(workflow)
    run.fail("charge", BUSY)
    run.outstanding.update(
        {c.step: c for c in commands(fire(run, "retry", "charge", 1, now=T0 + 5_000))}
    )
    run.complete("charge")
    [refund] = commands(run.fail("ship", FATAL))
    assert refund.step == "charge"
    assert result(apply_undo(run, undo_reply(refund))).compensations["charge"].attempts == 1


def test_where_the_attempt_went_is_stored_with_the_step() -> None:
    run = Run(make(attempted("charge", timeout="2s"), step("ship", "charge")))
    run.commit()
    assert run.state.steps["charge"].sent == "svc"
    assert loads(dumps(run.state)).steps["charge"].sent == "svc"
    plain = Run(make(step("charge", compensate={"action": "refund"}), step("ship", "charge")))
    plain.commit()
    assert plain.state.steps["charge"].sent is None  # kept only where it is needed


def test_an_unknown_on_is_refused() -> None:
    with pytest.raises(DefinitionError, match="after"):
        make(step("a", compensate={"action": "undo", "after": "sometimes"}))


def test_a_yaml_definition_sets_it(tmp_path: Path) -> None:
    # A key YAML reads as a boolean (`on`, `yes`) would be refused with a puzzling error.
    path = tmp_path / "order.yaml"
    path.write_text(
        "workflows:\n"
        "  - name: order\n"
        "    steps:\n"
        "      - {id: charge, service: payment, action: charge, timeout: 5s,\n"
        "         compensate: {action: refund, after: attempted}}\n"
    )
    [workflow] = load_file(path)
    compensate = workflow.steps["charge"].compensate
    assert compensate is not None and compensate.attempted
    assert workflow.undo_attempts == {"charge"}


def test_an_attempt_kafka_refused_for_good_did_not_go_out() -> None:
    # The outbox answers a command Kafka refused (unknown topic) with an error reply of
    # no instance: the step's only attempt never went out, so there is nothing to undo.
    run = Run(make(attempted("charge"), step("ship", "charge")))
    refused = ErrorInfo(message="cannot be published", code="unknown_topic")
    ended = run.fail("charge", refused)
    assert commands(ended) == []
    assert result(ended).status is WS.FAILED


def test_an_attempt_refused_after_one_that_went_out_is_still_undone() -> None:
    run = Run(make(attempted("charge", retry={"max_attempts": 2}), step("ship", "charge")))
    run.fail("charge", BUSY)
    run.outstanding.update({c.step: c for c in commands(fire(run, "retry", "charge", 1))})
    refused = ErrorInfo(message="cannot be published", code="unknown_topic")
    [undo] = commands(run.fail("charge", refused))
    assert undo.step == "charge"


def test_the_outbox_refusal_codes_are_the_ones_the_engine_knows() -> None:
    excs = [RecordTooLargeError(), UnknownTopicOrPartitionError(),
            TopicAuthorizationFailedError(), ValueError("?")]  # fmt: skip
    assert {failure_code(e) for e in excs} == saga.UNDELIVERED


def test_a_refused_retry_keeps_what_went_out_before_it_and_a_new_round_forgets_it() -> None:
    workflow = make(
        attempted("charge", timeout="2s", retry={"max_attempts": 2}),
        step("big", retry={"max_attempts": 2}),
    )
    run = Run(workflow)
    fire(run, "timeout", "charge", 1)  # attempt 1 went out: it may have charged
    run.fail("big", BUSY)
    # Both retries fall due in one batch, committed as one transition; big's command is
    # too large, so the run fails and charge's retry is withdrawn (back to pending).
    first = fire(run, "retry", "charge", 1, now=T0 + 5_000)
    second = fire(run, "retry", "big", 1, now=T0 + 5_000)
    [big] = commands(second)
    too_large: Failure = {"message": "too large", "code": "payload_too_large"}
    refused = ENGINE.refuse_command(workflow, first.then(second), big.command_id, too_large, T0)
    run.last, run.state = refused, refused.state
    assert run.state.steps["charge"].status is StepStatus.PENDING
    [undo] = commands(refused)  # attempt 1 of charge is undone all the same
    assert undo.step == "charge"
    apply_undo(run, undo_reply(undo))
    assert run.state.status is WS.FAILED
    again = ENGINE.apply_control(workflow, run.state, control(ControlAction.RETRY), T0 + 9_000)
    assert again is not None
    assert again.state.steps["charge"].sent is None  # nothing went out in the new round


def _charged_twice(after: str, undo: dict[str, Any] | None = None, **fallback: Any) -> Run:
    """charge's attempt 1 goes to its own service and times out; attempt 2, its breaker
    now open, goes to the fallback `backup` (with the `fallback` fields given). charge is
    undone by `undo`, by default ``refund`` `after` as given."""
    workflow = make(
        step("charge", timeout="2s", retry={"max_attempts": 2, "backoff": "10ms"},
             compensate=undo or {"action": "refund", "after": after},
             fallback={"service": "backup", **fallback}),
        step("ship", "charge"),
    )  # fmt: skip
    run = Run(workflow)
    fire(run, "timeout", "charge", 1)
    retry = fire(run, "retry", "charge", 1, now=T0 + 3_000)
    [second] = commands(retry)
    assert ENGINE.reroute(workflow, retry, second.command_id)
    run.outstanding.update({c.step: c for c in commands(retry)})
    return run


def test_work_maybe_done_at_the_step_s_service_and_its_fallback_is_undone_at_both() -> None:
    run = _charged_twice("attempted")
    failing = fire(run, "timeout", "charge", 2, now=T0 + 6_000)
    [at_backup] = commands(failing)  # the last attempt's service first
    assert (at_backup.service, at_backup.action, at_backup.attempt) == ("backup", "refund", 1)
    [at_svc] = commands(apply_undo(run, undo_reply(at_backup)))
    assert (at_svc.service, at_svc.action, at_svc.attempt) == ("svc", "refund", 2)
    assert at_svc.command_id != at_backup.command_id
    outcome = result(apply_undo(run, undo_reply(at_svc)))
    assert outcome.status is WS.FAILED
    assert outcome.compensations["charge"].status == "completed"


def test_a_step_completed_on_its_fallback_after_a_timeout_is_undone_at_both() -> None:
    run = _charged_twice("attempted")
    run.complete("charge")
    [at_backup] = commands(run.fail("ship", FATAL))
    assert at_backup.service == "backup"
    [at_svc] = commands(apply_undo(run, undo_reply(at_backup)))
    assert at_svc.service == "svc"
    assert result(apply_undo(run, undo_reply(at_svc))).status is WS.FAILED


def test_an_undo_that_gives_up_at_one_service_ends_the_run_compensation_failed() -> None:
    run = _charged_twice("attempted")
    run.complete("charge")
    [at_backup] = commands(run.fail("ship", FATAL))
    ended = apply_undo(run, undo_reply(at_backup, ok=False))  # not retryable
    assert commands(ended) == []
    assert result(ended).status is WS.COMPENSATION_FAILED


def test_after_completed_undoes_only_where_the_step_completed() -> None:
    run = _charged_twice("completed")
    run.complete("charge")
    [at_backup] = commands(run.fail("ship", FATAL))
    assert at_backup.service == "backup"
    assert result(apply_undo(run, undo_reply(at_backup))).status is WS.FAILED


def test_work_at_an_attempted_service_is_undone_when_the_last_one_s_is_not() -> None:
    # charge's own compensation is `after: attempted`; its fallback's is not. Attempt 1
    # timed out at svc, attempt 2 at backup: svc's refund is owed all the same.
    run = _charged_twice("attempted", compensate={"action": "refund_b"})
    [refund] = commands(fire(run, "timeout", "charge", 2, now=T0 + 6_000))
    assert (refund.service, refund.action) == ("svc", "refund")
    assert result(apply_undo(run, undo_reply(refund))).status is WS.FAILED


def test_undos_of_work_at_two_services_carry_keys_of_their_own() -> None:
    # Both compensations go to one ledger service: a service that deduplicates on the
    # key must not answer the second from the first.
    undo = {"action": "refund", "service": "ledger", "after": "attempted"}
    run = _charged_twice("attempted", undo=undo, compensate=undo)
    [first] = commands(fire(run, "timeout", "charge", 2, now=T0 + 6_000))
    [then] = commands(apply_undo(run, undo_reply(first)))
    assert first.service == then.service == "ledger"
    assert first.idempotency_key == f"{WID}.charge.undo.r0.backup"
    assert then.idempotency_key == f"{WID}.charge.undo.r0.svc"


def test_a_single_undo_keeps_its_key() -> None:
    run = Run(make(attempted("charge", timeout="2s"), step("ship", "charge")))
    [refund] = commands(fire(run, "timeout", "charge", 1))
    assert refund.idempotency_key == f"{WID}.charge.undo.r0"


def test_the_stream_reports_each_service_s_undo_completing() -> None:
    run = _charged_twice("attempted")
    fire(run, "timeout", "charge", 2, now=T0 + 6_000)
    before = run.state
    [at_svc] = commands(apply_undo(run, undo_reply(commands(run.last)[0])))
    told = [(e["kind"], e.get("attempt")) for e in transition_fields(before, run.state, T0)]
    assert told == [("undo_completed", 1), ("undo_sent", 2)]
    assert at_svc.attempt == 2
