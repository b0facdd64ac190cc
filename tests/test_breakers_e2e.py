"""Circuit breakers end to end: two mediator replicas, a service that fails every call,
a real broker and Redis. The breaker opens on failures counted across both replicas,
new commands park (the service receives none), exactly one probe goes out after the
recovery timeout, and the backlog drains at the configured rate; with a fallback the
commands reroute instead."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mediator.sdk.worker import ActionError
from mediator.settings import BreakerSettings
from tests.test_workflows_e2e import step
from topics import WorkflowStatus

BREAKER = BreakerSettings(
    failure_threshold=3, recovery_timeout="1500ms", drain_rate=5.0, refresh_ms=50
)


class Payments:
    """A payment service that fails (retryably) while `broken`."""

    def __init__(self) -> None:
        self.broken = True
        self.calls: list[float] = []

    async def pay(self, data: Any, command: Any) -> dict[str, Any]:
        self.calls.append(time.monotonic())
        if self.broken:
            msg = "gateway down"
            raise ActionError(msg, code="unavailable", retryable=True)
        return {"paid": True}


def checkout(**pay: Any) -> dict[str, Any]:
    return {"name": "checkout", "steps": [step("pay", "payments", action="pay", **pay)]}


async def breaker_state(mediator: Any, service: str) -> str:
    raw = await mediator.redis.hget(mediator.store.keys.breaker(service), "state")
    return raw.decode() if raw else "closed"


async def test_open_breaker_parks_then_one_probe_then_a_bounded_drain(make_system: Any) -> None:
    system = await make_system(checkout(timeout="30s"), circuit_breaker=BREAKER)
    payments = Payments()
    await system.worker("payments", {"pay": payments.pay})
    first = await system.mediator()
    await system.mediator()
    client = await system.client()

    # Three failures, whichever replica applies each reply, open the breaker.
    for n in range(3):
        failed = await client.submit("checkout", {}, request_id=f"bad-{n}", timeout=10)
        assert failed.status is WorkflowStatus.FAILED
    assert await breaker_state(first, "payments") == "open"
    assert len(payments.calls) == 3
    opened = time.monotonic()
    await asyncio.sleep(0.2)  # both replicas have refreshed their view

    # New commands park: the service receives none while the breaker is open.
    payments.broken = False
    waiting = [
        asyncio.create_task(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=30))
        for n in range(8)
    ]
    await asyncio.sleep(1.0)
    assert len(payments.calls) == 3
    assert time.monotonic() - opened < 1.5
    parked = sum(m.runtime.stats["parked"] for m in system.mediators)
    assert parked == 8

    results = await asyncio.gather(*waiting)

    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert len(payments.calls) == 3 + 8  # every parked command went out exactly once
    probe, *drained = payments.calls[3:]
    assert probe - opened >= 1.5  # not before the recovery timeout
    assert drained[0] >= probe  # the drain began once the probe closed the breaker
    # 7 more at 5 per second: the first second's credit goes at once, the rest paced.
    span = drained[-1] - drained[0]
    assert span >= 0.2, span
    assert await breaker_state(first, "payments") == "closed"
    assert sum(m.breakers.stats["probes"] for m in system.mediators) == 1


async def test_open_breaker_reroutes_to_the_fallback(make_system: Any) -> None:
    workflow = checkout(timeout="30s", fallback={"service": "backup", "action": "pay"})
    system = await make_system(workflow, circuit_breaker=BREAKER)
    payments = Payments()
    backup = Payments()
    backup.broken = False
    await system.worker("payments", {"pay": payments.pay})
    await system.worker("backup", {"pay": backup.pay})
    mediator = await system.mediator()
    client = await system.client()
    for n in range(3):
        await client.submit("checkout", {}, request_id=f"bad-{n}", timeout=10)
    assert await breaker_state(mediator, "payments") == "open"

    results = await asyncio.gather(
        *(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=10) for n in range(4))
    )

    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert all(r.steps["pay"].service == "backup" for r in results)
    assert len(payments.calls) == 3
    assert len(backup.calls) == 4
    assert mediator.runtime.stats["rerouted"] == 4
