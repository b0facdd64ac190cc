"""Idempotency that means one thing, and runs that outlive a deploy, on the real broker and
Redis: a redelivered request record is not a new publish, a reused request id is a
conflict, a late duplicate is recognised after the run expired, and a run finishes on the
definition it started with even when no replica loads it any more."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.errors import DefinitionConflict
from mediator.replica import Mediator
from mediator.storage.keys import workflow_id_for
from tests.helpers import consume_all, step, wait_for
from tests.system import echo
from topics import ResultEvent, WorkflowStatus

ONE = {"name": "one", "steps": [step("a", action="work")]}


async def results_of(system: Any, count: int) -> list[ResultEvent]:
    records = await consume_all(system.bootstrap, system.topics.results, count=count, timeout=30)
    return [ResultEvent.model_validate_json(r.value) for r in records]


async def test_a_request_record_redelivered_by_kafka_gets_no_second_result(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    await system.mediator()
    client = await system.client()
    first = await client.submit("one", {"n": 1}, request_id="r-1", timeout=30)

    # A replica of another group reads the requests topic from the start: it sees the very
    # record that started the run, as a zombie replica or a rebalance would.
    other_kafka = system.settings.kafka.model_copy(update={"group_id": "another-group"})
    zombie = Mediator(system.settings.model_copy(update={"kafka": other_kafka}), system.definitions)
    async with zombie:
        await wait_for(lambda: zombie.runtime.stats.redelivered == 1, what="the redelivery")
    # A new publish of the same request is a duplicate: its result is sent again, same id.
    again = await client.submit("one", {"n": 1}, request_id="r-1", timeout=30)

    results = await results_of(system, 2)
    assert [r.result_id for r in results] == [first.result_id, first.result_id]
    assert again == first
    assert system.workers["svc"].stats["executed"] == 1
    await asyncio.sleep(0.5)
    assert len(await results_of(system, 2)) == 2  # nothing more arrived


async def test_a_request_id_reused_for_something_else_is_a_conflict(make_system: Any) -> None:
    other = {"name": "other", "steps": [step("a", action="work")]}
    system = await make_system(ONE, other)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    first = await client.submit("one", {"n": 1}, request_id="r-2", timeout=30)

    payload_changed = await client.submit("one", {"n": 2}, request_id="r-2", timeout=30)
    workflow_changed = await client.submit("other", {"n": 1}, request_id="r-2", timeout=30)

    assert first.status is WorkflowStatus.COMPLETED
    for conflict in (payload_changed, workflow_changed):
        assert conflict.status is WorkflowStatus.FAILED
        assert conflict.error is not None and conflict.error.code == "request_id_conflict"
        assert conflict.result_id != first.result_id
    state = await mediator.store.load(workflow_id_for("r-2"))
    assert state is not None and state.payload == {"n": 1}  # the first run untouched
    assert system.workers["svc"].stats["executed"] == 1


async def test_a_duplicate_after_the_run_expired_is_recognised_not_run_again(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    redis = system.settings.redis.model_copy(update={"retention_s": 0.5})
    system.settings = system.settings.model_copy(update={"redis": redis})
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    first = await client.submit("one", {"n": 1}, request_id="r-3", timeout=30)
    wid = workflow_id_for("r-3")
    await wait_for(
        lambda: _gone(mediator, wid), timeout=10, what="the finished run's state to expire"
    )

    late = await client.submit("one", {"n": 1}, request_id="r-3", timeout=30)

    assert first.status is WorkflowStatus.COMPLETED
    assert late.status is WorkflowStatus.COMPLETED  # how the run ended...
    assert late.error is not None and late.error.code == "result_expired"  # ...not its output
    assert system.workers["svc"].stats["executed"] == 1


async def _gone(mediator: Mediator, wid: str) -> bool:
    return not await mediator.redis.exists(mediator.store.keys.workflow(wid))


V1 = {
    "name": "deploy",
    "version": 1,
    "steps": [step("a", action="work"), step("b", action="work", depends_on=["a"])],
}
V2 = {"name": "deploy", "version": 2, "steps": [step("only", action="work")]}


@pytest.mark.slow
async def test_a_run_finishes_on_its_definition_after_a_deploy_removed_it(
    make_system: Any,
) -> None:
    system = await make_system(V1)
    first = await system.mediator()
    client = await system.client()
    request_id = await client.publish("deploy", {"n": 1}, request_id="r-deploy")
    wid = workflow_id_for(request_id)
    await wait_for(lambda: first.store.load(wid), what="the run to start")
    await first.stop()  # the rolling deploy: the old replica goes...

    # ...and the new one loads only version 2 of the workflow.
    second = Mediator(system.settings, Definitions(parse_workflows([V2])))
    async with second:
        await system.worker("svc", {"work": echo})
        [result] = await results_of(system, 1)

    assert (result.request_id, result.status) == ("r-deploy", WorkflowStatus.COMPLETED)
    assert set(result.steps) == {"a", "b"}  # version 1's plan, followed to the end


async def test_a_file_edited_under_an_existing_version_is_refused_at_start(
    make_system: Any,
) -> None:
    system = await make_system(V1)
    await system.mediator()
    edited = {**V1, "steps": [step("a", action="work"), step("c", action="work")]}

    replica = Mediator(system.settings, Definitions(parse_workflows([edited])))
    with pytest.raises(DefinitionConflict, match="bump `version`"):
        await replica.start()
