"""Circuit breakers end to end: two mediator replicas, a service that fails every call,
a real broker and Redis. The breaker opens on failures counted across both replicas,
new commands park (the service receives none), exactly one probe goes out after the
recovery timeout, and the backlog drains at the configured rate; with a fallback the
commands reroute instead."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis

from mediator.runtime.groups import inbound_group
from mediator.sdk.worker import ActionError
from mediator.settings import BreakerSettings, FlowControlSettings
from mediator.storage.keys import Keys, workflow_id_for
from mediator.storage.parked import parked_counts
from tests.helpers import step, wait_for
from tests.processes import MediatorProcess, group_members
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


@pytest.mark.slow
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
    # The breaker learns of a reply just after its result leaves: give it a moment.
    await wait_for(
        lambda: _is(breaker_state(first, "payments"), "open"), what="the breaker to open"
    )
    assert len(payments.calls) == 3
    opened = time.monotonic()
    await wait_for(
        lambda: all(m.breakers.state("payments") == "open" for m in system.mediators),
        what="both replicas' view of the breaker to be open",
    )

    # New commands park: the service receives none while the breaker is open.
    payments.broken = False
    waiting = [
        asyncio.create_task(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=30))
        for n in range(8)
    ]
    await asyncio.sleep(1.0)
    assert len(payments.calls) == 3
    assert time.monotonic() - opened < 1.5
    parked = sum(m.runtime.stats.parked for m in system.mediators)
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
    assert sum(m.breakers.stats.probes for m in system.mediators) == 1


async def test_open_breaker_reroutes_to_the_fallback(make_system: Any) -> None:
    workflow = checkout(timeout="30s", fallback={"service": "backup", "action": "pay"})
    system = await make_system(workflow, circuit_breaker=BREAKER)
    backup = Payments()
    backup.broken = False
    payments, mediator, client = await _with_payments_broken(system, backup.pay)

    results = await asyncio.gather(
        *(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=10) for n in range(4))
    )

    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert all(r.steps["pay"].service == "backup" for r in results)
    assert len(payments.calls) == 3
    assert len(backup.calls) == 4
    assert mediator.runtime.stats.rerouted == 4


async def test_a_step_rerouted_to_a_full_fallback_waits_in_its_queue(make_system: Any) -> None:
    # The fallback has a flow-control limit of one command in flight: the commands
    # rerouted to it beyond that wait in its queue and go out one at a time as it answers.
    workflow = checkout(timeout="30s", fallback={"service": "backup", "action": "pay"})
    flow = FlowControlSettings.model_validate(
        {"services": {"backup": {"max_in_flight": 1}}, "release_ms": 50}
    )
    system = await make_system(workflow, circuit_breaker=BREAKER, flow_control=flow)
    backup = Payments()
    backup.broken = False
    in_flight: list[int] = [0, 0]  # now, most at once

    async def slow_pay(data: Any, command: Any) -> dict[str, Any]:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(0.2)
            return await backup.pay(data, command)
        finally:
            in_flight[0] -= 1

    payments, mediator, client = await _with_payments_broken(system, slow_pay)

    results = await asyncio.gather(
        *(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=20) for n in range(4))
    )

    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert all(r.steps["pay"].service == "backup" for r in results)
    assert len(payments.calls) == 3
    assert len(backup.calls) == 4
    assert in_flight[1] == 1
    assert mediator.runtime.stats.queued >= 1


async def _with_payments_broken(system: Any, backup: Any) -> tuple[Payments, Any, Any]:
    """A failing payments service, a backup answering with `backup`, one replica and a
    client; three failed runs open the payments breaker, as the replica sees it."""
    payments = Payments()
    await system.worker("payments", {"pay": payments.pay})
    await system.worker("backup", {"pay": backup})
    mediator = await system.mediator()
    client = await system.client()
    for n in range(3):
        await client.submit("checkout", {}, request_id=f"bad-{n}", timeout=10)
    # The breaker learns of a reply just after its result leaves: give it a moment.
    await wait_for(
        lambda: _is(breaker_state(mediator, "payments"), "open"), what="the breaker to open"
    )
    await wait_for(
        lambda: mediator.breakers.state("payments") == "open",
        what="the replica's view of the breaker to be open",
    )
    return payments, mediator, client


def _request_ids_one_per_partition(prefix: str, partitions: int) -> list[str]:
    """Request ids whose runs' replies land on partitions 0..n-1 of the replies topic
    (replies are keyed by workflow id), so every replica applies some of them."""
    found: dict[int, str] = {}
    for n in itertools.count():
        rid = f"{prefix}-{n}"
        partition = (murmur2(workflow_id_for(rid).encode()) & 0x7FFFFFFF) % partitions
        found.setdefault(partition, rid)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise AssertionError  # unreachable


@pytest.mark.slow
async def test_two_replica_processes_share_one_breaker(
    make_system: Any, redis_client: Redis, tmp_path: Path
) -> None:
    system = await make_system(checkout(timeout="30s"), circuit_breaker=BREAKER)
    settings = system.settings
    keys = Keys(settings.redis.key_prefix, settings.redis.shards)
    payments = Payments()
    await system.worker("payments", {"pay": payments.pay})
    workflows = system.write_workflows(tmp_path)
    replicas = [MediatorProcess(settings, workflows, tmp_path, name) for name in ("r1", "r2")]
    for replica in replicas:
        replica.start()
    client = await system.client()
    try:
        group = inbound_group(settings.kafka)

        async def both_joined() -> bool:
            return await group_members(system.bootstrap, group) == 2

        await wait_for(both_joined, timeout=60, what="both replicas in the inbound group")

        # Four failures, two applied by each replica (4 partitions, 2 each): neither alone
        # reaches the threshold of 3, so the breaker opens only on the shared count.
        bad = _request_ids_one_per_partition("bad", 4)
        failed = await asyncio.gather(
            *(client.submit("checkout", {}, request_id=rid, timeout=20) for rid in bad)
        )
        assert all(r.status is WorkflowStatus.FAILED for r in failed)
        await wait_for(
            lambda: _state_is(redis_client, keys, "open"), timeout=5, what="the breaker to open"
        )
        opened = time.monotonic()
        assert len(payments.calls) == 4
        await asyncio.sleep(0.3)  # both replicas have refreshed their view

        # New runs park; the service receives none.
        waiting = [
            asyncio.create_task(client.submit("checkout", {}, request_id=f"ok-{n}", timeout=60))
            for n in range(8)
        ]

        async def all_parked() -> bool:
            counts = await parked_counts(redis_client, keys, ["payments"])
            return counts["payments"] == 8

        await wait_for(all_parked, timeout=10, what="8 parked steps")
        assert len(payments.calls) == 4

        # After the recovery timeout, exactly one probe goes out, cluster-wide; it fails
        # (the service is still broken), so the breaker opens again and nothing else goes.
        await wait_for(lambda: len(payments.calls) == 5, timeout=10, what="the probe")
        assert payments.calls[4] - opened >= 1.5 - 0.3
        await asyncio.sleep(1.0)  # less than the recovery timeout
        assert len(payments.calls) == 5
        assert await _state_is(redis_client, keys, "open")

        # The service recovers: the next probe succeeds, the rest drain, every run finishes.
        payments.broken = False
        results = await asyncio.gather(*waiting)
        probed = [r for r in results if r.status is WorkflowStatus.FAILED]
        assert len(probed) == 1, results
        assert probed[0].error is not None and probed[0].error.code == "unavailable"
        assert sum(r.status is WorkflowStatus.COMPLETED for r in results) == 7
        assert len(payments.calls) == 4 + 1 + 7  # each parked command went out once
        assert await _state_is(redis_client, keys, "closed")
        assert (await parked_counts(redis_client, keys, ["payments"]))["payments"] == 0
    finally:
        codes = [await replica.stop() for replica in replicas]
    assert codes == [0, 0], [r.output()[-2000:] for r in replicas]


async def _state_is(redis: Redis, keys: Keys, state: str) -> bool:
    raw = await redis.hget(keys.breaker("payments"), "state")
    return (raw.decode() if raw else "closed") == state


async def _is(value: Any, expected: str) -> bool:
    return await value == expected
