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
from tests.helpers import cli, produce, step, wait_for, wait_for_letters
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
    assert mediator.runtime.stats.instances_down == 0
    assert worker.stats["heartbeats_failed"] == 0


async def _is(read: Any, expected: Any) -> bool:
    return bool(await read() == expected)


async def _read_to_now(registry: Registry, redis: Redis) -> None:
    """The health topic (one partition) has been read up to Redis's clock now: a marker
    written now, applied after every heartbeat before it."""
    seconds, micros = await redis.time()
    await redis.hset(registry.hashes.keys.health_watermark, "partitions", 1)
    await registry.apply([], {0: seconds * 1000 + micros // 1000})


async def test_a_silent_instance_is_marked_down_once_across_replicas(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 4)
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0)
    one, two = Registry(redis_client, keys, settings), Registry(redis_client, keys, settings)
    joined = await one.apply([beat("i-1"), beat("i-2")])
    assert [(c.instance, c.what) for c in joined] == [("i-1", "joined"), ("i-2", "joined")]
    assert await one.apply([beat("i-1")]) == []  # nothing changed

    # i-2 goes on heartbeating; i-1 stops. Two of its intervals later, with the health
    # topic read that far, it is down: found by one replica.
    assert await one.sweep() == [] and await two.sweep() == []
    for _ in range(4):
        await asyncio.sleep(0.06)
        await two.apply([beat("i-2")])
    await _read_to_now(two, redis_client)
    found = await asyncio.gather(one.sweep(), two.sweep())
    deaths = [(c.service, c.instance, c.what) for c in found[0] + found[1]]
    assert deaths == [("inventory", "i-1", "down")]
    assert await one.sweep() == [] and await two.sweep() == []
    views = {v.instance: v for v in (await read_registry(redis_client, keys))["inventory"]}
    assert {name: v.status for name, v in views.items()} == {"i-1": "down", "i-2": "up"}
    assert views["i-1"].dead and not views["i-2"].dead

    # It heartbeats again: back up, and no longer dead. A draining one, then one that
    # leaves cleanly: down, but not dead (its work is not handed on).
    back = await one.apply([beat("i-1"), beat("i-2", HealthStatus.DRAINING)])
    assert [(c.instance, c.what) for c in back] == [("i-1", "back up"), ("i-2", "draining")]
    left = await one.apply([beat("i-2", HealthStatus.DOWN)])
    assert [(c.instance, c.what) for c in left] == [("i-2", "left")]
    await asyncio.sleep(0.3)
    await _read_to_now(one, redis_client)
    deaths = [c.instance for c in await one.sweep()]
    assert deaths == ["i-1"]  # the one that left is not reported as dead
    views = {v.instance: v for v in (await read_registry(redis_client, keys))["inventory"]}
    assert views["i-1"].dead and views["i-2"].status == "down" and not views["i-2"].dead


async def test_silence_is_evidence_only_once_the_health_topic_was_read_past_it(
    redis_client: Redis, key_prefix: str
) -> None:
    """The mediator stalled (its health consumer behind, Redis or the broker paused): the
    instances' deadlines pass with their heartbeats unread. None is marked down until the
    topic has been read past its deadline; then the backlog shows they are alive. One that
    really stopped is marked down once the topic is read past its deadline."""
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0)
    registry = Registry(redis_client, Keys(key_prefix, 4), settings)
    await _read_to_now(registry, redis_client)
    await registry.apply([beat("i-1"), beat("i-2")])  # 100 ms intervals: 200 ms deadlines
    await asyncio.sleep(1.0)  # the stall: both deadlines long past, nothing read
    assert await registry.sweep() == []
    # The backlog arrives: heartbeats of both, then the marker written after them.
    assert await registry.apply([beat("i-1"), beat("i-2")]) == []
    await _read_to_now(registry, redis_client)
    assert await registry.sweep() == []
    # Now i-2 really stops; i-1 goes on.
    for _ in range(4):
        await asyncio.sleep(0.06)
        await registry.apply([beat("i-1")])
    assert await registry.sweep() == []  # past its deadline, but not read that far
    await _read_to_now(registry, redis_client)
    assert [c.instance for c in await registry.sweep()] == ["i-2"]


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
    assert mediator.runtime.stats.heartbeats == 0


async def test_after_redis_lost_heartbeats_no_one_is_marked_down_until_heard_again(
    redis_client: Redis, key_prefix: str
) -> None:
    """A failover lost writes: Redis remembers the health topic read up to offset 10, but
    the next batch starts at 20 (the heartbeats in between were applied, then lost). An
    instance whose last remembered heartbeat is old is not marked down until everyone had
    the time to be heard from again; one that stays silent is, after that."""
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0, after_loss="400ms")
    registry = Registry(redis_client, Keys(key_prefix, 4), settings)
    await registry.apply([beat("i-1"), beat("i-2")], read={0: (0, 10)})
    await asyncio.sleep(0.3)  # both deadlines pass
    await registry.apply([beat("i-2")], read={0: (20, 21)})  # a gap: writes were lost
    await _read_to_now(registry, redis_client)
    assert await registry.sweep() == []  # i-1's last heartbeat may be among the lost
    await asyncio.sleep(0.45)
    await registry.apply([beat("i-2")], read={0: (22, 22)})
    await _read_to_now(registry, redis_client)
    assert [c.instance for c in await registry.sweep()] == ["i-1"]


async def test_a_replayed_heartbeat_keeps_no_one_alive_and_downs_no_one(
    redis_client: Redis, key_prefix: str
) -> None:
    """A captured heartbeat published again: an `up` of a stopped instance does not keep
    it alive (same boot, no newer sequence), and a clean-shutdown `down` of an earlier
    start does not mark the restarted instance (same id, new boot) down."""
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0)
    registry = Registry(redis_client, Keys(key_prefix, 4), settings)
    await _read_to_now(registry, redis_client)
    captured_up = beat("i-1", boot="a1", seq=7, ts_ms=1_000)
    await registry.apply([beat("i-1", boot="a1", seq=6, ts_ms=900), captured_up])
    # It stops; the attacker replays its last heartbeat: stale, so it is marked down.
    for _ in range(4):
        await asyncio.sleep(0.06)
        assert await registry.apply([captured_up]) == []
    assert registry.stale == 4
    await _read_to_now(registry, redis_client)
    assert [c.instance for c in await registry.sweep()] == ["i-1"]

    # Its clean shutdown of that start, captured; it restarts under the same id.
    captured_down = beat("i-1", HealthStatus.DOWN, boot="a1", seq=8, ts_ms=1_100)
    await registry.apply([captured_down])
    restarted = await registry.apply([beat("i-1", boot="b2", seq=0, ts_ms=5_000)])
    assert [(c.instance, c.what) for c in restarted] == [("i-1", "back up")]
    assert await registry.apply([captured_down, beat("i-1", boot="a1", seq=99, ts_ms=1)]) == []
    await registry.refresh(["inventory"])
    assert [v.status for v in registry.instances("inventory")] == ["up"]
    # Heartbeats without a boot (services that predate it) are taken as before.
    assert await registry.apply([beat("i-9")]) != []


async def test_an_instance_without_boot_ids_that_left_is_not_brought_back_by_a_replay(
    redis_client: Redis, key_prefix: str
) -> None:
    """A service that sends no boot id leaves cleanly; its earlier `up`, redelivered after
    a rewind, is older than the `down` and stale: the instance stays left, and is never
    marked down (it did not die)."""
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0)
    registry = Registry(redis_client, Keys(key_prefix, 4), settings)
    await _read_to_now(registry, redis_client)
    earlier_up = beat("i-1", ts_ms=1_000)
    await registry.apply([earlier_up, beat("i-1", HealthStatus.DOWN, ts_ms=1_500)])
    assert await registry.apply([earlier_up]) == []  # redelivered: stale
    assert registry.stale == 1
    await asyncio.sleep(0.3)
    await _read_to_now(registry, redis_client)
    assert await registry.sweep() == []
    # A newer `up` of the same id (it came back) is taken.
    assert await registry.apply([beat("i-1", ts_ms=2_000)]) != []
    # While it is up, a heartbeat stamped earlier (its clock stepped back) still counts:
    # it is heard, not taken for dead.
    await registry.apply([beat("i-1", ts_ms=1_200)])
    assert registry.stale == 1
