"""Workflows end to end through the real broker and Redis: the happy paths and bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mediator.runtime.groups import inbound_group
from mediator.sdk.worker import ActionError
from tests.helpers import committed, consume_all, produce, records_on, step, wait_for
from tests.system import echo
from topics import DeadLetter, RequestEvent, ResultEvent, WorkflowStatus


async def test_sequential_chain_passes_outputs_along(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "chain",
            "steps": [
                step("a", input={"n": "payload.n"}),
                step("b", depends_on=["a"], input={"prev": "steps.a.input.n"}),
                step("c", depends_on=["b"], input={"both": "[steps.a.step, steps.b.step]"}),
            ],
            "output": {"last": "steps.c.input.both", "n": "payload.n"},
        }
    )
    order: list[str] = []

    async def record(data: Any, command: Any) -> dict[str, Any]:
        order.append(command.step)
        return await echo(data, command)

    await system.worker("svc", {"a": record, "b": record, "c": record})
    await system.mediator()
    client = await system.client()

    result = await client.submit("chain", {"n": 7}, timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    assert result.output == {"last": ["a", "b"], "n": 7}
    assert order == ["a", "b", "c"]
    assert {s: v.status for s, v in result.steps.items()} == dict.fromkeys("abc", "completed")


async def test_fan_out_runs_in_parallel_and_fan_in_waits_for_all(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "fan",
            "steps": [
                step("start"),
                *(step(b, depends_on=["start"], action="branch") for b in ("b1", "b2", "b3")),
                step("join", depends_on=["b1", "b2", "b3"], input="keys(steps)"),
            ],
        }
    )
    arrived: set[str] = set()
    all_three = asyncio.Event()

    async def branch(data: Any, command: Any) -> dict[str, Any]:
        # A barrier: no branch replies before all three were dispatched, so a mediator
        # that ran them one after another would never finish.
        arrived.add(command.step)
        if len(arrived) == 3:
            all_three.set()
        await asyncio.wait_for(all_three.wait(), timeout=10)
        return {"branch": command.step}

    joined: list[Any] = []

    async def join(data: Any) -> dict[str, Any]:
        joined.append(sorted(data))
        return {}

    await system.worker("svc", {"start": echo, "branch": branch, "join": join})
    await system.mediator()
    result = await (await system.client()).submit("fan", {}, timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    assert joined == [["b1", "b2", "b3", "start"]]
    assert result.output["b2"] == {"branch": "b2"}


async def test_false_condition_skips_step_and_dependants_still_run(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "cond",
            "steps": [
                step("check"),
                step("sms", depends_on=["check"], when="payload.phone"),
                step("email", depends_on=["check"], when="steps.check.input.vip"),
                step("done", depends_on=["sms", "email"]),
            ],
        }
    )
    worker = await system.worker("svc", {"check": echo, "sms": echo, "email": echo, "done": echo})
    await system.mediator()
    result = await (await system.client()).submit("cond", {"vip": True}, timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    statuses = {s: v.status for s, v in result.steps.items()}
    assert statuses == {
        "check": "completed",
        "sms": "skipped",
        "email": "completed",
        "done": "completed",
    }
    assert set(result.output) == {"check", "email", "done"}
    assert worker.stats["executed"] == 3


async def test_error_reply_fails_workflow_with_the_steps_error(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "pay",
            "steps": [
                step("reserve"),
                step("charge", depends_on=["reserve"]),
                step("ship", depends_on=["charge"]),
            ],
        }
    )

    async def charge(data: Any) -> dict[str, Any]:
        msg = "card declined"
        raise ActionError(msg, code="declined")

    worker = await system.worker("svc", {"reserve": echo, "charge": charge, "ship": echo})
    await system.mediator()
    result = await (await system.client()).submit("pay", {}, timeout=30)

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None
    assert (result.error.step, result.error.code, result.error.message) == (
        "charge",
        "declined",
        "card declined",
    )
    assert result.steps["ship"].status == "pending"
    assert worker.stats["executed"] == 2


async def test_duplicate_request_runs_once_and_resends_the_result(make_system: Any) -> None:
    system = await make_system({"name": "one", "steps": [step("a"), step("b", depends_on=["a"])]})
    worker = await system.worker("svc", {"a": echo, "b": echo})
    mediator = await system.mediator()
    client = await system.client()

    first = await client.submit("one", {"x": 1}, request_id="dup-1", timeout=30)
    again = await client.submit("one", {"x": 1}, request_id="dup-1", timeout=30)

    assert first.status is again.status is WorkflowStatus.COMPLETED
    assert again.workflow_id == first.workflow_id
    assert again.output == first.output
    assert worker.stats["executed"] == 2
    assert mediator.runtime.stats.duplicates == 1
    keys = mediator.store.keys
    counters = await mediator.redis.hgetall(keys.counters(keys.shard_of(first.workflow_id)))
    assert int(counters[b"wf:one:started"]) == 1


async def test_duplicate_and_stale_replies_change_nothing(make_system: Any) -> None:
    system = await make_system({"name": "manual", "steps": [step("a", service="hand")]})
    mediator = await system.mediator()
    client = await system.client()
    submitted = asyncio.create_task(client.submit("manual", {}, request_id="m-1", timeout=30))

    # Play the service by hand: read the command, then reply stale, wrong, right, duplicate.
    [record] = await consume_all(system.bootstrap, system.topics.service("hand"), count=1)
    command = orjson.loads(record.value)
    base = {
        "type": "reply",
        "workflow_id": command["workflow_id"],
        "step": "a",
        "command_id": command["command_id"],
        "attempt": 1,
        "status": "ok",
    }
    replies = [
        {**base, "attempt": 2, "output": {"v": "stale attempt"}},
        {**base, "command_id": "someone-else", "output": {"v": "wrong command"}},
        {**base, "step": "nope", "output": {"v": "unknown step"}},
        {**base, "output": {"v": "right"}},
        {**base, "output": {"v": "duplicate"}},
    ]
    key = command["workflow_id"].encode()
    await produce(
        system.bootstrap,
        system.topics.replies,
        [orjson.dumps(r) for r in replies],
        keys=[key] * len(replies),
    )
    result = await submitted

    assert result.status is WorkflowStatus.COMPLETED
    assert result.output == {"a": {"v": "right"}}
    await wait_for(lambda: mediator.runtime.stats.replies == 5, what="all five replies")
    assert mediator.runtime.stats.ignored_replies == 4
    state = await mediator.store.load(command["workflow_id"])
    assert state is not None
    assert state.steps["a"].output == {"v": "right"}
    assert state.rev == 2  # created, then one transition


async def test_bad_messages_go_to_the_dlq_and_the_next_good_one_runs(make_system: Any) -> None:
    system = await make_system({"name": "ok", "steps": [step("a")]})
    await system.worker("svc", {"a": echo})
    mediator = await system.mediator()
    client = await system.client()
    await produce(
        system.bootstrap,
        system.topics.requests,
        [b"not json at all", orjson.dumps({"type": "request", "workflow": "ok"})],
    )
    await produce(system.bootstrap, system.topics.replies, [b'{"type": "reply"}'])

    result = await client.submit("ok", {}, timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    records = await consume_all(system.bootstrap, system.topics.dlq, count=3)
    dead = [DeadLetter.model_validate_json(r.value) for r in records]
    by_value = {d.value: d for d in dead}
    assert by_value[b"not json at all".decode()].source_topic == system.topics.requests
    assert "request_id" in by_value['{"type":"request","workflow":"ok"}'].reason
    assert "command_id" in by_value['{"type": "reply"}'].reason
    assert mediator.runtime.stats.dead_letters == 3


async def test_unknown_workflow_gets_a_failed_result_naming_the_loaded_ones(
    make_system: Any,
) -> None:
    system = await make_system({"name": "known", "steps": [step("a")]})
    await system.mediator()
    result = await (await system.client()).submit("nosuch", {}, timeout=30)

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "unknown_workflow"
    assert "'nosuch'" in result.error.message and "known" in result.error.message


async def test_result_goes_to_the_requests_reply_to_topic(make_system: Any) -> None:
    system = await make_system({"name": "rt", "steps": [step("a")]})
    await system.worker("svc", {"a": echo})
    await system.mediator()
    own_topic = f"{system.topics.prefix}client.results"
    request = RequestEvent(request_id="rt-1", workflow="rt", reply_to=own_topic)
    await produce(system.bootstrap, system.topics.requests, [request.model_dump_json().encode()])

    [record] = await consume_all(system.bootstrap, own_topic, count=1, timeout=30)
    result = ResultEvent.model_validate_json(record.value)
    assert (result.request_id, result.status) == ("rt-1", WorkflowStatus.COMPLETED)
    assert record.key == b"rt-1"


async def test_a_reply_to_naming_a_topic_results_may_not_go_to_is_refused(
    make_system: Any,
) -> None:
    """A request cannot make the mediator write into another application's topic (or its
    own control topic): it is refused, and told so on the results topic."""
    system = await make_system({"name": "rt", "steps": [step("a")]})
    await system.worker("svc", {"a": echo})
    mediator = await system.mediator()
    request = RequestEvent(request_id="rt-x", workflow="rt", reply_to=system.topics.control)
    await produce(system.bootstrap, system.topics.requests, [request.model_dump_json().encode()])

    [record] = await consume_all(system.bootstrap, system.topics.results, count=1, timeout=30)
    result = ResultEvent.model_validate_json(record.value)
    assert result.request_id == "rt-x"
    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "reply_to_refused"
    assert "limits.reply_to_topics" in result.error.message
    assert mediator.runtime.stats.rejected_requests == 1
    assert not [r for r in await records_on(system.bootstrap, system.topics.control)
                if b"rt-x" in (r.value or b"")]  # fmt: skip


async def test_processed_offsets_are_committed(make_system: Any) -> None:
    system = await make_system({"name": "off", "steps": [step("a"), step("b", depends_on=["a"])]})
    await system.worker("svc", {"a": echo, "b": echo})
    mediator = await system.mediator()
    client = await system.client()
    await asyncio.gather(*(client.submit("off", {"n": n}, timeout=30) for n in range(20)))

    await mediator.stop()  # flushes what the background committer still holds
    group = inbound_group(system.settings.kafka)
    assert await committed(system.bootstrap, group, system.topics.requests) == 20
    assert await committed(system.bootstrap, group, system.topics.replies) == 40
