"""The replica's state cache is a hint: stale entries never lose or double a step."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mediator.core.engine import Engine
from mediator.core.state import StepStatus, evolve
from mediator.storage.cache import StateCache
from tests.engine_harness import make, step
from tests.helpers import consume_all, produce, wait_for
from topics import RequestEvent, WorkflowStatus

TWO_STEPS = {
    "name": "two",
    "steps": [
        {"id": "a", "service": "hand", "action": "a"},
        {"id": "b", "service": "hand", "action": "b", "depends_on": ["a"]},
    ],
}


def ok_reply(command: dict[str, Any], output: Any) -> bytes:
    return orjson.dumps(
        {
            "type": "reply",
            "workflow_id": command["workflow_id"],
            "step": command["step"],
            "command_id": command["command_id"],
            "attempt": command["attempt"],
            "status": "ok",
            "output": output,
        }
    )


async def reply(system: Any, command: dict[str, Any], output: Any) -> None:
    key = command["workflow_id"].encode()
    await produce(system.bootstrap, system.topics.replies, [ok_reply(command, output)], [key])


async def test_a_stale_cached_state_does_not_drop_a_reply(make_system: Any) -> None:
    system = await make_system(TWO_STEPS)
    mediator = await system.mediator()
    client = await system.client()
    submitted = asyncio.create_task(client.submit("two", {}, request_id="c-1", timeout=30))
    [first] = await consume_all(system.bootstrap, system.topics.service("hand"), count=1)
    command_a = orjson.loads(first.value)
    wid = command_a["workflow_id"]
    before = mediator.runtime.cache.get(wid)
    assert before is not None and before.steps["a"].status is StepStatus.RUNNING

    await reply(system, command_a, {"a": 1})
    records = await consume_all(system.bootstrap, system.topics.service("hand"), count=2)
    command_b = orjson.loads(records[1].value)
    # As if another replica had advanced the workflow since this one last saw it.
    mediator.runtime.cache.put(before)
    await reply(system, command_b, {"b": 2})

    result = await submitted
    assert result.status is WorkflowStatus.COMPLETED
    assert result.output == {"a": {"a": 1}, "b": {"b": 2}}


async def test_a_stale_cached_state_cannot_redispatch_a_step(make_system: Any) -> None:
    system = await make_system(TWO_STEPS)
    mediator = await system.mediator()
    client = await system.client()
    submitted = asyncio.create_task(client.submit("two", {}, request_id="c-2", timeout=30))
    [first] = await consume_all(system.bootstrap, system.topics.service("hand"), count=1)
    command_a = orjson.loads(first.value)
    wid = command_a["workflow_id"]
    stale = mediator.runtime.cache.get(wid)
    assert stale is not None
    await reply(system, command_a, {"a": 1})
    await consume_all(system.bootstrap, system.topics.service("hand"), count=2)

    # A duplicate of a's reply meets the stale state, which would dispatch b again;
    # the revision check in Redis refuses it and the fresh state ignores the duplicate.
    mediator.runtime.cache.put(stale)
    conflicts = mediator.runtime.stats.conflicts
    await reply(system, command_a, {"a": "again"})
    await wait_for(lambda: mediator.runtime.stats.conflicts > conflicts, what="a conflict")
    await asyncio.sleep(0.5)
    commands = await consume_all(system.bootstrap, system.topics.service("hand"), count=2)
    assert [orjson.loads(r.value)["step"] for r in commands] == ["a", "b"]
    state = await mediator.store.load(wid)
    assert state is not None and state.steps["a"].output == {"a": 1}
    submitted.cancel()


def test_cache_is_bounded_and_forgets_finished_workflows() -> None:
    workflow = make(step("a"))
    states = [
        Engine("r")
        .start(workflow, RequestEvent(request_id=f"r{n}", workflow="wf"), f"wf-{n}", 1)
        .state
        for n in range(3)
    ]
    cache = StateCache(size=2)
    for state in states:
        cache.put(state)
    assert len(cache) == 2
    assert cache.get("wf-0") is None
    assert cache.get("wf-2") is states[2]
    cache.put(evolve(states[2], status=WorkflowStatus.COMPLETED))
    assert cache.get("wf-2") is None
    assert len(cache) == 1
