"""Waiting for a signal, against the real broker and Redis: an approval sent after the run
reached its wait (from the command line), one sent before (from the SDK, kept by the run),
and one that never comes (the wait times out and the run fails)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mediator.core.ids import workflow_id_for
from tests.helpers import cli, consume_all, produce, wait_for
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


PAYMENT = {
    "name": "payment",
    "steps": [
        {"id": "charge", "service": "psp", "action": "charge"},
        {"id": "paid", "depends_on": ["charge"], "timeout": "20s",
         "wait": {"event": "payment", "key": "steps.charge.intent",
                  "match": "event.status == 'succeeded'"}},
        {"id": "ship", "service": "psp", "action": "ship", "depends_on": ["paid"],
         "input": "steps.paid"},
    ],
}  # fmt: skip


async def test_a_wait_is_reached_by_its_correlation_key_before_or_after_it_starts(
    make_system: Any,
) -> None:
    system = await make_system(PAYMENT)
    shipped: dict[str, Any] = {}

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        return {"intent": f"pi_{data['order']}"}

    async def ship(data: Any, command: Any) -> dict[str, Any]:
        shipped[command.workflow_id] = data
        return {}

    await system.worker("psp", {"charge": charge, "ship": ship})
    mediator = await system.mediator()
    client = await system.client()

    # After: the run waits on key pi_a; the provider's webhook, relayed by key, arrives:
    # first a status the step does not take (kept), then the one it does.
    after = asyncio.create_task(
        client.submit("payment", {"order": "a"}, request_id="a", timeout=30)
    )
    wid = workflow_id_for("a")
    await wait_for(lambda: _paid_waits(mediator, wid), what="the run to wait on its key")
    await client.signal_key("payment", "pi_a", {"status": "processing"}, signal_id="w-1")
    await client.signal_key("payment", "pi_a", {"status": "succeeded"}, signal_id="w-2")
    assert (await after).status is WorkflowStatus.COMPLETED
    assert shipped[wid] == {"status": "succeeded"}

    # Before: the webhook comes before the run exists; the key keeps it until the run
    # subscribes, which hands it over.
    code, out, err = await cli(
        system.settings, "signal", "key:pi_b", "payment", '{"status": "succeeded"}'
    )
    assert code == 0, err
    assert "signal key:pi_b: applied (kept: no run waits for signal payment key 'pi_b'" in out
    before = await client.submit("payment", {"order": "b"}, request_id="b", timeout=30)
    assert before.status is WorkflowStatus.COMPLETED
    assert shipped[workflow_id_for("b")] == {"status": "succeeded"}


async def _paid_waits(mediator: Any, wid: str) -> bool:
    state = await mediator.store.load(wid)
    return state is not None and state.steps["paid"].status.value == "waiting"


async def test_records_of_a_signal_source_reach_the_run_waiting_on_their_key(
    make_system: Any, settings: Any
) -> None:
    from mediator.settings import SignalSettings

    topic = f"{settings.kafka.topics.prefix}webhooks"
    sources = SignalSettings.model_validate(
        {"sources": [{"topic": topic, "event": "payment", "key": "value.data.id",
                      "payload": "value.data"}]}
    )  # fmt: skip
    system = await make_system(PAYMENT, signals=sources)
    shipped: dict[str, Any] = {}

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        return {"intent": f"pi_{data['order']}"}

    async def ship(data: Any, command: Any) -> dict[str, Any]:
        shipped[command.workflow_id] = data
        return {}

    await system.worker("psp", {"charge": charge, "ship": ship})
    await system.mediator()
    client = await system.client()
    running = asyncio.create_task(
        client.submit("payment", {"order": "c"}, request_id="c", timeout=30)
    )
    # A record that is not JSON and one without the key are dead-lettered; the webhook
    # for another payment is kept for its key; the run's own completes its wait.
    await produce(
        system.bootstrap,
        topic,
        [b"not json", b'{"data": {}}',
         orjson.dumps({"data": {"id": "pi_x", "status": "succeeded"}}),
         orjson.dumps({"data": {"id": "pi_c", "status": "succeeded", "amount": 7}})],
        headers=[],
    )  # fmt: skip
    done = await running
    assert done.status is WorkflowStatus.COMPLETED, done
    assert shipped[workflow_id_for("c")] == {"id": "pi_c", "status": "succeeded", "amount": 7}
    letters = await consume_all(system.bootstrap, system.topics.dlq, count=2, timeout=30)
    reasons = sorted(orjson.loads(r.value)["reason"] for r in letters)
    assert "not JSON" in reasons[1], reasons
    assert "its key expression gave None" in reasons[0], reasons
