"""Waiting for a signal, against the real broker and Redis: an approval sent after the run
reached its wait (from the command line), one sent before (from the SDK, kept by the run),
and one that never comes (the wait times out and the run fails)."""

from __future__ import annotations

import asyncio
from typing import Any

from mediator.core.ids import workflow_id_for
from tests.helpers import cli, wait_for
from topics.events import WorkflowStatus

APPROVAL = {
    "name": "approval",
    "steps": [
        {"id": "reserve", "service": "svc", "action": "reserve"},
        {"id": "approve", "depends_on": ["reserve"], "wait": {"event": "approval"},
         "timeout": "2s"},
        {"id": "pay", "service": "svc", "action": "pay", "depends_on": ["approve"],
         "input": {"approved_by": "steps.approve.by"}},
    ],
}  # fmt: skip


async def test_a_wait_is_completed_by_a_signal_sent_after_or_before_it_or_times_out(
    make_system: Any,
) -> None:
    system = await make_system(APPROVAL)
    held = asyncio.Event()
    paid: dict[str, Any] = {}

    async def reserve(data: Any, command: Any) -> dict[str, Any]:
        if command.workflow_id == workflow_id_for("before"):
            await held.wait()
        return {"seat": "12A"}

    async def pay(data: Any, command: Any) -> dict[str, Any]:
        paid[command.workflow_id] = data
        return {"paid": True}

    await system.worker("svc", {"reserve": reserve, "pay": pay})
    mediator = await system.mediator()
    client = await system.client()

    async def waiting(wid: str) -> bool:
        state = await mediator.store.load(wid)
        return state is not None and state.steps["approve"].status.value == "waiting"

    # After: the run waits; the operator approves from the command line.
    after = asyncio.create_task(client.submit("approval", {}, request_id="after", timeout=30))
    await wait_for(lambda: waiting(workflow_id_for("after")), what="the wait to start")
    code, out, err = await cli(system.settings, "signal", "after", "approval", '{"by": "alice"}')
    assert code == 0, err
    assert f"signal {workflow_id_for('after')}: applied (delivered: run" in out, out
    assert (await after).status is WorkflowStatus.COMPLETED
    assert paid[workflow_id_for("after")] == {"approved_by": "alice"}

    # Before: the approval comes while the seat is still being reserved; the run keeps it.
    before = asyncio.create_task(client.submit("approval", {}, request_id="before", timeout=30))
    await wait_for(lambda: mediator.store.load(workflow_id_for("before")), what="the run")
    await client.signal("before", "approval", {"by": "bob"}, signal_id="sig-before")
    await wait_for(
        lambda: _inbox(mediator, workflow_id_for("before")), what="the signal to be kept"
    )
    held.set()
    outcome = await before
    assert outcome.status is WorkflowStatus.COMPLETED
    assert outcome.steps["approve"].status == "completed"
    assert paid[workflow_id_for("before")] == {"approved_by": "bob"}

    # Never: the wait times out, and with it the run.
    never = await client.submit("approval", {}, request_id="never", timeout=30)
    assert never.status is WorkflowStatus.FAILED
    assert never.error is not None and never.error.code == "timeout"
    assert "got no signal 'approval' within 2000 ms" in never.error.message
    assert workflow_id_for("never") not in paid

    # A signal to a run that ended is refused, and the sender is told.
    code, _, err = await cli(system.settings, "signal", "never", "approval")
    assert code == 1 and "signal does not apply to run" in err, err


async def _inbox(mediator: Any, wid: str) -> bool:
    state = await mediator.store.load(wid)
    return state is not None and bool(state.inbox)
