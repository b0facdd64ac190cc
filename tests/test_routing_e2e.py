"""Routing to chosen instances, with every service instance its own process: the
balancing strategies, an instance killed mid-load, a drained instance, a restart under
the same id."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mediator.errors import ConfigurationError
from mediator.replica import Mediator
from mediator.settings import FlowControlSettings, LoadBalancingSettings
from mediator.storage.registry import read_registry
from tests.helpers import cli, records_on, step, wait_for
from tests.processes import ServiceProcess
from topics.events import ResultEvent, WorkflowStatus

WORK = {"name": "work", "steps": [{**step("a", "inventory", action="work"), "timeout": "30s"}]}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start service instances as processes; every one is stopped afterwards."""
    started: list[ServiceProcess] = []

    async def start(system: Any, *specs: dict[str, Any]) -> list[ServiceProcess]:
        processes = []
        for spec in specs:
            process = ServiceProcess(system.settings, "inventory", directory=tmp_path, **spec)
            process.start()
            started.append(process)
            processes.append(process)
        return processes

    yield start
    for process in started:
        await process.stop()


async def all_routable(mediator: Mediator, instances: list[str], partitions: int = 4) -> bool:
    """Every instance is up and announces partitions, which cover the topic between them,
    and has done so for two seconds: the consumer group has settled, so commands land on
    the instance they were routed to."""
    views = (await read_registry(mediator.redis, mediator.store.keys)).get("inventory", [])
    live = {v.instance: v for v in views if v.status == "up" and v.beat.get("partitions")}
    owned = [p for v in live.values() for p in v.beat["partitions"]]
    if not (set(instances) <= set(live) and sorted(owned) == list(range(partitions))):
        _settled.clear()
        return False
    layout = repr(sorted((i, v.beat["partitions"]) for i, v in live.items()))
    now = time.monotonic()
    if _settled.get("layout") != layout:
        _settled.update(layout=layout, since=now)
    return bool(now - _settled["since"] >= 2.0)


_settled: dict[str, Any] = {}


async def run_mediator(system: Any, strategy: str, **policy: Any) -> Mediator:
    balancing = LoadBalancingSettings(strategy=strategy, **policy)  # type: ignore[arg-type]
    mediator = Mediator(system.settings.model_copy(update={"load_balancing": balancing}),
                        system.definitions)  # fmt: skip
    await mediator.start()
    return mediator


async def submit(system: Any, prefix: str, count: int, **payload: Any) -> list[ResultEvent]:
    client = await system.client()
    results = await asyncio.gather(
        *(
            client.submit("work", {k: v(n) for k, v in payload.items()},
                          request_id=f"{prefix}-{n}", timeout=60)
            for n in range(count)
        )
    )  # fmt: skip
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    return list(results)


def by_instance(results: list[ResultEvent]) -> Counter[str | None]:
    return Counter(r.steps["a"].instance for r in results)


@pytest.mark.slow
async def test_each_strategy_splits_the_work_as_it_promises(make_system: Any, fleet: Any) -> None:
    system = await make_system(WORK)
    await fleet(
        system,
        {"instance": "fast-1", "delay": 0.01, "weight": 1},
        {"instance": "fast-2", "delay": 0.01, "weight": 2},
        {"instance": "slow", "delay": 0.4, "weight": 2},
    )
    names = ["fast-1", "fast-2", "slow"]

    # Round robin: each in turn, whatever their speed.
    mediator = await run_mediator(system, "round_robin")
    await wait_for(lambda: all_routable(mediator, names), timeout=60, what="three instances")
    split = by_instance(await submit(system, "rr", 60))
    await mediator.stop()
    assert split == {"fast-1": 20, "fast-2": 20, "slow": 20}, split

    # Weighted: by the weights the instances announce, 1:2:2.
    mediator = await run_mediator(system, "weighted")
    await wait_for(lambda: all_routable(mediator, names), timeout=30, what="the registry")
    split = by_instance(await submit(system, "w", 100))
    await mediator.stop()
    assert abs(split["fast-1"] - 20) <= 3 and abs(split["fast-2"] - 40) <= 3, split

    # Least loaded: the slow instance holds its commands longer, so it gets clearly fewer.
    mediator = await run_mediator(system, "least_loaded")
    await wait_for(lambda: all_routable(mediator, names), timeout=30, what="the registry")
    client = await system.client()
    pending = []
    for n in range(120):  # a steady 50/s: the slow one's commands pile up, the others' not
        pending.append(asyncio.create_task(
            client.submit("work", {}, request_id=f"ll-{n}", timeout=60)))  # fmt: skip
        await asyncio.sleep(0.02)
    results = list(await asyncio.gather(*pending))
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    split = by_instance(results)
    await mediator.stop()
    assert sum(split.values()) == 120
    assert split["slow"] < 120 / 3 / 2, split  # under half an even share
    assert split["fast-1"] > 30 and split["fast-2"] > 30, split

    # Affinity: every command of one customer goes to one instance.
    mediator = await run_mediator(system, "consistent_hash", key="payload.customer")
    await wait_for(lambda: all_routable(mediator, names), timeout=30, what="the registry")
    results = await submit(system, "aff", 60, customer=lambda n: f"c{n % 6}")
    await mediator.stop()
    homes: dict[str, set[str | None]] = {}
    for result in results:
        customer = f"c{int(result.request_id.split('-')[1]) % 6}"
        homes.setdefault(customer, set()).add(result.steps["a"].instance)
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len(set().union(*homes.values())) > 1, homes  # and customers spread


@pytest.mark.slow
async def test_a_killed_instance_work_moves_on_at_once_and_a_restart_gets_work_again(
    make_system: Any, fleet: Any
) -> None:
    system = await make_system(WORK)
    specs = [{"instance": f"inv-{n}", "delay": 1.5} for n in range(3)]
    processes = await fleet(system, *specs)
    victim = processes[1]
    mediator = await system.mediator()
    names = [p.instance for p in processes]
    await wait_for(lambda: all_routable(mediator, names), timeout=60, what="three instances")

    client = await system.client()
    pending = [
        asyncio.create_task(client.submit("work", {}, request_id=f"k-{n}", timeout=60))
        for n in range(30)
    ]
    await wait_for(lambda: len(victim.received()) >= 5, timeout=20, what="work on the victim")
    killed_ms = time.time_ns() // 1_000_000
    victim.kill()
    on_victim = {command_id for command_id, _, _ in victim.received()}

    results = await asyncio.gather(*pending)
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    # One result per request, however many attempts ran.
    records = await records_on(system.bootstrap, system.topics.results)
    assert sorted(ResultEvent.model_validate_json(r.value).request_id for r in records) == sorted(
        f"k-{n}" for n in range(30)
    )
    # The victim is marked down, and every command it had was handed on at once: its
    # attempt ended `instance_down` and the next went to a live instance.
    assert mediator.runtime.stats.instances_down == 1
    moved = {}
    for result in results:
        summary = result.steps["a"]
        downs = [h for h in summary.history if h.error and h.error.code == "instance_down"]
        if downs:
            assert summary.instance != victim.instance and downs[0].instance == victim.instance
            moved[result.workflow_id] = downs[0].finished_ms
    for result in results:  # each it had either finished before the kill or moved on
        if f"{result.workflow_id}.a.1" in on_victim:
            assert result.steps["a"].instance == victim.instance or result.workflow_id in moved
    assert mediator.runtime.stats.rerouted_on_death == len(moved) > 0
    delays = sorted(ms - killed_ms for ms in moved.values() if ms is not None)
    print(
        f"\nkill -> re-sent: {len(delays)} commands, first {delays[0]} ms, "
        f"median {statistics.median(delays):.0f} ms, last {delays[-1]} ms"
    )
    assert delays[-1] < 3500, delays  # missed heartbeats (2 x 1 s) + grace + a sweep

    # Restarted under the same id, it is back up and gets work again.
    victim.start()
    await wait_for(lambda: all_routable(mediator, names), timeout=60, what="the restart")

    def idle() -> bool:
        # A restart first re-runs the commands it had not committed (at least once), and
        # least-loaded rightly avoids it while it does. The mediator routes by its own view
        # of the registry, refreshed every sweep: wait for that view, not Redis's, to show
        # every instance up, owning partitions and idle.
        views = mediator.registry.view.get("inventory", [])
        return len(views) == len(names) and all(
            v.status == "up" and v.beat.get("partitions") and v.beat.get("load") == 0 for v in views
        )

    await wait_for(idle, timeout=30, what="every instance idle")
    again = await asyncio.gather(
        *(client.submit("work", {}, request_id=f"r-{n}", timeout=60) for n in range(12))
    )
    assert victim.instance in by_instance(list(again))


@pytest.mark.slow
async def test_a_failing_instance_is_routed_around_by_its_own_breaker(
    make_system: Any, fleet: Any
) -> None:
    """One instance of three fails every call (retryably) while the others are fine: its
    breaker opens after `failure_threshold` failures and the balancer skips it; the
    service's breaker stays closed, every run completes (the failed attempts retried on
    the healthy instances)."""
    retry = {"max_attempts": 4, "backoff": "50ms"}
    flaky = {"name": "work", "steps": [{**step("a", "inventory", action="work"),
                                        "timeout": "30s", "retry": retry}]}  # fmt: skip
    system = await make_system(flaky)
    processes = await fleet(
        system, {"instance": "ok-1"}, {"instance": "broken", "fail": True}, {"instance": "ok-2"}
    )
    broken = processes[1]
    breakers = system.settings.circuit_breaker.model_copy(
        update={"failure_threshold": 2, "recovery_timeout_ms": 60_000}
    )
    settings = system.settings.model_copy(
        update={"load_balancing": LoadBalancingSettings(strategy="round_robin"),  # type: ignore[arg-type]
                "circuit_breaker": breakers}
    )  # fmt: skip
    mediator = Mediator(settings, system.definitions)
    await mediator.start()
    try:
        names = [p.instance for p in processes]
        await wait_for(lambda: all_routable(mediator, names), timeout=60, what="three instances")
        client = await system.client()
        for n in range(9):  # one at a time: the broken one gets every third command
            result = await client.submit("work", {}, request_id=f"warm-{n}", timeout=30)
            assert result.status is WorkflowStatus.COMPLETED
        assert mediator.runtime.router is not None
        breaker = mediator.runtime.router.breakers
        assert breaker is not None and "broken" in breaker.open(
            "inventory", int(time.time() * 1000)
        )
        received = len(broken.received())
        assert 2 <= received <= 3, received  # it opened at the second failure
        results = await submit(system, "after", 30)
        assert len(broken.received()) == received  # skipped since
        assert set(by_instance(results)) == {"ok-1", "ok-2"}
        assert mediator.breakers.state("inventory") == "closed"
    finally:
        await mediator.stop()
    code, out, _ = await cli(system.settings, "status", "--json")
    assert code == 0 and "instance:inventory:breaker_opened" in out


@pytest.mark.slow
async def test_a_drained_instance_gets_no_new_command_and_finishes_its_own(
    make_system: Any, fleet: Any
) -> None:
    system = await make_system(WORK)
    processes = await fleet(
        system, {"instance": "keep", "delay": 1.0}, {"instance": "drained", "delay": 1.0}
    )
    drained = processes[1]
    mediator = await run_mediator(system, "round_robin")
    try:
        await wait_for(lambda: all_routable(mediator, ["keep", "drained"]), timeout=60,
                       what="two instances")  # fmt: skip
        client = await system.client()
        first = [
            asyncio.create_task(client.submit("work", {}, request_id=f"a-{n}", timeout=60))
            for n in range(6)
        ]
        await wait_for(lambda: len(drained.received()) >= 3, timeout=20, what="its first work")
        code, out, err = await cli(system.settings, "drain", "inventory", "drained")
        assert code == 0, err
        assert "drain inventory drained: applied" in out, out

        def draining() -> bool:
            return any(v.instance == "drained" and v.status == "draining"
                       for v in mediator.registry.instances("inventory"))  # fmt: skip

        await wait_for(draining, timeout=10, what="the drain to be seen")
        received_before = len(drained.received())
        later = await submit(system, "b", 10)
        assert by_instance(later) == {"keep": 10}
        assert len(drained.received()) == received_before
        done = await asyncio.gather(*first)  # what it had, it finished
        assert {r.status for r in done} == {WorkflowStatus.COMPLETED}
        assert by_instance(list(done))["drained"] == received_before
    finally:
        await mediator.stop()


@pytest.mark.slow
async def test_a_per_instance_limit_caps_what_each_instance_is_sent(
    make_system: Any, fleet: Any
) -> None:
    """Two replicas route to three instances, each limited to 2 commands in flight:
    measured at each instance, none ever has more than 2 at once, every instance is kept
    at its limit, and the commands over them wait and go as instances free up."""
    flow = FlowControlSettings.model_validate(
        {"services": {"inventory": {"per_instance": 2}}, "release_ms": 50}
    )
    system = await make_system(WORK, flow_control=flow)
    names = ["i-1", "i-2", "i-3"]
    processes = await fleet(system, *({"instance": n, "delay": 0.3} for n in names))
    replicas = [await run_mediator(system, "least_loaded") for _ in range(2)]
    await wait_for(lambda: all_routable(replicas[0], names), timeout=60, what="three instances")
    await submit(system, "pi", 60)
    peaks = {p.instance: _most_at_once([at for _, _, at in p.received()], 300) for p in processes}
    assert peaks == dict.fromkeys(names, 2), peaks
    assert sum(r.runtime.stats.queued for r in replicas) > 0
    code, out, err = await cli(system.settings, "services")
    assert code == 0 and "(per instance: i-1 0, i-2 0, i-3 0)" in out, (out, err)
    for mediator in replicas:
        await mediator.stop()


def _most_at_once(starts: list[int], took_ms: int) -> int:
    """The most commands a service had at once, each taking `took_ms` from its start."""
    events = sorted([(at, 1) for at in starts] + [(at + took_ms, -1) for at in starts])
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


async def test_a_per_instance_limit_without_routing_is_refused_naming_what_it_needs(
    make_system: Any,
) -> None:
    flow = FlowControlSettings.model_validate({"services": {"inventory": {"per_instance": 2}}})
    system = await make_system(WORK, flow_control=flow)
    off = system.settings.model_copy(
        update={"load_balancing": LoadBalancingSettings(enabled=False)}
    )
    with pytest.raises(ConfigurationError, match=r"inventory\.per_instance .* load_balancing"):
        Mediator(off, system.definitions)
