"""Child runs against the real broker and Redis: a parent whose child completes and is
later compensated (the child's steps undone in reverse, then the parent's), a child that
fails and compensates itself before the parent compensates, and a cancelled parent that
cancels its running child."""

from __future__ import annotations

import asyncio
from typing import Any

from mediator.core.ids import workflow_id_for
from mediator.core.lineage import child_run_id
from mediator.sdk.actions import ActionError
from tests.helpers import cli, wait_for
from topics.events import WorkflowStatus

FULFIL = {
    "name": "fulfil",
    "steps": [
        {"id": "debit", "service": "stock", "action": "debit", "timeout": "20s",
         "compensate": {"action": "credit"}},
        {"id": "ship", "service": "stock", "action": "ship", "depends_on": ["debit"],
         "compensate": {"action": "unship"}},
    ],
    "output": {"parcel": "steps.ship.parcel"},
}  # fmt: skip

ORDER = {
    "name": "order",
    "steps": [
        {"id": "reserve", "service": "shop", "action": "reserve",
         "compensate": {"action": "release"}},
        {"id": "fulfil", "workflow": "fulfil", "depends_on": ["reserve"],
         "input": {"sku": "payload.sku", "fail_ship": "payload.fail_ship"}},
        {"id": "charge", "service": "shop", "action": "charge", "depends_on": ["fulfil"],
         "input": {"parcel": "steps.fulfil.parcel", "decline": "payload.decline"}},
    ],
}  # fmt: skip


async def test_child_runs_complete_fail_and_are_compensated(make_system: Any) -> None:
    system = await make_system(FULFIL, ORDER)
    calls: list[tuple[str, str]] = []
    held = asyncio.Event()

    async def record(name: str, command: Any) -> None:
        calls.append((command.workflow_id, name))

    async def debit(data: Any, command: Any) -> dict[str, Any]:
        await record("debit", command)
        if data["sku"] == "slow":
            await held.wait()
        return {"debited": data["sku"]}

    async def ship(data: Any, command: Any) -> dict[str, Any]:
        await record("ship", command)
        if data["fail_ship"]:
            msg = "no courier"
            raise ActionError(msg, code="no_courier")  # not retryable
        return {"parcel": f"P-{data['sku']}"}

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        await record("charge", command)
        if data["decline"]:
            msg = "card declined"
            raise ActionError(msg, code="declined")
        return {"charged": data["parcel"]}

    async def undo(name: str) -> Any:
        async def handler(data: Any, command: Any) -> dict[str, Any]:
            await record(name, command)
            return {}

        return handler

    await system.worker(
        "stock",
        {"debit": debit, "ship": ship, "credit": await undo("credit"),
         "unship": await undo("unship")},
    )  # fmt: skip
    await system.worker(
        "shop",
        {"reserve": lambda d, c: record("reserve", c), "charge": charge,
         "release": await undo("release")},
    )  # fmt: skip
    mediator = await system.mediator()
    client = await system.client()

    # 1. The child completes; the parent's charge is declined: the child is compensated
    #    (its steps in reverse), then the parent's own step.
    declined = await client.submit(
        "order", {"sku": "A", "fail_ship": False, "decline": True}, request_id="declined",
        timeout=30,
    )  # fmt: skip
    assert declined.status is WorkflowStatus.FAILED, declined
    parent = workflow_id_for("declined")
    child = child_run_id(f"{parent}.fulfil.1")
    assert [name for wid, name in calls if wid == child] == ["debit", "ship", "unship", "credit"]
    assert [name for wid, name in calls if wid == parent] == ["reserve", "charge", "release"]
    assert calls.index((child, "credit")) < calls.index((parent, "release"))
    assert declined.compensations["fulfil"].status == "completed"
    assert declined.steps["fulfil"].status == "completed"
    child_state = await mediator.store.load(child)
    assert child_state is not None and child_state.status is WorkflowStatus.CANCELLED
    assert child_state.error is not None and child_state.error["code"] == "compensated"
    assert child_state.parent is not None and child_state.parent["workflow_id"] == parent
    code, out, _ = await cli(system.settings, "workflows", "show", child)
    assert code == 0 and f"parent: {parent} (step fulfil" in out, out
    code, out, _ = await cli(system.settings, "workflows", "show", "declined")
    assert code == 0 and f"step fulfil attempt 1: child run {child}" in out, out

    # 2. The child fails: it undoes its own debit, the parent's step fails and the parent
    #    releases its reservation.
    calls.clear()
    broken = await client.submit(
        "order", {"sku": "B", "fail_ship": True, "decline": False}, request_id="broken",
        timeout=30,
    )  # fmt: skip
    assert broken.status is WorkflowStatus.FAILED, broken
    parent = workflow_id_for("broken")
    child = child_run_id(f"{parent}.fulfil.1")
    assert [name for wid, name in calls if wid == child] == ["debit", "ship", "credit"]
    assert [name for wid, name in calls if wid == parent] == ["reserve", "release"]
    assert broken.error is not None and "no courier" in broken.error.message
    assert broken.steps["fulfil"].status == "failed"
    child_state = await mediator.store.load(child)
    assert child_state is not None and child_state.status is WorkflowStatus.FAILED

    # 3. A cancelled parent cancels its running child; the child's debit, in flight, is
    #    undone once it completes.
    calls.clear()
    slow = asyncio.create_task(
        client.submit(
            "order", {"sku": "slow", "fail_ship": False, "decline": False},
            request_id="slow", timeout=30,
        )
    )  # fmt: skip
    parent = workflow_id_for("slow")
    child = child_run_id(f"{parent}.fulfil.1")
    await wait_for(lambda: _running(mediator, child), what="the child run")
    await wait_for(lambda: _called(calls, child, "debit"), what="the child's debit")
    code, _, err = await cli(system.settings, "cancel", "slow", "--reason", "customer left")
    assert code == 0, err
    await wait_for(lambda: _ended(mediator, child), what="the child to be cancelled")
    held.set()  # the child's debit completes: the child undoes it, then ends and says so
    cancelled = await slow
    assert cancelled.status is WorkflowStatus.CANCELLED
    assert cancelled.steps["fulfil"].status == "failed"
    assert (child, "credit") in calls
    child_state = await mediator.store.load(child)
    assert child_state is not None and child_state.status is WorkflowStatus.CANCELLED
    assert child_state.error is not None
    assert f"parent run {parent}" in child_state.error["message"]
    assert (child, "ship") not in calls


async def _running(mediator: Any, wid: str) -> bool:
    state = await mediator.store.load(wid)
    return state is not None and state.status is WorkflowStatus.RUNNING


async def _ended(mediator: Any, wid: str) -> bool:
    state = await mediator.store.load(wid)
    return state is not None and state.status is not WorkflowStatus.RUNNING


async def _called(calls: list[tuple[str, str]], wid: str, name: str) -> bool:
    return (wid, name) in calls
