"""What the command line tells about a run, against the real broker and Redis: `workflows
show` gives every attempt and every compensation with its instance, timings and error,
and takes a request id; `submit --wait` fails for every end but completed."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mediator.sdk.worker import ActionError
from mediator.storage.keys import Keys, workflow_id_for
from mediator.storage.store import Store
from tests.helpers import cli, wait_for
from topics.events import WorkflowStatus

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


async def test_controls_say_whether_they_were_applied(make_system: Any) -> None:
    system = await make_system(
        {"name": "slow", "steps": [{"id": "a", "service": "s", "action": "wait"}]}
    )
    release = asyncio.Event()

    async def wait(data: Any, command: Any) -> dict[str, Any]:
        await release.wait()
        return {}

    await system.worker("s", {"wait": wait})
    await system.mediator()
    settings = system.settings

    code, _, err = await cli(settings, "cancel", "wf-00000000000000000000")
    assert code == 1 and "refused: there is no run wf-00000000000000000000" in err, err

    client = await system.client()
    running = asyncio.create_task(client.submit("slow", {}, request_id="slow-1", timeout=60))
    wid = workflow_id_for("slow-1")
    await wait_for(lambda: system.mediators[0].runtime.stats.requests >= 1, what="the run to start")
    code, out, err = await cli(settings, "cancel", "slow-1", "--reason", "changed my mind")
    assert code == 0, err
    assert f"cancel {wid}: applied (run {wid} is cancelled)" in out, out
    release.set()
    assert (await running).status is WorkflowStatus.CANCELLED

    code, _, err = await cli(settings, "cancel", wid)  # again: the run is over
    assert code == 1 and f"does not apply to run {wid}, which is cancelled" in err, err
    # By filter: the cancelled run is one a retry applies to, none a cancel does.
    code, out, err = await cli(settings, "retry", "--workflow", "slow", "--dry-run")
    assert (code, out.strip()) == (0, "retry would be sent to 1 run"), err
    code, out, err = await cli(settings, "cancel", "--workflow", "slow", "--dry-run")
    assert (code, out.strip()) == (0, "cancel would be sent to 0 runs"), err
    code, out, err = await cli(settings, "retry", wid)
    assert code == 0 and "applied" in out, err

    code, out, err = await cli(settings, "breaker", "reset", "s")
    assert code == 0 and "applied (breaker of s closed)" in out, err
    code, out, err = await cli(settings, "cancel", wid, "--no-wait")
    assert code == 0 and "sent as" in out, err


async def test_the_first_outcome_of_a_control_stays(redis_client: Any, key_prefix: str) -> None:
    store = Store(redis_client, Keys(key_prefix, 1), retention_ms=60_000)
    await store.control_outcomes({"c-1": (True, "run wf-1 is cancelled")}, 1)
    await store.control_outcomes({"c-1": (False, "does not apply")}, 2)  # redelivered
    raw = await redis_client.get(Keys(key_prefix, 1).control("c-1"))
    assert orjson.loads(raw) == {"applied": True, "detail": "run wf-1 is cancelled", "at_ms": 1}


async def test_an_outcome_redis_cannot_record_does_not_redeliver_the_control(
    make_system: Any, monkeypatch: Any, caplog: Any
) -> None:
    """Redis refuses the write of a cancel's outcome once: the cancel stays applied, is
    logged as unrecorded, and its batch is not redelivered (which would record the control
    as refused, its run being cancelled by then)."""
    from mediator.errors import StateUnavailable
    from mediator.ops.control import control_signer, send_control
    from topics.events import ControlAction

    system = await make_system(
        {"name": "slow", "steps": [{"id": "a", "service": "s", "action": "wait"}]}
    )
    release = asyncio.Event()

    async def wait(data: Any, command: Any) -> dict[str, Any]:
        await release.wait()
        return {}

    await system.worker("s", {"wait": wait})
    mediator = await system.mediator()
    store = mediator.store
    record = store.control_outcomes
    failed: list[dict[str, Any]] = []

    async def fails_once(outcomes: dict[str, Any], at_ms: int) -> None:
        if not failed:
            failed.append(dict(outcomes))
            msg = "Redis unavailable while recording control outcomes"
            raise StateUnavailable(msg)
        await record(outcomes, at_ms)

    monkeypatch.setattr(store, "control_outcomes", fails_once)
    client = await system.client()
    running = asyncio.create_task(client.submit("slow", {}, request_id="slow-2", timeout=60))
    wid = workflow_id_for("slow-2")
    await wait_for(lambda: mediator.runtime.stats.requests >= 1, what="the run to start")
    sent = await send_control(
        system.bootstrap,
        system.topics,
        ControlAction.CANCEL,
        workflow_id=wid,
        enable_idempotence=False,
        signer=control_signer(system.settings.signing),
    )
    await wait_for(lambda: failed, what="the outcome's write to fail")
    release.set()
    assert (await running).status is WorkflowStatus.CANCELLED
    assert list(failed[0]) == [sent.control_id]
    await asyncio.sleep(1.5)  # a redelivered batch would be handled by now
    assert mediator.runtime.stats.controls == 1
    assert await mediator.redis.get(store.keys.control(sent.control_id)) is None
    assert "outcomes of 1 controls not recorded" in caplog.text


async def test_pause_and_resume_say_what_they_did_and_refuse_what_does_not_apply(
    make_system: Any,
) -> None:
    system = await make_system(
        {"name": "quick", "steps": [{"id": "a", "service": "s", "action": "work"}]}
    )

    async def work(data: Any, command: Any) -> dict[str, Any]:
        return {}

    await system.worker("s", {"work": work})
    await system.mediator()
    settings = system.settings
    code, _, err = await cli(settings, "pause")
    assert code == 2 and err.strip() == (
        "error: pause needs run ids or a filter (--workflow, --version, --status, --since, "
        "--until, --error-code, --step)"
    ), err

    client = await system.client()
    assert (await client.submit("quick", {}, request_id="q-1")).status is WorkflowStatus.COMPLETED
    wid = workflow_id_for("q-1")
    code, _, err = await cli(settings, "pause", "q-1")
    assert code == 1, err
    assert f"refused: pause does not apply to run {wid}, which is completed" in err, err
    code, out, err = await cli(settings, "resume", "--workflow", "quick", "--dry-run")
    assert (code, out.strip()) == (0, "resume would be sent to 0 runs"), err
