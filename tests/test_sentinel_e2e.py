"""The mediator behind Redis Sentinel (a primary, a replica, three Sentinels: real Valkey
servers): runs finish with the primary found through the Sentinels, and a primary
killed under load, its replica promoted, loses and doubles nothing with
`wait_replicas: 1`."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest

from mediator.cli.infra import EmbeddedSentinelSet
from mediator.settings import Settings
from tests.helpers import cli, read_to_end, wait_for
from tests.processes import MediatorProcess
from tests.system import CHAIN3, echo, slow_echo
from topics import ResultEvent, WorkflowStatus


def on(sentinels: EmbeddedSentinelSet, settings: Settings, **redis: Any) -> dict[str, Any]:
    """`make_system` overrides pointing the Redis settings at the Sentinels."""
    update = {"mode": "sentinel", "sentinels": sentinels.addresses}
    return {"redis": settings.redis.model_copy(update=update | redis)}


async def one_result_each(system: Any, count: int) -> None:
    """The results topic holds one result per request (a copy re-sent by the outbox
    carries the same result_id)."""
    ids: dict[str, set[str]] = collections.defaultdict(set)
    for record in await read_to_end(system.bootstrap, system.topics.results):
        event = ResultEvent.model_validate_json(record.value)
        ids[event.request_id].add(event.result_id or "")
    assert len(ids) == count
    assert {len(v) for v in ids.values()} == {1}


@pytest.mark.slow
@pytest.mark.integration  # a primary, a replica and three Sentinels of its own
async def test_runs_finish_through_sentinel_and_survive_a_failover(
    make_system: Any, settings: Settings, tmp_path: Path
) -> None:
    """Two replica processes find the primary through the Sentinels and run 300 chains;
    the primary is `kill -9`ed mid-run; the Sentinels promote its replica, the mediators
    reconnect to it (commits fail transiently meanwhile and their batches are
    redelivered), the old primary returns as a replica, and every request ends with
    exactly one result. The CLI reads the state through the Sentinels too."""
    async with EmbeddedSentinelSet(down_after_ms=1000) as sentinels:
        system = await make_system(
            CHAIN3, **on(sentinels, settings, wait_replicas=1, wait_timeout_ms=500)
        )
        await system.worker("svc", {"work": slow_echo}, concurrency=8)  # a run of ~6 s
        workflows = system.write_workflows(tmp_path)
        replicas = [MediatorProcess(system.settings, workflows, tmp_path, f"r{i}") for i in (1, 2)]
        for replica in replicas:
            replica.start()
        client = await system.client()
        done: list[Any] = []

        async def submit(n: int) -> None:
            done.append(await client.submit("chain3", {"n": n}, request_id=f"s-{n}", timeout=180))

        try:
            runs = [asyncio.create_task(submit(n)) for n in range(300)]
            await wait_for(lambda: len(done) >= 30, timeout=120, what="the first results")
            victim = await sentinels.primary_now()
            victim.kill()
            await wait_for(lambda: _moved_from(sentinels, victim), timeout=30, what="the failover")
            await victim.restart()  # back, and made a replica of the new primary
            await asyncio.gather(*runs)
        finally:
            codes = [await replica.stop() for replica in replicas]
        assert codes == [0, 0], [r.output()[-3000:] for r in replicas]
        # The failover was felt, as a transient failure, and ridden out.
        assert any("Redis unavailable" in r.output() for r in replicas)
        assert {r.status for r in done} == {WorkflowStatus.COMPLETED}
        assert len({r.request_id for r in done}) == 300
        await one_result_each(system, 300)
        code, out, err = await cli(system.settings, "status")
        assert code == 0 and "completed" in out, (out, err)


async def _moved_from(sentinels: EmbeddedSentinelSet, old: Any) -> bool:
    return await sentinels.primary_now() is not old


@pytest.mark.slow
@pytest.mark.integration  # three Sentinels of its own
async def test_an_in_process_replica_runs_chains_through_sentinel(
    make_system: Any, settings: Settings
) -> None:
    async with EmbeddedSentinelSet(sentinels=3) as sentinels:
        system = await make_system(CHAIN3, **on(sentinels, settings))
        await system.worker("svc", {"work": echo}, concurrency=64)
        await system.mediator()
        client = await system.client()
        results = await asyncio.gather(
            *(client.submit("chain3", {"n": n}, request_id=f"i-{n}", timeout=60) for n in range(40))
        )
        assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
