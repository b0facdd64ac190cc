"""Sagas and operator controls end to end on the real broker and Redis: compensation in
reverse order after a timeout or a business error, cancel, and retry of a failed run."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from mediator.clock import now_ms
from mediator.core.signing import Keyring
from mediator.ops.control import control_signer, send_control
from mediator.sdk.worker import ActionError
from mediator.storage.keys import workflow_id_for
from tests.helpers import step, wait_for_letters
from topics import WorkflowStatus
from topics.events import CommandEvent, ControlAction, ControlEvent, ResultEvent


def order(ship_service: str = "svc", **charge: Any) -> dict[str, Any]:
    """reserve -> charge -> ship; reserve and charge can be undone."""
    return {
        "name": "order",
        "steps": [
            step("reserve", action="reserve", compensate={"action": "release"}),
            step(
                "charge",
                action="charge",
                depends_on=["reserve"],
                compensate={"action": "refund"},
            ),
            step("ship", ship_service, action="ship", depends_on=["charge"], **charge),
        ],
    }


class Ledger:
    """What the services did, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    def action(self, name: str, outcome: Any = None) -> Any:
        async def run(data: Any, command: Any) -> Any:
            self.calls.append((name, command.attempt, time.monotonic()))
            if isinstance(outcome, BaseException):
                raise outcome
            if callable(outcome):
                return await outcome(data, command)
            return {name: True}

        return run

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


class Blackhole:
    """A service that takes every command from its topic and never answers."""

    def __init__(self, system: Any, service: str) -> None:
        self.system = system
        self.service = service
        self.commands: list[CommandEvent] = []
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> Blackhole:
        self.consumer = AIOKafkaConsumer(
            self.system.topics.service(self.service),
            bootstrap_servers=self.system.bootstrap,
            group_id=f"blackhole-{self.service}",
            auto_offset_reset="earliest",
            fetch_max_wait_ms=5,
        )
        await self.consumer.start()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for record in self.consumer:
            self.commands.append(CommandEvent.model_validate_json(record.value or b""))
            self.arrived.set()

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()


async def watch(client: Any) -> list[ResultEvent]:
    """Every distinct result the client reads, in order."""
    seen: list[ResultEvent] = []
    client.on_result = seen.append
    return seen


async def wait_for(
    seen: list[ResultEvent], request_id: str, count: int, within: float
) -> list[Any]:
    """The results for `request_id` once `count` arrived (or `within` seconds passed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        mine = [r for r in seen if r.request_id == request_id]
        if len(mine) >= count:
            return mine
        await asyncio.sleep(0.05)
    return [r for r in seen if r.request_id == request_id]


@pytest.mark.slow
async def test_a_service_that_never_replies_is_retried_then_compensated_in_reverse(
    make_system: Any,
) -> None:
    retry = {"max_attempts": 2, "backoff": "100ms", "jitter": 0}
    system = await make_system(order("shipping", timeout="400ms", retry=retry))
    ledger = Ledger()
    actions = {name: ledger.action(name) for name in ("reserve", "charge", "release", "refund")}
    await system.worker("svc", actions)
    await system.mediator()
    client = await system.client()
    seen = await watch(client)
    async with Blackhole(system, "shipping") as shipping:
        began = time.monotonic()
        result = await client.submit("order", {}, timeout=15)
        took = time.monotonic() - began

    # Two attempts of 400 ms and a 100 ms pause, then two undo hops: well within 5 s.
    assert took < 5, took
    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None
    assert (result.error.step, result.error.code) == ("ship", "timeout")
    assert result.steps["ship"].attempts == 2
    assert [c.attempt for c in shipping.commands] == [1, 2]
    assert ledger.names() == ["reserve", "charge", "refund", "release"]
    undo = [t for name, _, t in ledger.calls if name in ("refund", "release")]
    assert undo == sorted(undo)
    assert {k: v.status for k, v in result.compensations.items()} == {
        "charge": "completed",
        "reserve": "completed",
    }
    await asyncio.sleep(1)  # nothing more arrives: exactly one result
    assert [r.request_id for r in seen].count(result.request_id) == 1


async def test_a_non_retryable_error_is_not_retried_and_compensates(make_system: Any) -> None:
    system = await make_system(order(retry={"max_attempts": 5, "backoff": "50ms"}))
    ledger = Ledger()
    declined = ActionError("address unknown", code="bad_address", retryable=False)
    actions = {name: ledger.action(name) for name in ("reserve", "charge", "release", "refund")}
    await system.worker("svc", {**actions, "ship": ledger.action("ship", declined)})
    await system.mediator()
    client = await system.client()

    result = await client.submit("order", {}, timeout=15)

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "bad_address"
    assert ledger.names() == ["reserve", "charge", "ship", "refund", "release"]


async def test_a_failing_compensation_leaves_the_run_compensation_failed(
    make_system: Any,
) -> None:
    workflow = {
        "name": "stuck_undo",
        "steps": [
            step(
                "reserve",
                action="reserve",
                compensate={"action": "release", "retry": {"max_attempts": 2, "backoff": "50ms"}},
            ),
            step("charge", action="charge", depends_on=["reserve"]),
        ],
    }
    system = await make_system(workflow)
    ledger = Ledger()
    await system.worker(
        "svc",
        {
            "reserve": ledger.action("reserve"),
            "charge": ledger.action("charge", ActionError("declined")),
            "release": ledger.action("release", ActionError("gone", retryable=True)),
        },
    )
    mediator = await system.mediator()
    client = await system.client()

    result = await client.submit("stuck_undo", {}, timeout=15)

    assert result.status is WorkflowStatus.COMPENSATION_FAILED
    assert result.compensations["reserve"].status == "failed"
    assert result.compensations["reserve"].attempts == 2
    assert ledger.names() == ["reserve", "charge", "release", "release"]
    # Ops find it among the failed runs, with its own status.
    wid = result.workflow_id or ""
    keys = mediator.store.keys
    failed = await mediator.redis.zrange(keys.status_index(keys.shard_of(wid), "failed"), 0, -1)
    assert wid.encode() in failed
    assert await mediator.redis.hget(keys.workflow(wid), "status") == b"compensation_failed"


@pytest.mark.slow
async def test_cancel_compensates_a_running_run(make_system: Any) -> None:
    system = await make_system(order("shipping"))
    ledger = Ledger()
    actions = {name: ledger.action(name) for name in ("reserve", "charge", "release", "refund")}
    await system.worker("svc", actions)
    await system.mediator()
    client = await system.client()
    async with Blackhole(system, "shipping") as shipping:
        pending = asyncio.create_task(client.submit("order", {}, request_id="r-c", timeout=15))
        # The run waits on `ship`, which will never answer.
        await asyncio.wait_for(shipping.arrived.wait(), 10)
        await send_control(
            system.bootstrap,
            system.topics,
            ControlAction.CANCEL,
            workflow_id=workflow_id_for("r-c"),
            reason="customer called",
            enable_idempotence=False,
            signer=control_signer(system.settings.signing),
        )
        result = await pending

    assert result.status is WorkflowStatus.CANCELLED
    assert result.error is not None and result.error.code == "cancelled"
    assert "customer called" in result.error.message
    assert ledger.names() == ["reserve", "charge", "refund", "release"]
    assert result.steps["ship"].status == "failed"  # given up: it has no timeout


async def test_retry_reruns_a_failed_run_from_its_failed_step(make_system: Any) -> None:
    chain = {
        "name": "chain",
        "steps": [
            step("reserve", action="reserve"),
            step("charge", action="charge", depends_on=["reserve"]),
            step("ship", action="ship", depends_on=["charge"]),
        ],
    }
    system = await make_system(chain)
    ledger = Ledger()
    fixed = asyncio.Event()

    async def ship(data: Any, command: Any) -> Any:
        if not fixed.is_set():
            closed = "warehouse closed"
            raise ActionError(closed)
        return {"shipped": command.attempt}

    await system.worker(
        "svc",
        {
            "reserve": ledger.action("reserve"),
            "charge": ledger.action("charge"),
            "ship": ledger.action("ship", ship),
        },
    )
    mediator = await system.mediator()
    client = await system.client()
    seen = await watch(client)
    first = await client.submit("chain", {}, request_id="r-retry", timeout=15)
    assert first.status is WorkflowStatus.FAILED
    fixed.set()
    issued = now_ms()
    await send_control(
        system.bootstrap,
        system.topics,
        ControlAction.RETRY,
        workflow_id=first.workflow_id,
        reason="warehouse open again",
        enable_idempotence=False,
        signer=control_signer(system.settings.signing),
    )
    both = await wait_for(seen, "r-retry", 2, within=10)

    assert [r.status for r in both] == [WorkflowStatus.FAILED, WorkflowStatus.COMPLETED]
    second = both[-1]
    assert second.result_id != first.result_id and second.finished_ms >= issued
    assert second.steps["ship"].attempts == 2
    assert second.output is not None and second.output["ship"] == {"shipped": 2}
    assert ledger.names() == ["reserve", "charge", "ship", "ship"]  # outputs kept
    assert mediator.runtime.stats.controls == 1
    # A retry of a run that completed changes nothing.
    await send_control(
        system.bootstrap,
        system.topics,
        ControlAction.RETRY,
        workflow_id=first.workflow_id,
        enable_idempotence=False,
        signer=control_signer(system.settings.signing),
    )
    await asyncio.sleep(1)
    assert mediator.runtime.stats.ignored_controls == 1
    assert len(await wait_for(seen, "r-retry", 3, within=0.1)) == 2


async def test_a_control_that_cannot_apply_is_dead_lettered_with_its_reason(
    make_system: Any,
) -> None:
    system = await make_system(order())
    mediator = await system.mediator()
    producer = AIOKafkaProducer(bootstrap_servers=system.bootstrap)
    signer = control_signer(system.settings.signing)
    assert signer is not None
    _, keys = signer
    await producer.start()
    try:
        nameless = ControlEvent(control_id="c-x", action=ControlAction.CANCEL, issued_ms=now_ms())
        await _signed(producer, system.topics.control, nameless.model_dump_json().encode(), keys)
        await _signed(producer, system.topics.control, b'{"action": "explode"}', keys)
        # A drain names a service and an instance the registry knows.
        half = ControlEvent(control_id="c-d", action=ControlAction.DRAIN, service="svc",
                            issued_ms=now_ms())  # fmt: skip
        stranger = half.model_copy(update={"control_id": "c-s", "instance": "nobody"})
        for control in (half, stranger):
            await _signed(producer, system.topics.control, control.model_dump_json().encode(), keys)
    finally:
        await producer.stop()

    letters = await wait_for_letters(system.settings, 4, source=system.topics.control)

    reasons = sorted((found.code or "", found.reason) for _, _, found in letters)
    assert {code for code, _ in reasons} == {"invalid"}
    assert any("cancel needs `workflow_id`" in reason for _, reason in reasons)
    assert any("action: Input should be 'cancel'" in reason for _, reason in reasons), reasons
    assert any("drain needs `service` and `instance`" in reason for _, reason in reasons)
    assert any("no instance 'nobody' of 'svc' is registered" in reason for _, reason in reasons)
    assert mediator.runtime.stats.controls == 3


async def _signed(producer: AIOKafkaProducer, topic: str, value: bytes, keys: Keyring) -> None:
    await producer.send_and_wait(topic, value, headers=keys.headers(value, topic, None))


async def test_a_step_that_timed_out_is_undone_when_its_compensation_is_on_attempted(
    make_system: Any,
) -> None:
    # `ship` does its work and answers too late: with `after: attempted` its undo goes out
    # as well as the completed `reserve`'s, in reverse order.
    undo = {"action": "unship", "after": "attempted"}
    workflow = {
        "name": "order",
        "steps": [
            step("reserve", action="reserve", compensate={"action": "release"}),
            step("ship", action="ship", depends_on=["reserve"], timeout="300ms", compensate=undo),
        ],
    }
    system = await make_system(workflow)
    ledger = Ledger()

    async def late(data: Any, command: Any) -> Any:
        await asyncio.sleep(1.0)
        return {"shipped": True}

    actions = {name: ledger.action(name) for name in ("reserve", "release", "unship")}
    await system.worker("svc", {**actions, "ship": ledger.action("ship", late)})
    await system.mediator()
    client = await system.client()

    result = await client.submit("order", {}, timeout=15)

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and (result.error.step, result.error.code) == (
        "ship",
        "timeout",
    )
    assert ledger.names() == ["reserve", "ship", "unship", "release"]
    assert {k: v.status for k, v in result.compensations.items()} == {
        "ship": "completed",
        "reserve": "completed",
    }
