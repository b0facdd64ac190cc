"""A live instance is never taken for dead because the mediator itself stalled: a replica
process frozen (SIGSTOP) well past the instance's deadline, with commands in flight on it,
resumes and hands nothing on; every step runs once. A killed instance is still found."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from mediator.storage.keys import Keys
from mediator.storage.registry import read_registry
from tests.helpers import step, wait_for
from tests.processes import MediatorProcess
from tests.system import System
from topics.events import CommandEvent, ResultEvent, WorkflowStatus

CHAIN = {
    "name": "chain",
    "steps": [
        step("a", "svc", action="work", timeout="60s"),
        step("b", "svc", action="work", depends_on=["a"], timeout="60s"),
    ],
}
RUNS = 20
#: Longer than the instance's deadline (2 missed heartbeats of 1 s, plus 0.3 s) and than
#: the hold the registry used to wait when every instance went quiet at once (5 s).
FREEZE_S = 8.0


@pytest.mark.slow
async def test_a_frozen_replica_does_not_take_a_live_instance_for_dead(
    make_system: Any, redis_client: Redis, tmp_path: Path
) -> None:
    system: System = await make_system(CHAIN)
    ran: Counter[tuple[str, str]] = Counter()

    async def work(data: Any, command: CommandEvent) -> dict[str, Any]:
        ran[(command.workflow_id, command.step)] += 1
        await asyncio.sleep(FREEZE_S + 3)  # still in flight when the replica resumes
        return {"attempt": command.attempt}

    await system.worker("svc", {"work": work}, heartbeat_interval=1.0)
    replica = MediatorProcess(system.settings, system.write_workflows(tmp_path), tmp_path, "one")
    replica.start()
    client = await system.client()
    tasks: list[asyncio.Task[ResultEvent]] = []
    try:
        keys = Keys(system.settings.redis.key_prefix, system.settings.redis.shards)
        redis = redis_client

        async def routed() -> int:
            total = 0
            for shard in range(keys.shards):
                total += await redis.zcard(keys.routed(shard))
            return total

        tasks = [
            asyncio.create_task(client.submit("chain", {}, request_id=f"fz-{n}", timeout=120))
            for n in range(RUNS)
        ]
        await wait_for(lambda: _at_least(routed, RUNS // 2), timeout=60, what="commands routed")
        replica.process.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        await asyncio.sleep(FREEZE_S)
        replica.process.send_signal(signal.SIGCONT)
        assert time.monotonic() - frozen >= FREEZE_S
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        replica.process.send_signal(signal.SIGCONT)
        code = await replica.stop()
    output = replica.output()
    assert code == 0, output
    assert all(r.status is WorkflowStatus.COMPLETED for r in results), results
    assert set(ran.values()) == {1}, sorted(k for k, n in ran.items() if n > 1)
    assert all(s.attempts == 1 for r in results for s in r.steps.values())
    assert "is down" not in output and "go elsewhere" not in output
    registry = await read_registry(redis_client, keys)
    assert [v.status for v in registry["svc"]] == ["up"]


async def _at_least(read: Any, n: int) -> bool:
    return bool(await read() >= n)
