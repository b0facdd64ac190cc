"""Redis restarted empty mid-run: nothing is lost silently, and `recover` finishes it all."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from redis.exceptions import RedisError

from mediator import clock
from mediator.cli.infra import EmbeddedRedis
from mediator.ops.recover import recover
from mediator.settings import RedisSettings
from tests.helpers import wait_for
from tests.system import CHAIN3, slow_echo
from topics import WorkflowStatus


@pytest.mark.slow
async def test_redis_restarted_empty_then_recover_every_request_gets_a_result(
    make_system: Any, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mediator")
    redis = RedisSettings(url=own_redis.url, key_prefix="loss", shards=4, socket_timeout_s=0.5)
    system = await make_system(CHAIN3, redis=redis)
    await system.worker("svc", {"work": slow_echo}, concurrency=16)
    mediator = await system.mediator()
    client = await system.client()
    began = clock.now_ms() - 1000
    done: list[Any] = []

    async def submit(n: int) -> None:
        done.append(await client.submit("chain3", {"n": n}, request_id=f"l-{n}", timeout=120))

    tasks = [asyncio.create_task(submit(n)) for n in range(300)]
    try:
        await wait_for(lambda: len(done) >= 20, timeout=60, what="first results")
        own_redis.kill()
        await own_redis.restart()  # empty: every run in flight is gone
        lost_at = len(done)

        async def counted() -> bool:  # where ops look
            try:
                stats = await mediator.redis.hgetall(mediator.store.keys.stats)
            except RedisError:  # the client's old connection, closed by the restart
                return False
            return int(stats.get(b"replies:unknown_workflow", 0)) > 0

        await wait_for(counted, timeout=30, what="replies for runs Redis lost, counted")

        report = await recover(system.settings, since_ms=began)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    finally:
        for task in tasks:
            task.cancel()

    assert lost_at < 300
    assert report.republished > 0
    assert len({r.request_id for r in done}) == 300
    assert {r.status for r in done} == {WorkflowStatus.COMPLETED}
    assert any("Redis does not have" in r.getMessage() for r in caplog.records)
