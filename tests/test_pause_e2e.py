"""Pausing runs under load, against the real broker and Redis, through the command line as
an operator would: no command leaves a paused run, replies to those in flight are applied,
and every run finishes after resume with each step done once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson

from mediator.storage.keys import workflow_id_for
from tests.helpers import cli, wait_for
from tests.system import CHAIN3
from topics.events import WorkflowStatus

RUNS = 40


async def _audit(mediator: Any, wid: str) -> list[dict[str, Any]]:
    raw = await mediator.redis.xrange(mediator.store.keys.audit(wid))
    return [orjson.loads(fields[b"e"]) for _, fields in raw]


async def test_paused_runs_send_nothing_until_resumed_then_all_finish(make_system: Any) -> None:
    system = await make_system(CHAIN3)
    done: Counter[tuple[str, str]] = Counter()

    async def work(data: Any, command: Any) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        done[(command.workflow_id, command.step)] += 1
        return {"step": command.step}

    await system.worker("svc", {"work": work}, concurrency=4)
    mediator = await system.mediator()
    client = await system.client()
    results = [
        asyncio.create_task(client.submit("chain3", {"n": n}, request_id=f"p-{n}", timeout=90))
        for n in range(RUNS)
    ]
    await wait_for(lambda: len(done) >= 10, timeout=30, what="the first steps to be done")

    code, out, err = await cli(system.settings, "pause", "--workflow", "chain3")
    assert code == 0, err
    paused = [line.split()[1].rstrip(":") for line in out.splitlines() if ": applied" in line]
    skipped = [line for line in out.splitlines() if ": skipped" in line]
    assert all("which is completed" in line for line in skipped), out  # ended meanwhile
    assert out.splitlines()[-1].startswith(f"pause: {len(paused)} of "), out
    assert len(paused) >= RUNS // 2, out

    # The commands already in flight are answered and applied; then nothing moves.
    async def settled() -> bool:
        for wid in paused:
            state = await mediator.store.load(wid)
            assert state is not None
            if any(s.status.value == "running" for s in state.steps.values()):
                return False
        return True

    await wait_for(settled, timeout=30, what="the commands in flight to be answered")
    before = sum(done.values())
    await asyncio.sleep(2.0)
    assert sum(done.values()) == before  # no command left while paused
    code, out, err = await cli(system.settings, "workflows", "list", "--paused", "--json")
    assert code == 0, err
    listed = {row["workflow_id"] for row in orjson.loads(out)}
    live = {wid for wid in paused if (await mediator.store.load(wid)).status.value == "running"}  # type: ignore[union-attr]
    assert live <= listed

    code, out, err = await cli(system.settings, "resume", "--workflow", "chain3")
    assert code == 0, err
    outcomes = await asyncio.gather(*results)
    assert all(r.status is WorkflowStatus.COMPLETED for r in outcomes)
    for n in range(RUNS):
        wid = workflow_id_for(f"p-{n}")
        assert [done[(wid, step)] for step in "abc"] == [1, 1, 1], wid
    # Each paused run's audit log: nothing was sent between its pause and its resume.
    for wid in paused:
        audit = await _audit(mediator, wid)
        events = [e["event"] for e in audit]
        start, end = events.index("control:pause"), events.index("control:resume")
        assert start < end, events
        # (The pause's own entry may carry sends made before it, in the same batch.)
        assert not any(e.get("sent") for e in audit[start + 1 : end]), audit
