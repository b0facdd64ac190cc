"""What the command line tells about a run, against the real broker and Redis: `workflows
show` gives every attempt and every compensation with its instance, timings and error,
and takes a request id; `submit --wait` fails for every end but completed."""

from __future__ import annotations

from typing import Any

import orjson

from mediator.sdk.worker import ActionError
from tests.test_cli import cli

SAGA = {
    "name": "saga",
    "steps": [
        {
            "id": "charge",
            "service": "pay",
            "action": "charge",
            "retry": {"max_attempts": 2, "backoff": "10ms"},
            "compensate": {"action": "refund"},
        },
        {"id": "ship", "service": "pay", "action": "ship", "depends_on": ["charge"]},
    ],
}


async def _saga(make_system: Any, refund_fails: bool) -> Any:
    system = await make_system(SAGA)
    calls = {"charge": 0}

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        calls["charge"] += 1
        if calls["charge"] == 1:
            msg = "billing backend hiccup"
            raise ActionError(msg, retryable=True)
        return {"payment": "p-1"}

    async def ship(data: Any, command: Any) -> dict[str, Any]:
        msg = "no courier for this address"
        raise ActionError(msg, code="undeliverable")

    async def refund(data: Any, command: Any) -> dict[str, Any]:
        if refund_fails:
            msg = "refund window closed"
            raise ActionError(msg, code="too_late")
        return {"refunded": True}

    await system.worker("pay", {"charge": charge, "ship": ship, "refund": refund}, instance="pay-1")
    await system.mediator()
    return system


async def test_workflows_show_tells_every_attempt_and_compensation(make_system: Any) -> None:
    system = await _saga(make_system, refund_fails=False)
    code, out, err = await cli(
        system.settings, "submit", "saga", "{}", "--wait", "--request-id", "order-7"
    )
    assert code == 1, err
    assert orjson.loads(out)["status"] == "failed"

    code, out, err = await cli(system.settings, "workflows", "show", "order-7")  # a request id
    assert code == 0, err
    rows = [line for line in out.splitlines() if "pay-1" in line]
    charge = [r for r in rows if r.lstrip("│ ").startswith("charge")]
    assert len(charge) == 2, out  # both attempts, each on its row
    assert "billing backend hiccup" in charge[0] and " 1 " in charge[0], out
    assert "completed" in charge[1] and " 2 " in charge[1], out
    assert any(r.lstrip("│ ").startswith("ship") and "no courier" in r for r in rows), out
    undo = [line for line in out.splitlines() if "undo charge" in line]
    assert len(undo) == 1 and "completed" in undo[0] and "pay-1" in undo[0], out
    assert all(" pay " in r for r in charge), out  # the service, from the definition


async def test_submit_wait_fails_for_every_end_but_completed(make_system: Any) -> None:
    system = await _saga(make_system, refund_fails=True)
    code, out, err = await cli(system.settings, "submit", "saga", "{}", "--wait")
    assert orjson.loads(out)["status"] == "compensation_failed"
    assert code == 1, err
