"""Several mediator replicas, and a replica killed mid-run: no workflow is lost."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from mediator.runtime.groups import inbound_group
from tests.helpers import wait_for
from tests.processes import MediatorProcess, group_members
from tests.system import CHAIN3, echo, slow_echo
from topics import WorkflowStatus


def _processed(output: str) -> dict[str, int]:
    match = re.search(r"mediator stopped: (.*?);", output)
    assert match, f"no shutdown line in replica log:\n{output[-2000:]}"
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


@pytest.mark.slow
async def test_two_replicas_share_500_workflows_and_lose_none(
    make_system: Any, tmp_path: Path
) -> None:
    system = await make_system(CHAIN3)
    await system.worker("svc", {"work": echo}, concurrency=256)
    workflows = system.write_workflows(tmp_path)
    replicas = [MediatorProcess(system.settings, workflows, tmp_path, f"r{i}") for i in (1, 2)]
    for replica in replicas:
        replica.start()
    try:
        group = inbound_group(system.settings.kafka)
        await wait_for(
            lambda: _members_are(system.bootstrap, group, 2), timeout=60, what="both replicas"
        )
        client = await system.client()
        results = await asyncio.gather(
            *(
                client.submit("chain3", {"n": n}, request_id=f"rep-{n}", timeout=120)
                for n in range(500)
            )
        )
    finally:
        codes = [await replica.stop() for replica in replicas]

    assert codes == [0, 0], [r.output()[-2000:] for r in replicas]
    assert len({r.request_id for r in results}) == 500
    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert all(r.output["c"]["step"] == "c" for r in results)
    stats = [_processed(replica.output()) for replica in replicas]
    assert sum(s["requests"] for s in stats) == 500
    assert all(s["requests"] > 0 and s["replies"] > 0 for s in stats), stats
    assert system.workers["svc"].stats["executed"] == 1500


async def _members_are(bootstrap: str, group: str, n: int) -> bool:
    return await group_members(bootstrap, group) == n


@pytest.mark.slow
async def test_replica_killed_mid_run_its_workflows_complete_on_restart(
    make_system: Any, tmp_path: Path
) -> None:
    system = await make_system(CHAIN3)

    # At most 16 commands at a time, 50 ms each: the run lasts seconds, so the kill
    # lands in the middle of it.
    worker = await system.worker("svc", {"work": slow_echo}, concurrency=16)
    workflows = system.write_workflows(tmp_path)
    first = MediatorProcess(system.settings, workflows, tmp_path, "first")
    second = MediatorProcess(system.settings, workflows, tmp_path, "second")
    first.start()
    client = await system.client()
    done: list[Any] = []

    async def submit(n: int) -> None:
        done.append(await client.submit("chain3", {"n": n}, request_id=f"kill-{n}", timeout=180))

    tasks = [asyncio.create_task(submit(n)) for n in range(200)]
    try:
        await wait_for(lambda: len(done) >= 20, timeout=60, what="first results")
        assert len(done) < 200, "the run finished before the kill; make the services slower"
        first.kill()
        in_flight_at_kill = 200 - len(done)
        second.start()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await second.stop()

    assert in_flight_at_kill > 0
    assert len(done) == 200
    assert {r.request_id for r in done} == {f"kill-{n}" for n in range(200)}
    assert all(r.status is WorkflowStatus.COMPLETED for r in done)
    # Commands may be re-sent after the kill (at-least-once); the worker ran each once.
    assert worker.stats["executed"] == 600
    mediator_store = await system.mediator()  # reads Redis with the same layout
    await wait_for(lambda: _outbox_empty(mediator_store), timeout=30, what="outbox drained")


async def _outbox_empty(mediator: Any) -> bool:
    return await mediator.store.outbox_size() == 0
