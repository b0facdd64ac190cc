"""The pure side of routing: which attempts are in flight on which instance, and what a
``reroute`` timer does to a run."""

from __future__ import annotations

from mediator.core.attempts import MAX_DEATH_REROUTES
from mediator.core.routing import in_flight, instance_prefix, member, routing_delta
from mediator.core.state import StepStatus
from mediator.core.timers import Fired
from tests.engine_harness import ENGINE, T0, Run, commands, make, step
from topics import WorkflowStatus


def routed(run: Run, instance: str) -> None:
    """Route every command of the run's last transition to `instance`, as the router does."""
    for command in commands(run.last):
        ENGINE.route(run.last, command.command_id, instance, 0)
    run.state = run.last.state
    run.outstanding.update({c.step: c for c in commands(run.last)})


def reroute(run: Run, step_id: str, now: int) -> bool:
    attempt = run.state.steps[step_id].attempt
    fired = Fired.parse(f"reroute|{run.state.workflow_id}|{step_id}|{attempt}")
    assert fired is not None
    transition = ENGINE.apply_timer(run.workflow, run.state, fired, now)
    if transition is None:
        return False
    run.before = run.state  # type: ignore[attr-defined]
    run.last, run.state = transition, transition.state
    run.outstanding.update({c.step: c for c in commands(transition)})
    return True


def test_a_routed_attempt_is_in_flight_on_its_instance_until_it_moves_on() -> None:
    run = Run(make(step("a"), step("b", "a")))
    routed(run, "inv-1")
    wid = run.state.workflow_id
    [command] = commands(run.last)
    assert command.instance == "inv-1"
    on_one = member("svc", "inv-1", wid, "a", 1)
    assert routing_delta(run.workflow, None, run.state) == [("+", on_one)]
    assert on_one.startswith(instance_prefix("svc", "inv-1"))

    before = run.state
    run.complete("a", {"x": 1})
    routed(run, "inv-2")
    delta = routing_delta(run.workflow, before, run.state)
    assert delta == [("-", on_one), ("+", member("svc", "inv-2", wid, "b", 1))]
    run.complete("b", {})
    assert run.state.status is WorkflowStatus.COMPLETED
    assert in_flight(run.workflow, run.state) == set()


def test_a_reroute_sends_the_next_attempt_at_once_without_spending_retries() -> None:
    run = Run(make(step("a", timeout="30s")))
    routed(run, "dead")
    assert reroute(run, "a", T0 + 2500)
    a = run.state.steps["a"]
    assert (a.status, a.attempt, a.base, a.instance) == (StepStatus.RUNNING, 2, 1, None)
    [entry] = a.history or []
    assert entry["error"]["code"] == "instance_down" and entry["instance"] == "dead"
    assert entry["finished_ms"] == T0 + 2500
    [command] = commands(run.last)
    assert (command.attempt, command.command_id) == (2, f"{run.state.workflow_id}.a.2")
    # The old attempt's timeout is cleared; the new one has its own.
    assert f"timeout|{run.state.workflow_id}|a|1" in run.last.cleared
    assert [t.attempt for t in run.last.timers if t.kind == "timeout"] == [2]
    # The old attempt's reply is stale now; a reroute timer for it too.
    assert not reroute_stale(run, 1)


def reroute_stale(run: Run, attempt: int) -> bool:
    fired = Fired.parse(f"reroute|{run.state.workflow_id}|a|{attempt}")
    assert fired is not None
    return ENGINE.apply_timer(run.workflow, run.state, fired, T0 + 9000) is not None


def test_a_command_that_keeps_killing_instances_fails_after_a_few_reroutes() -> None:
    run = Run(make(step("a")))
    for n in range(MAX_DEATH_REROUTES):
        routed(run, f"dead-{n}")
        assert reroute(run, "a", T0 + 1000 * (n + 1))
    routed(run, "dead-last")
    assert reroute(run, "a", T0 + 9000)
    assert run.state.status is WorkflowStatus.FAILED
    assert run.state.steps["a"].error is not None
    assert run.state.steps["a"].error["code"] == "instance_down"
