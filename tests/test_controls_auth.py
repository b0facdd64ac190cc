"""Controls are authenticated and authorised, against the real broker and Redis: an
unsigned control, one from an operator who may not send it, and a captured one published
again later are dead-lettered and change nothing; a signed one is applied and the audit
log records the operator whose key signed it, not the name the sender wrote."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from mediator.clock import now_ms
from mediator.core.signing import Keyring
from mediator.errors import ConfigurationError
from mediator.ops.control import control_signer, send_control
from mediator.settings import SigningSettings
from mediator.storage.keys import workflow_id_for
from tests.helpers import TEST_KEYS, step, wait_for, wait_for_letters
from topics import WorkflowStatus
from topics.events import ControlAction, ControlEvent

ALICE = "alice-1=alice-secret-0123456789abc"
DRAINER = "drain-1=drain-secret-0123456789abc"
SIGNING = {
    "keys": TEST_KEYS,
    "operators": {
        "alice": {"keys": ALICE, "may": ["cancel", "retry"]},
        "drainer": {"keys": DRAINER, "may": ["drain", "undrain"]},
    },
    "operator": "alice",
}


async def _publish(system: Any, control: ControlEvent, keys: Keyring | None) -> None:
    value = control.model_dump_json().encode()
    producer = AIOKafkaProducer(bootstrap_servers=system.bootstrap)
    await producer.start()
    try:
        key = (control.workflow_id or "").encode()
        headers = keys.headers(value, system.topics.control, key) if keys is not None else None
        await producer.send_and_wait(system.topics.control, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def test_only_a_signed_control_of_an_operator_who_may_send_it_is_applied(
    make_system: Any,
) -> None:
    system = await make_system(
        {"name": "slow", "steps": [step("wait", timeout="60s")]},
        signing=SigningSettings.model_validate(SIGNING),
    )
    held = asyncio.Event()

    async def wait(data: Any) -> dict[str, Any]:
        await held.wait()
        return {}

    await system.worker("svc", {"wait": wait})
    mediator = await system.mediator()
    client = await system.client()
    await client.publish("slow", {}, request_id="r-auth")
    wid = workflow_id_for("r-auth")

    async def running() -> bool:
        state = await mediator.store.load(wid)
        return state is not None and state.steps["wait"].status == "running"

    await wait_for(running, timeout=10, what="the step to be sent")

    def cancel(control_id: str, issued_ms: int) -> ControlEvent:
        return ControlEvent(control_id=control_id, action=ControlAction.CANCEL, workflow_id=wid,
                            operator="mallory", issued_ms=issued_ms)  # fmt: skip

    await _publish(system, cancel("c-unsigned", now_ms()), None)
    await _publish(system, cancel("c-drainer", now_ms()), Keyring.parse(DRAINER))
    await _publish(system, cancel("c-stale", now_ms() - 3_600_000), Keyring.parse(ALICE))
    letters = await wait_for_letters(system.settings, 3, source=system.topics.control)
    found = sorted((d.code or "", d.reason) for _, _, d in letters)
    assert [code for code, _ in found] == ["forbidden", "stale", "unsigned"], found
    assert "operator 'drainer' may not cancel" in found[0][1]
    assert mediator.runtime.stats.bad_signatures == 3
    state = await mediator.store.load(wid)
    assert state is not None and state.status is WorkflowStatus.RUNNING

    # The CLI's and the dashboard's way: signed as the configured operator.
    await send_control(
        system.bootstrap,
        system.topics,
        ControlAction.CANCEL,
        workflow_id=wid,
        reason="customer called",
        enable_idempotence=False,
        signer=control_signer(system.settings.signing),
    )

    async def cancelled() -> bool:
        state = await mediator.store.load(wid)
        return state is not None and state.status is WorkflowStatus.CANCELLED

    await wait_for(cancelled, timeout=10, what="the signed cancel to apply")
    held.set()
    raw = await mediator.redis.xrange(mediator.store.keys.audit(wid))
    controls = [orjson.loads(fields[b"e"]) for _, fields in raw
                if orjson.loads(fields[b"e"])["event"].startswith("control:")]  # fmt: skip
    assert [(c["event"], c["operator"]) for c in controls] == [("control:cancel", "alice")]


def test_a_process_that_must_sign_controls_and_cannot_says_how_to() -> None:
    signing = SigningSettings.model_validate({"keys": TEST_KEYS})
    with pytest.raises(ConfigurationError, match=r"signing\.operator and signing\.operators"):
        control_signer(signing)
    assert control_signer(signing.model_copy(update={"controls": "off"})) is None
    two = SigningSettings.model_validate({**SIGNING, "operator": None})
    with pytest.raises(ConfigurationError):
        control_signer(two)  # two operators, none chosen
    assert control_signer(SigningSettings.model_validate(SIGNING))[0] == "alice"  # type: ignore[index]
