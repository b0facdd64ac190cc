"""The transition stream against the real broker and Redis: 100 runs (some failing and
compensated) with `events.enabled`, their events read back from ``mediator.events`` and
folded into a projection (the example consumer of docs/events.md) that equals what Redis
holds: every run's status and every step's and compensation's status and attempt."""

from __future__ import annotations

import asyncio
from typing import Any

from mediator.sdk.actions import ActionError
from mediator.settings import BreakerSettings, EventSettings
from tests.helpers import read_to_end
from topics.events import TransitionEvent, WorkflowStatus

FLOW = {
    "name": "flow",
    "steps": [
        {"id": "a", "service": "svc", "action": "a", "compensate": {"action": "undo"}},
        {"id": "b", "service": "svc", "action": "b", "depends_on": ["a"],
         "retry": {"max_attempts": 2, "backoff": "10ms"}},
    ],
}  # fmt: skip


BUSY, DECLINED = "busy", "declined"


def project(events: list[TransitionEvent]) -> dict[str, dict[str, Any]]:
    """The example projection: per run its status and each step's (and undo's) status and
    attempt, each taken from the event of the highest revision that reports it (the
    stream is at least once, and a stalled replica can publish a revision late)."""
    runs: dict[str, dict[str, Any]] = {}
    for event in events:
        run = runs.setdefault(event.workflow_id, {"rev": 0, "steps": {}, "undos": {}})
        if event.rev >= run["rev"]:
            run["rev"], run["status"] = event.rev, event.status.value
        if event.step is not None:
            table = run["undos"] if event.kind.startswith("undo_") else run["steps"]
            rev, *_ = table.get(event.step, (0,))
            if event.rev >= rev:
                table[event.step] = (event.rev, event.step_status, event.attempt)
    return runs


async def test_the_transition_stream_projects_to_the_state_in_redis(make_system: Any) -> None:
    # (The breaker would open on the retryable failures and hold the runs back.)
    system = await make_system(
        FLOW, events=EventSettings(enabled=True), circuit_breaker=BreakerSettings(enabled=False)
    )
    tries: dict[str, int] = {}

    async def a(data: Any, command: Any) -> dict[str, Any]:
        return {}

    async def b(data: Any, command: Any) -> dict[str, Any]:
        tries[command.workflow_id] = tries.get(command.workflow_id, 0) + 1
        if data["n"] % 3 == 0 and tries[command.workflow_id] == 1:
            raise ActionError(BUSY, retryable=True)  # retried, then completes
        if data["n"] % 5 == 0:
            raise ActionError(DECLINED, code="declined")  # the run compensates `a`
        return {}

    async def undo(data: Any, command: Any) -> dict[str, Any]:
        return {}

    await system.worker("svc", {"a": a, "b": b, "undo": undo})
    mediator = await system.mediator()
    client = await system.client()
    results = await asyncio.gather(
        *(client.submit("flow", {"n": n}, timeout=60) for n in range(100))
    )
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED}
    raw = await read_to_end(system.bootstrap, system.topics.events)
    events = [TransitionEvent.model_validate_json(r.value) for r in raw]
    projection = project(events)
    states = await mediator.store.load_many([r.workflow_id or "" for r in results])
    assert set(projection) == set(states)
    for wid, state in states.items():
        assert state is not None
        run = projection[wid]
        assert run["status"] == state.status.value, wid
        assert run["rev"] == state.rev, wid
        steps = {sid: (s.status.value, s.attempt) for sid, s in state.steps.items()}
        assert {sid: said[1:] for sid, said in run["steps"].items()} == steps, wid
        undos = {sid: (u.status.value, u.attempt) for sid, u in (state.compensations or {}).items()}
        assert {sid: said[1:] for sid, said in run["undos"].items()} == undos, wid
    kinds = {e.kind for e in events}
    assert {"run_started", "step_sent", "step_completed", "step_retrying", "step_failed",
            "run_compensating", "undo_sent", "undo_completed", "run_finished"} <= kinds  # fmt: skip
