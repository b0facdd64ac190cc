"""The mediator on a Redis Cluster (3 primaries, a replica each, real Valkey nodes): runs
finish across replicas with each step's keys in one slot, the operators' commands read
the state spread over the primaries, and a primary killed under load (its replica
promoted) loses and doubles nothing with `wait_replicas: 1`."""

from __future__ import annotations

import asyncio
import collections
import hashlib
from pathlib import Path
from typing import Any

import pytest

from mediator.cli.infra import EmbeddedRedisCluster
from mediator.core.schedules import parse_schedules
from mediator.settings import FlowControlSettings, ScheduleSettings, Settings
from mediator.storage.cluster import ClusterClient, ScriptedPipeline
from mediator.storage.connection import connect_to, lua_source
from mediator.storage.keys import Keys
from tests.helpers import cli, read_to_end, wait_for
from tests.processes import MediatorProcess
from tests.system import CHAIN3, RETRIED, echo, slow_echo
from topics import ResultEvent, WorkflowStatus


def on(cluster: EmbeddedRedisCluster, settings: Settings, **redis: Any) -> dict[str, Any]:
    """`make_system` overrides pointing the Redis settings at `cluster`."""
    return {
        "redis": settings.redis.model_copy(update={"url": cluster.url, "mode": "cluster", **redis})
    }


@pytest.mark.slow
async def test_two_replicas_finish_runs_on_a_cluster(
    make_system: Any, settings: Settings, redis_cluster: EmbeddedRedisCluster
) -> None:
    """Chains and retried steps run to their end on two in-process replicas whose state
    is spread over three primaries; `mediator status` and `workflows show` read it back."""
    system = await make_system(CHAIN3, RETRIED, **on(redis_cluster, settings))
    failures = collections.Counter[str]()

    async def flaky(data: Any, command: Any) -> Any:
        if command.workflow_id not in failures and command.workflow == "retried":
            failures[command.workflow_id] += 1
            msg = "the first attempt fails"
            raise RuntimeError(msg)
        return await echo(data, command)

    await system.worker("svc", {"work": flaky}, concurrency=64)
    await system.mediator()
    await system.mediator()
    client = await system.client()
    results = await asyncio.gather(
        *(client.submit("chain3", {"n": n}, request_id=f"c-{n}", timeout=60) for n in range(60)),
        *(client.submit("retried", {"n": n}, request_id=f"r-{n}", timeout=60) for n in range(4)),
    )
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert len({r.result_id for r in results}) == 64
    redis = connect_to(system.settings.redis)
    try:
        assert isinstance(redis, ClusterClient)
        await redis.initialize()
        keys = Keys(settings.redis.key_prefix, settings.redis.shards)
        nodes = {redis.get_node_from_key(keys.workflow(r.workflow_id)).name for r in results}
        assert len(nodes) == 3, nodes  # the runs live on every primary
    finally:
        await redis.aclose()
    code, out, err = await cli(system.settings, "status")
    assert code == 0, err
    assert "completed" in out
    code, out, err = await cli(system.settings, "workflows", "show", results[-1].workflow_id)
    assert code == 0 and "completed" in out, (out, err)


@pytest.mark.slow
@pytest.mark.integration  # a cluster of its own: one of its primaries is killed
async def test_a_primary_killed_under_load_loses_and_doubles_nothing(
    make_system: Any, settings: Settings, tmp_path: Path
) -> None:
    """With `wait_replicas: 1`, a primary `kill -9`ed while two replica processes run 300
    chains: its replica is promoted, the mediators ride the failover out (commits fail
    transiently and their batches are redelivered), the old primary comes back as a
    replica, and every request ends with exactly one result."""
    async with EmbeddedRedisCluster(node_timeout_ms=1000) as cluster:
        system = await make_system(
            CHAIN3, **on(cluster, settings, wait_replicas=1, wait_timeout_ms=500)
        )
        await system.worker("svc", {"work": slow_echo}, concurrency=8)  # a run of ~6 s
        workflows = system.write_workflows(tmp_path)
        replicas = [MediatorProcess(system.settings, workflows, tmp_path, f"r{i}") for i in (1, 2)]
        for replica in replicas:
            replica.start()
        client = await system.client()
        done: list[Any] = []

        async def submit(n: int) -> None:
            done.append(await client.submit("chain3", {"n": n}, request_id=f"k-{n}", timeout=180))

        try:
            runs = [asyncio.create_task(submit(n)) for n in range(300)]
            await wait_for(lambda: len(done) >= 30, timeout=120, what="the first results")
            [victim, *_] = await cluster.primaries()
            victim.kill()
            # Its replica takes over; until the old primary is back (as a replica of the
            # new one) that shard has no replica, so its commits wait and are retried.
            await asyncio.sleep(3)
            await victim.restart()
            await asyncio.gather(*runs)
        finally:
            codes = [await replica.stop() for replica in replicas]
        assert codes == [0, 0], [r.output()[-3000:] for r in replicas]
        await cluster.wait_ready()  # the replica took over every slot of the dead primary
        assert victim not in await cluster.primaries()  # and the old primary follows it
        assert len(done) == 300
        assert {r.status for r in done} == {WorkflowStatus.COMPLETED}
        assert len({r.request_id for r in done}) == 300
        # On the results topic: one result per request (a copy re-sent by the outbox
        # carries the same result_id).
        records = await read_to_end(system.bootstrap, system.topics.results)
        ids: dict[str, set[str]] = collections.defaultdict(set)
        for record in records:
            event = ResultEvent.model_validate_json(record.value)
            ids[event.request_id].add(event.result_id or "")
        assert len(ids) == 300
        assert {len(v) for v in ids.values()} == {1}


FEATURES = [
    {"name": "keyed", "concurrency": {"key": "payload.customer", "limit": 1},
     "steps": [{"id": "a", "service": "svc", "action": "work"}]},
    {"name": "limited", "steps": [{"id": "pay", "service": "pay", "action": "charge"}]},
    {"name": "payment", "steps": [
        {"id": "charge", "service": "svc", "action": "intent"},
        {"id": "paid", "depends_on": ["charge"], "timeout": "20s",
         "wait": {"event": "payment", "key": "steps.charge.intent"}},
    ]},
    {"name": "tick", "steps": [{"id": "a", "service": "svc", "action": "work"}]},
]  # fmt: skip


@pytest.mark.slow
async def test_keys_limits_signals_and_schedules_run_on_a_cluster(
    make_system: Any,
    settings: Settings,
    redis_cluster: EmbeddedRedisCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrency keys, a flow-control limit, a wait reached by a correlation key and a
    schedule on a cluster: every run ends as it does on one Redis, and the scripts they
    need (slots, permits, queues, signals, schedules) all run, none refused."""
    ran: set[str] = set()
    call, queue = ClusterClient.execute_command, ScriptedPipeline.execute_command

    async def calling(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] == "EVALSHA":
            ran.add(args[1])
        return await call(self, *args, **kwargs)

    def queueing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] == "EVALSHA":
            ran.add(args[1])
        return queue(self, *args, **kwargs)

    monkeypatch.setattr(ClusterClient, "execute_command", calling)
    monkeypatch.setattr(ScriptedPipeline, "execute_command", queueing)
    flow = FlowControlSettings.model_validate({"services": {"pay": {"max_in_flight": 2}}})
    system = await make_system(
        *FEATURES,
        **on(redis_cluster, settings),
        flow_control=flow,
        schedules=ScheduleSettings(poll_ms=50),
    )
    for schedule in parse_schedules(
        {"schedules": [{"name": "beat", "workflow": "tick", "every": "300ms"}]}
    ):
        system.definitions.add_schedule(schedule)
    ticks: list[int] = []

    async def work(data: Any, command: Any) -> dict[str, Any]:
        if command.workflow == "tick":
            ticks.append(1)
        await asyncio.sleep(0.02)
        return {}

    async def intent(data: Any, command: Any) -> dict[str, Any]:
        return {"intent": f"pi_{data['order']}"}

    await system.worker("svc", {"work": work, "intent": intent})
    await system.worker("pay", {"charge": slow_echo}, concurrency=16)
    await system.mediator()
    await system.mediator()
    client = await system.client()
    keyed = [
        client.submit("keyed", {"customer": f"c{n % 3}"}, request_id=f"k-{n}", timeout=60)
        for n in range(12)
    ]
    limited = [client.submit("limited", {}, request_id=f"l-{n}", timeout=60) for n in range(10)]
    paid = asyncio.create_task(
        client.submit("payment", {"order": "a"}, request_id="p-a", timeout=60)
    )
    await client.signal_key("payment", "pi_b", {"status": "ok"}, signal_id="early")  # kept
    early = asyncio.create_task(
        client.submit("payment", {"order": "b"}, request_id="p-b", timeout=60)
    )
    results = await asyncio.gather(*keyed, *limited)
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert (await early).status is WorkflowStatus.COMPLETED
    await asyncio.sleep(0.5)  # the run on pi_a waits by now
    await client.signal_key("payment", "pi_a", {"status": "ok"}, signal_id="late")
    assert (await paid).status is WorkflowStatus.COMPLETED
    await wait_for(lambda: len(ticks) >= 3, timeout=30, what="three ticks of the schedule")
    scripts = {
        hashlib.sha1(lua_source(name).encode()).hexdigest(): name
        for name in ("slot_acquire.lua", "slot_release.lua", "limit_acquire.lua",
                     "limit_status.lua", "signal_subscribe.lua", "signal_route.lua",
                     "schedule_publish.lua", "schedule_advance.lua", "commit.lua",
                     "claim_timers.lua", "heartbeat.lua", "due_now.lua", "unpark.lua")
    }  # fmt: skip
    assert sorted(n for sha, n in scripts.items() if sha not in ran) == []
