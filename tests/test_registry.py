"""The service registry: heartbeats from the service SDK over the real broker, recorded in
the real Redis; deaths found by the sweep exactly once; `mediator services` shows it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.runtime.registry import Registry
from mediator.settings import DiscoverySettings
from mediator.storage.keys import Keys
from mediator.storage.registry import read_registry
from tests.helpers import produce, wait_for
from tests.test_cli import cli
from tests.test_dlq import wait_for_letters
from tests.test_workflows_e2e import step
from topics.events import HealthEvent, HealthStatus

ONE = {"name": "one", "steps": [step("a", "inventory", action="work")]}


def beat(instance: str, status: HealthStatus = HealthStatus.UP, **fields: Any) -> HealthEvent:
    values: dict[str, Any] = {"interval_ms": 100, "ts_ms": 0, "capacity": 8}
    return HealthEvent(service="inventory", instance=instance, status=status, **(values | fields))


async def test_a_heartbeating_worker_is_registered_with_its_partitions(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    mediator = await system.mediator()
    # Long enough that a busy machine (the CLI runs below start processes) does not delay
    # two heartbeats in a row, which would rightly mark the instance down.
    worker = await system.worker("inventory", {"work": lambda data: {}}, heartbeat_interval=0.5)
    keys = mediator.store.keys

    async def registered() -> list[Any]:
        views = (await read_registry(mediator.redis, keys)).get("inventory", [])
        return [v for v in views if v.beat.get("partitions")]

    [view] = await wait_for(registered, timeout=15, what="the worker in the registry")
    assert view.instance == worker.instance and view.status == "up"
    assert view.beat["partitions"] == [0, 1, 2, 3]  # the only member of its group
    assert view.beat["capacity"] == 64 and view.beat["interval_ms"] == 500

    # It answers work, and its next heartbeats say so.
    client = await system.client()
    for n in range(3):
        await client.submit("one", {}, request_id=f"r{n}", timeout=10)

    async def answered() -> int:
        views = (await read_registry(mediator.redis, keys))["inventory"]
        return sum(v.beat["answered"] for v in views)

    await wait_for(answered, timeout=5, what="a heartbeat reporting answered commands")

    code, out, err = await cli(system.settings, "services", "--json")
    assert code == 0, err
    shown = orjson.loads(out)["inventory"]
    assert [i["instance"] for i in shown["instances"]] == [worker.instance]
    assert shown["instances"][0]["status"] == "up" and shown["breaker"]["state"] == "closed"
    code, out, err = await cli(system.settings, "services")
    assert code == 0, err
    assert "inventory: 1/1 up, breaker closed" in out and worker.instance in out

    # A clean stop says so: the instance left, it is not a death to detect.
    await worker.stop()

    async def statuses() -> list[str]:
        return [v.status for v in (await read_registry(mediator.redis, keys))["inventory"]]

    await wait_for(lambda: _is(statuses, ["down"]), timeout=5, what="the leave heartbeat")
    assert mediator.runtime.stats["instances_down"] == 0
    assert worker.stats["heartbeats_failed"] == 0


async def _is(read: Any, expected: Any) -> bool:
    return bool(await read() == expected)


async def test_a_silent_instance_is_marked_down_once_across_replicas(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 4)
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0, startup_grace="300ms")
    one, two = Registry(redis_client, keys, settings), Registry(redis_client, keys, settings)
    joined = await one.apply([beat("i-1"), beat("i-2")])
    assert [(c.instance, c.what) for c in joined] == [("i-1", "joined"), ("i-2", "joined")]
    assert await one.apply([beat("i-1")]) == []  # nothing changed

    # i-2 goes on heartbeating; i-1 stops. After two of its intervals it is down.
    assert await one.sweep() == [] and await two.sweep() == []
    for _ in range(4):
        await asyncio.sleep(0.06)
        await two.apply([beat("i-2")])
    found = await asyncio.gather(one.sweep(), two.sweep())
    deaths = [(c.service, c.instance, c.what) for c in found[0] + found[1]]
    assert deaths == [("inventory", "i-1", "down")]
    assert await one.sweep() == [] and await two.sweep() == []
    views = {v.instance: v.status for v in (await read_registry(redis_client, keys))["inventory"]}
    assert views == {"i-1": "down", "i-2": "up"}

    # It heartbeats again: back up. A draining one, then one that leaves cleanly.
    back = await one.apply([beat("i-1"), beat("i-2", HealthStatus.DRAINING)])
    assert [(c.instance, c.what) for c in back] == [("i-1", "back up"), ("i-2", "draining")]
    left = await one.apply([beat("i-2", HealthStatus.DOWN)])
    assert [(c.instance, c.what) for c in left] == [("i-2", "left")]
    # Nobody is heard from after that: i-1 is down once the hold after its deadline is over.
    await asyncio.sleep(0.7)
    deaths = [c.instance for c in await one.sweep()]
    assert deaths == ["i-1"]  # the one that left is not reported as dead


async def test_instances_silent_all_at_once_are_held_before_they_are_marked_down(
    redis_client: Redis, key_prefix: str
) -> None:
    """Every instance of a service going quiet together looks like a stall of Redis or of
    the health consumer: no death is reported until the hold after their deadlines is
    over, so a stall's backlog of heartbeats arrives first. A real collective death is
    still found, after the hold."""
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0, startup_grace="1s")
    registry = Registry(redis_client, Keys(key_prefix, 4), settings)
    await registry.apply([beat("i-1"), beat("i-2")])  # 100 ms intervals: 200 ms deadlines
    await asyncio.sleep(0.5)
    assert await registry.sweep() == []
    assert await registry.apply([beat("i-1"), beat("i-2")]) == []  # the backlog: all fine
    await asyncio.sleep(0.5)
    assert await registry.sweep() == []
    await asyncio.sleep(0.9)
    assert sorted(c.instance for c in await registry.sweep()) == ["i-1", "i-2"]


async def test_an_operator_drain_outlasts_the_instance_heartbeats_until_it_leaves(
    redis_client: Redis, key_prefix: str
) -> None:
    registry = Registry(redis_client, Keys(key_prefix, 4), DiscoverySettings())
    await registry.apply([beat("i-1")])
    assert await registry.drain("inventory", "nobody") is None
    assert await registry.drain("inventory", "i-1") == "draining"
    # It goes on saying `up`; it stays drained, and that is no change to report.
    assert await registry.apply([beat("i-1")]) == []
    await registry.refresh()
    assert [v.status for v in registry.instances("inventory")] == ["draining"]
    assert await registry.drain("inventory", "i-1", on=False) == "up"
    await registry.drain("inventory", "i-1")
    # Once it leaves, the drain is over: a restart under the same id gets work again.
    await registry.apply([beat("i-1", HealthStatus.DOWN)])
    changes = await registry.apply([beat("i-1")])
    assert [(c.instance, c.what) for c in changes] == [("i-1", "back up")]
    await registry.refresh(["inventory"])
    assert [v.status for v in registry.instances("inventory")] == ["up"]


async def test_a_heartbeat_that_does_not_validate_is_dead_lettered(make_system: Any) -> None:
    system = await make_system(ONE)
    mediator = await system.mediator()
    await produce(
        system.bootstrap,
        system.topics.health,
        [b'{"type": "health", "service": "inventory"}', b"not json"],
    )
    letters = [d for _, _, d in await wait_for_letters(system.settings, 2)]
    assert {d.source_topic for d in letters} == {system.topics.health}
    assert {d.code for d in letters} == {"invalid"}
    assert any("instance" in d.reason for d in letters)
    assert mediator.runtime.stats["heartbeats"] == 0
