"""Bulk operations by filter against the real broker and Redis: 500 runs failed with one
error code beside runs that failed otherwise and runs that completed; `mediator retry`
chosen by workflow and error code counts them first (`--dry-run`), then retries exactly
those, in batches with progress, and they complete."""

from __future__ import annotations

import asyncio
from typing import Any

from mediator.sdk.actions import ActionError
from tests.helpers import cli
from topics.events import WorkflowStatus

PAY = {"name": "pay", "steps": [{"id": "charge", "service": "psp", "action": "charge"}]}
RUNS = 500
DECLINED, BROKEN = "declined", "broken"


async def test_a_bulk_retry_by_error_code_counts_then_retries_exactly_those(
    make_system: Any,
) -> None:
    system = await make_system(PAY)
    healed = False

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        if data["n"] < RUNS and not healed:
            raise ActionError(DECLINED, code="declined")
        if RUNS <= data["n"] < RUNS + 10:
            raise ActionError(BROKEN, code="broken")
        return {"charged": data["n"]}

    await system.worker("psp", {"charge": charge})
    mediator = await system.mediator()
    client = await system.client()
    first = await asyncio.gather(
        *(client.submit("pay", {"n": n}, timeout=120) for n in range(RUNS + 20))
    )
    failed = [r for r in first if r.status is WorkflowStatus.FAILED]
    assert len(failed) == RUNS + 10

    code, out, err = await cli(
        system.settings, "retry", "--workflow", "pay", "--error-code", "declined", "--dry-run"
    )
    assert code == 0, err
    assert out.strip() == f"retry would be sent to {RUNS} runs", out

    healed = True
    code, out, err = await cli(
        system.settings, "retry", "--workflow", "pay", "--error-code", "declined",
        "--reason", "provider fixed", "--timeout", "50",
    )  # fmt: skip
    assert code == 0, err
    assert f"retry: {RUNS} of {RUNS} applied" in out, out[-2000:]
    assert f"retry: 100 of {RUNS} sent" in err  # progress, in batches
    states = await mediator.store.load_many([r.workflow_id or "" for r in first])
    for _ in range(200):
        states = await mediator.store.load_many([r.workflow_id or "" for r in first])
        if (
            sum(1 for s in states.values() if s and s.status is WorkflowStatus.COMPLETED)
            == RUNS + 10
        ):
            break
        await asyncio.sleep(0.1)
    by_status: dict[str, int] = {}
    for state in states.values():
        assert state is not None
        by_status[state.status.value] = by_status.get(state.status.value, 0) + 1
    assert by_status == {"completed": RUNS + 10, "failed": 10}, by_status
    broken = [s for s in states.values() if s and s.status is WorkflowStatus.FAILED]
    assert all((s.error or {}).get("code") == "broken" and s.round == 0 for s in broken)
