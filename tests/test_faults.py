"""Infrastructure faults: Redis stalls mid-run; nothing is lost and nothing hot-loops."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mediator.cli.infra import EmbeddedRedis
from mediator.settings import RedisSettings
from tests.helpers import wait_for
from tests.system import CHAIN3, slow_echo
from topics import WorkflowStatus


@pytest.mark.slow
async def test_redis_paused_mid_run_every_workflow_still_completes(
    make_system: Any, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mediator")
    redis = RedisSettings(url=own_redis.url, key_prefix="fault", shards=4, socket_timeout_s=0.5)
    system = await make_system(CHAIN3, redis=redis)
    system.settings = system.settings.model_copy(
        update={"outbox": system.settings.outbox.model_copy(update={"lease_ms": 2000})}
    )

    # At most 16 commands at a time, 50 ms each: the run lasts seconds, so the stall
    # lands in the middle of it.
    worker = await system.worker("svc", {"work": slow_echo}, concurrency=16)
    mediator = await system.mediator()
    client = await system.client()
    done: list[Any] = []

    async def submit(n: int) -> None:
        done.append(await client.submit("chain3", {"n": n}, request_id=f"p-{n}", timeout=120))

    tasks = [asyncio.create_task(submit(n)) for n in range(300)]
    try:
        await wait_for(lambda: len(done) >= 10, timeout=60, what="first results")
        own_redis.pause()
        await asyncio.sleep(3)
        finished_during_pause = len(done)
        own_redis.resume()
        await asyncio.gather(*tasks)
    finally:
        own_redis.resume()
        for task in tasks:
            task.cancel()

    assert len({r.request_id for r in done}) == 300
    assert all(r.status is WorkflowStatus.COMPLETED for r in done)
    assert finished_during_pause < 300
    assert worker.stats["executed"] == 900
    # The stall really hit the hot path: batches were rewound rather than lost.
    assert any("will be redelivered" in r.getMessage() for r in caplog.records)
    await wait_for(
        lambda: _outbox_empty(mediator), timeout=30, what="outbox drained after the stall"
    )


async def _outbox_empty(mediator: Any) -> bool:
    return await mediator.store.outbox_size() == 0
