"""Every effect runs as the workflow intends, in the pure engine: a control applied once,
ids unique per round (an operator's retry), a stable idempotency key per step round, and
compensation by whoever did the work."""

from __future__ import annotations

from mediator.core.state import StepStatus, dumps, loads
from mediator.core.timers import Fired
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
    results,
    step,
    undo_reply,
    undoable,
)
from topics.events import ControlAction, ControlEvent
from topics.events import WorkflowStatus as WS


def _failed_and_compensated(run: Run, now: int = T0 + 10) -> str:
    """Charge completes, ship fails for good, charge's refund is done; the refund's id."""
    run.complete("charge", {"id": "c1"}, now=now)
    [undo] = commands(run.fail("ship", FATAL, now=now))
    apply_undo(run, undo_reply(undo), now=now + 1)
    assert run.state.status is WS.FAILED
    return undo.command_id


def _retry(run: Run, control_id: str, now: int) -> None:
    event = ControlEvent(
        control_id=control_id, action=ControlAction.RETRY, workflow_id=WID, issued_ms=now
    )
    transition = ENGINE.apply_control(run.workflow, run.state, event, now)
    assert transition is not None
    run.last, run.state = transition, transition.state
    run.outstanding.update({c.step: c for c in commands(transition)})
    run.history.append(transition)


def test_a_retry_delivered_again_does_not_open_the_run_again() -> None:
    run = Run(make(undoable("charge"), step("ship", "charge")))
    _failed_and_compensated(run)
    _retry(run, "c-1", T0 + 100)
    assert run.state.status is WS.RUNNING
    _failed_and_compensated(run, now=T0 + 200)  # the second round fails too
    # Kafka delivers the same retry again (a rebalance, a rewind): it was applied already.
    again = ENGINE.apply_control(run.workflow, run.state, control(ControlAction.RETRY), T0 + 300)
    assert again is None
    # The memory of applied controls survives the store.
    assert loads(dumps(run.state)).controls == ["c-1"]
    # A new retry (another control id) does open it.
    _retry(run, "c-2", T0 + 400)
    assert run.state.status is WS.RUNNING and run.state.round == 2


def test_a_cancel_delivered_again_changes_nothing_after_a_retry() -> None:
    run = Run(make(undoable("charge"), step("ship", "charge")))
    cancel = ControlEvent(
        control_id="k-1", action=ControlAction.CANCEL, workflow_id=WID, issued_ms=T0
    )
    cancelled = ENGINE.apply_control(run.workflow, run.state, cancel, T0 + 5)
    assert cancelled is not None and cancelled.state.status is WS.CANCELLED
    run.state = cancelled.state
    _retry(run, "r-1", T0 + 10)
    assert ENGINE.apply_control(run.workflow, run.state, cancel, T0 + 20) is None


def test_every_attempt_of_a_step_round_carries_one_idempotency_key() -> None:
    run = Run(make(step("charge", retry={"max_attempts": 3}, timeout="1s")))
    [first] = run.outstanding.values()
    key = f"{WID}.charge.r0"
    assert first.idempotency_key == key
    run.fail("charge", BUSY)  # retryable: attempt 2 after its backoff
    [second] = commands(fire(run, "retry", "charge", 1, now=T0 + 5_000))
    assert second.command_id != first.command_id and second.idempotency_key == key
    # Its instance is taken for dead: handed on as attempt 3, the same work.
    [third] = commands(fire(run, "reroute", "charge", 2, now=T0 + 6_000))
    assert third.attempt == 3 and third.idempotency_key == key


def test_an_operator_retry_starts_a_round_with_new_ids_for_everything() -> None:
    run = Run(make(undoable("charge"), step("ship", "charge"), timeout="30s"))
    first_undo = _failed_and_compensated(run)
    charge_key = run.history[0].effects[0].command.idempotency_key  # type: ignore[union-attr]
    _retry(run, "c-1", T0 + 100)
    [charge] = run.outstanding.values()
    assert charge.idempotency_key == f"{WID}.charge.r1" != charge_key
    run.complete("charge", {"id": "c2"}, now=T0 + 110)
    [undo] = commands(run.fail("ship", FATAL, now=T0 + 120))
    # The second refund is new work, not the first one again: a service that deduplicates
    # on command ids (or on idempotency keys) does it.
    assert (first_undo, undo.command_id) == (f"{WID}.charge.undo.1", f"{WID}.charge.undo.2")
    assert undo.idempotency_key == f"{WID}.charge.undo.r1"
    # The deadline of the new round is named by it: the first round's, fired late, is
    # stale, and does not fail the run.
    late = Fired.parse(f"deadline|{WID}||0")
    assert late is not None
    assert ENGINE.apply_timer(run.workflow, run.state, late, T0 + 130) is None


def test_a_step_that_ran_on_its_fallback_is_undone_by_the_fallback() -> None:
    workflow = make(
        undoable("charge", fallback={"service": "backup"}),
        step("ship", "charge"),
    )
    run = Run(workflow)
    [command] = run.outstanding.values()
    # The breaker of the step's service is open: the command goes to the fallback.
    assert ENGINE.reroute(workflow, run.last, command.command_id)
    [rerouted] = commands(run.last)
    assert rerouted.service == "backup"
    run.state = run.last.state
    run.outstanding = {"charge": rerouted}
    run.complete("charge", {"id": "b1"})
    [undo] = commands(run.fail("ship", FATAL))
    assert (undo.service, undo.action) == ("backup", "undo_charge")
    # Its own compensation, when it declares one.
    own = make(
        undoable("charge", fallback={"service": "backup", "compensate": {"action": "void"}}),
        step("ship", "charge"),
    )
    run = Run(own)
    [command] = run.outstanding.values()
    assert ENGINE.reroute(own, run.last, command.command_id)
    run.state = run.last.state
    run.outstanding = {"charge": commands(run.last)[0]}
    run.complete("charge", {"id": "b1"})
    [undo] = commands(run.fail("ship", FATAL))
    assert (undo.service, undo.action) == ("backup", "void")
    apply_undo(run, undo_reply(undo))
    assert run.state.compensations is not None
    assert run.state.compensations["charge"].status is StepStatus.COMPLETED


def test_a_timer_set_and_removed_within_one_batch_is_not_set() -> None:
    """A retry scheduled by one event and given up by the next of the same batch (the
    deadline passed) must not be committed: it would outlive its run."""
    run = Run(make(undoable("charge"), step("ship", retry={"max_attempts": 3}), timeout="5s"))
    run.complete("charge", {"id": "c1"})
    retrying = run.fail("ship", BUSY)
    assert [t.kind for t in retrying.timers] == ["retry"]
    deadline = Fired.parse(f"deadline|{WID}||0")
    assert deadline is not None
    passed = ENGINE.apply_timer(run.workflow, retrying.state, deadline, T0 + 6_000)
    assert passed is not None
    both = retrying.then(passed)
    assert f"retry|{WID}|ship|1" in both.cleared
    assert all(t.kind != "retry" for t in both.timers)
    assert results(both) == []  # compensating: the refund goes out first
