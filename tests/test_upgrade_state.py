"""A rolling upgrade of the stored form of runs: runs in flight stored by an earlier
version as one document (no step fields) finish on a replica that writes step by step, on
the real broker and Redis, whether the replica holds them in its cache (its first commit of
a few steps is refused and written whole) or reads them cold; read back from Redis after
that first commit, each still has every step."""

from __future__ import annotations

import asyncio
from typing import Any

from mediator.core.state import dumps
from mediator.storage.commit import state_of
from tests.helpers import wait_for
from tests.system import CHAIN3, echo
from topics import WorkflowStatus


async def test_runs_stored_as_one_document_finish_after_the_upgrade(make_system: Any) -> None:
    system = await make_system(CHAIN3)
    held = {"b": asyncio.Event(), "c": asyncio.Event()}

    async def work(data: Any, command: Any) -> Any:
        if command.step in held:
            await held[command.step].wait()
        return await echo(data, command)

    await system.worker("svc", {"work": work}, concurrency=32)
    mediator = await system.mediator()
    client = await system.client()
    runs = [
        asyncio.create_task(client.submit("chain3", {"n": n}, request_id=f"up-{n}", timeout=60))
        for n in range(8)
    ]
    store, redis = mediator.store, mediator.redis
    ids: list[str] = []

    async def at(step: str) -> bool:
        nonlocal ids
        found = await redis.zrange(store.keys.status_index(0, "running"), 0, -1)
        for shard in range(1, store.keys.shards):
            found += await redis.zrange(store.keys.status_index(shard, "running"), 0, -1)
        ids = [wid.decode() for wid in found]
        states = [await store.load(wid) for wid in ids]
        return len(ids) == 8 and all(
            s is not None and s.steps[step].status.value == "running" for s in states
        )

    await wait_for(lambda: at("b"), timeout=30, what="every run to be at step b")
    for n, wid in enumerate(sorted(ids)):
        key = store.keys.workflow(wid)
        fields = await redis.hgetall(key)
        assert fields[b"layout"] == b"2" and b"s:a" in fields  # stored step by step
        state = state_of(wid, fields)
        assert state is not None
        old = {k: fields[k] for k in (b"rev", b"stamp", b"status", b"workflow", b"updated_ms")}
        async with redis.pipeline(transaction=True) as pipe:  # as an earlier version wrote it
            pipe.delete(key)
            pipe.hset(key, mapping={**old, b"state": dumps(state)})
            await pipe.execute()
        if n % 2:
            mediator.runtime.cache.forget(wid)  # read cold; the others are in the cache
    held["b"].set()
    await wait_for(lambda: at("c"), timeout=30, what="every run to be at step c")
    for wid in ids:  # what the upgraded replica wrote is read back from Redis
        mediator.runtime.cache.forget(wid)
        state = await store.load(wid)
        assert state is not None and set(state.steps) == {"a", "b", "c"}
    held["c"].set()
    results = await asyncio.gather(*runs)
    assert {r.status for r in results} == {WorkflowStatus.COMPLETED}
    assert all(r.output["c"]["step"] == "c" and r.output["a"]["input"] == {"n": int(
        r.request_id.split("-")[1])} for r in results)  # fmt: skip
    for wid in ids:  # finished: one document again, every step in it
        fields = await redis.hgetall(store.keys.workflow(wid))
        assert b"layout" not in fields and not any(k.startswith(b"s:") for k in fields)
        finished = state_of(wid, fields)
        assert finished is not None and set(finished.steps) == {"a", "b", "c"}
        assert {s.status.value for s in finished.steps.values()} == {"completed"}
