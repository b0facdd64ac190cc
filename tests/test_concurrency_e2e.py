"""Concurrency keys against the real broker and Redis, two replicas: a hot key with 1,000
runs queued behind its limit beside 20 cold keys, whose runs all start within a bounded
delay while the hot key drains; no key ever has more runs in progress than its limit
(measured at the service); and priorities order a key's queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.helpers import cli, wait_for
from topics.events import WorkflowStatus

HOT_LIMIT = 5
ORDER = {
    "name": "order",
    "concurrency": {"key": "payload.customer", "limit": HOT_LIMIT},
    "steps": [{"id": "work", "service": "api", "action": "work", "timeout": "60s"}],
}
HOT_RUNS, COLD_KEYS, COLD_RUNS = 1000, 20, 3
COLD_BOUND_S = 5.0  # a cold key's run starts within this of its request


async def test_a_hot_key_does_not_delay_cold_keys(make_system: Any) -> None:
    system = await make_system(ORDER)
    in_progress: dict[str, int] = {}
    peak: dict[str, int] = {}
    started: dict[str, float] = {}

    async def work(data: Any, command: Any) -> dict[str, Any]:
        key = data["customer"]
        in_progress[key] = in_progress.get(key, 0) + 1
        peak[key] = max(peak.get(key, 0), in_progress[key])
        started.setdefault(data["id"], time.monotonic())
        try:
            await asyncio.sleep(0.02)
        finally:
            in_progress[key] -= 1
        return {}

    await system.worker("api", {"work": work}, concurrency=200)
    replicas = [await system.mediator(), await system.mediator()]
    client = await system.client()
    hot = [
        asyncio.create_task(client.submit("order", {"customer": "hot", "id": f"h{i}"}, timeout=300))
        for i in range(HOT_RUNS)
    ]
    # The hot key's backlog is queued (all but its limit) before the cold keys come.
    await wait_for(
        lambda: sum(r.runtime.stats.requests for r in replicas) >= HOT_RUNS,
        timeout=60,
        what="the hot key's requests read",
    )
    await asyncio.sleep(0.5)
    code, out, err = await cli(system.settings, "keys")
    assert code == 0, err
    assert "'hot': running 5/5, queued" in out, out
    # Every replica's gauges give the deployment's figures (its upkeep reads them).
    await wait_for(lambda: _gauge(replicas[1], "mediator_concurrency_queued") > 500)
    assert _gauge(replicas[0], "mediator_concurrency_running") == HOT_LIMIT
    assert _gauge(replicas[0], "mediator_concurrency_oldest_wait_seconds") > 0
    submitted: dict[str, float] = {}
    cold = []
    for k in range(COLD_KEYS):
        for i in range(COLD_RUNS):
            run_id = f"c{k}-{i}"
            submitted[run_id] = time.monotonic()
            payload = {"customer": f"cold-{k}", "id": run_id}
            cold.append(asyncio.create_task(client.submit("order", payload, timeout=300)))
        await asyncio.sleep(0.05)
    cold_results = await asyncio.gather(*cold)
    hot_left = sum(not task.done() for task in hot)
    hot_results = await asyncio.gather(*hot)

    assert all(r.status is WorkflowStatus.COMPLETED for r in cold_results + hot_results)
    delays = sorted(started[rid] - at for rid, at in submitted.items())
    worst = delays[-1]
    print(
        f"\ncold runs: worst start delay {worst * 1000:.0f} ms, median "
        f"{delays[len(delays) // 2] * 1000:.0f} ms; hot runs left when they were done: {hot_left}"
    )
    assert worst < COLD_BOUND_S, worst
    assert hot_left > HOT_RUNS // 4  # the cold keys went while the hot key was still busy
    assert peak["hot"] == HOT_LIMIT  # the limit bound the hot key ...
    assert max(peak.values()) <= HOT_LIMIT  # ... and no key ever went past it
    assert len(started) == HOT_RUNS + COLD_KEYS * COLD_RUNS  # each ran once


PRIORITY = {
    "name": "report",
    "concurrency": {"key": "payload.tenant", "limit": 1},
    "steps": [{"id": "build", "service": "reports", "action": "build", "timeout": "30s"}],
}


async def test_priority_orders_a_keys_queue(make_system: Any) -> None:
    system = await make_system(PRIORITY)
    order: list[str] = []
    gate = asyncio.Event()

    async def build(data: Any, command: Any) -> dict[str, Any]:
        order.append(data["id"])
        if data["id"] == "first":
            await gate.wait()
        return {}

    await system.worker("reports", {"build": build})
    await system.mediator()
    client = await system.client()
    runs = [asyncio.create_task(client.submit("report", {"tenant": "t", "id": "first"}))]
    await wait_for(lambda: order, what="the first run's command")
    for i in range(4):
        payload = {"tenant": "t", "id": f"low{i}"}
        runs.append(asyncio.create_task(client.submit("report", payload)))
        await asyncio.sleep(0.05)
    payload = {"tenant": "t", "id": "urgent"}
    runs.append(asyncio.create_task(client.submit("report", payload, priority=9)))
    await asyncio.sleep(0.5)
    assert order == ["first"]  # the others wait for the key's one slot
    gate.set()
    results = await asyncio.gather(*runs)
    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert order == ["first", "urgent", "low0", "low1", "low2", "low3"]


def _gauge(replica: Any, name: str) -> float:
    """The gauge `name` of workflow ``order`` as `replica` would be scraped for it."""
    for metric, _, labels, value in replica._gauges():
        if metric == name and labels == {"workflow": "order"}:
            return float(value)
    return -1.0


STEP_KEYED = {
    "name": "invoice",
    "steps": [
        {"id": "draft", "service": "docs", "action": "draft", "timeout": "30s"},
        {"id": "charge", "service": "billing", "action": "charge", "depends_on": ["draft"],
         "timeout": "30s", "concurrency": {"key": "payload.tenant", "limit": 2}},
    ],
}  # fmt: skip
TENANTS, RUNS_PER_TENANT = 3, 12


async def test_a_step_key_caps_that_steps_calls_per_key_across_runs(make_system: Any) -> None:
    """Two replicas, 36 runs of three tenants at once: the keyed step never has more than
    two calls per tenant at the service; the step before it is not held; all complete."""
    system = await make_system(STEP_KEYED)
    in_progress: dict[str, int] = {}
    peak: dict[str, int] = {}
    drafted = 0

    async def draft(data: Any, command: Any) -> dict[str, Any]:
        nonlocal drafted
        drafted += 1
        return {}

    async def charge(data: Any, command: Any) -> dict[str, Any]:
        tenant = data["tenant"]
        in_progress[tenant] = in_progress.get(tenant, 0) + 1
        peak[tenant] = max(peak.get(tenant, 0), in_progress[tenant])
        try:
            await asyncio.sleep(0.05)
        finally:
            in_progress[tenant] -= 1
        return {}

    await system.worker("docs", {"draft": draft}, concurrency=100)
    await system.worker("billing", {"charge": charge}, concurrency=100)
    replicas = [await system.mediator(), await system.mediator()]
    client = await system.client()
    results = await asyncio.gather(
        *(
            client.submit("invoice", {"tenant": f"t{t}", "input": {}}, timeout=120)
            for t in range(TENANTS)
            for _ in range(RUNS_PER_TENANT)
        )
    )
    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert drafted == TENANTS * RUNS_PER_TENANT
    assert peak == {f"t{t}": 2 for t in range(TENANTS)}, peak
    assert sum(r.runtime.stats.queued for r in replicas) > 0  # the key held some back
    code, out, err = await cli(system.settings, "keys")
    assert code == 0 and "no run holds or waits" in out, (out, err)
