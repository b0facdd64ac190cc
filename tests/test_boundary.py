"""Nothing lost, nothing stuck: poison records, values the store cannot hold, oversized
messages, through the real broker and Redis. Each record ends applied or dead-lettered,
whoever waited on it hears why, and its batch-mates are not held up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from mediator.runtime.groups import inbound_group
from mediator.storage.keys import workflow_id_for
from tests.helpers import committed, consume_all, produce, step, wait_for
from tests.system import echo
from topics import DeadLetter, RequestEvent, ResultEvent, WorkflowStatus

HUGE_INT = 123456789012345678901234567890  # valid JSON, but beyond 64 bits

ONE = {"name": "one", "steps": [step("a", action="work")]}


async def dead_letters(system: Any, count: int) -> list[DeadLetter]:
    records = await consume_all(system.bootstrap, system.topics.dlq, count=count, timeout=30)
    return [DeadLetter.model_validate_json(r.value) for r in records]


async def test_a_request_the_store_cannot_hold_is_refused_and_its_batch_mates_run(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    payloads = [{"n": n} for n in range(4)] + [{"n": HUGE_INT}]

    results = await asyncio.gather(*(client.submit("one", p, timeout=30) for p in payloads))

    assert [r.status for r in results[:4]] == [WorkflowStatus.COMPLETED] * 4
    refused = results[4]
    assert refused.status is WorkflowStatus.FAILED
    assert refused.error is not None and refused.error.code == "invalid_payload"
    assert "64-bit" in refused.error.message
    [dead] = await dead_letters(system, 1)
    assert dead.code == "invalid_payload" and str(HUGE_INT) in dead.value
    assert mediator.runtime.stats.dead_letters == 1
    stats = await mediator.redis.hgetall(mediator.store.keys.stats)
    assert stats[b"dead_letters:invalid_payload"] == b"1"


async def test_a_reply_the_store_cannot_hold_fails_its_step_and_the_others_complete(
    make_system: Any,
) -> None:
    system = await make_system(ONE)

    async def work(data: Any) -> dict[str, Any]:
        return {"big": HUGE_INT} if data["n"] == 5 else {"n": data["n"]}

    await system.worker("svc", {"work": work})
    await system.mediator()
    client = await system.client()

    results = await asyncio.gather(*(client.submit("one", {"n": n}, timeout=30) for n in range(6)))

    assert [r.status for r in results[:5]] == [WorkflowStatus.COMPLETED] * 5
    failed = results[5]
    assert failed.status is WorkflowStatus.FAILED
    assert failed.error is not None and failed.error.code == "invalid_output"
    assert failed.error.step == "a"
    [dead] = await dead_letters(system, 1)
    assert dead.code == "invalid_output" and dead.source_topic == system.topics.replies


@pytest.mark.slow
async def test_one_poison_record_among_ten_is_dead_lettered_alone(make_system: Any) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    # A stored state that no longer decodes: processing this request raises, every time.
    keys = mediator.store.keys
    poison_wid = workflow_id_for("poison")
    await mediator.redis.hset(keys.workflow(poison_wid), mapping={"rev": 1, "state": "{oops"})
    requests = [
        RequestEvent(request_id=f"good-{n}", workflow="one", payload={"n": n}) for n in range(9)
    ]
    requests.insert(4, RequestEvent(request_id="poison", workflow="one"))
    waiting = [
        asyncio.create_task(client.submit("one", r.payload, request_id=r.request_id, timeout=30))
        for r in requests
    ]
    await asyncio.sleep(0.2)  # the submits are waiting: publish the ten at once

    results = {r.request_id: r for r in await asyncio.gather(*waiting)}

    poison = results.pop("poison")
    assert poison.status is WorkflowStatus.FAILED
    assert poison.error is not None and poison.error.code == "unprocessable"
    assert "does not decode" in poison.error.message
    assert {r.status for r in results.values()} == {WorkflowStatus.COMPLETED}
    assert len(results) == 9
    [dead] = await dead_letters(system, 1)
    assert dead.code == "unprocessable" and "CorruptState" in dead.reason
    await mediator.stop()
    group = inbound_group(system.settings.kafka)
    # The request records of this test are ten submits: all of them are past.
    assert await committed(system.bootstrap, group, system.topics.requests) == 10


async def test_a_huge_record_of_control_bytes_is_dead_lettered_as_a_bounded_excerpt(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    poison = bytes(range(1, 32)) * (200_000 // 31)
    # Same key as the good request after it: same partition, so it must not block it.
    await produce(system.bootstrap, system.topics.requests, [poison], keys=[b"after"])

    result = await client.submit("one", {"n": 1}, request_id="after", timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    [dead] = await dead_letters(system, 1)
    limits = system.settings.limits
    assert dead.truncated and dead.size == len(poison)
    assert len(dead.value) == limits.dead_letter_excerpt_bytes
    assert mediator.runtime.stats.dead_letters == 1


async def test_a_command_too_large_for_the_broker_fails_its_run_and_jams_nothing(
    make_system: Any,
) -> None:
    doubled = {
        "name": "doubled",
        "steps": [step("a", action="work", input={"x": "payload.blob", "y": "payload.blob"})],
    }
    system = await make_system(ONE, doubled)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    blob = "z" * 600_000  # the request fits; the command carrying it twice does not

    big = asyncio.create_task(client.submit("doubled", {"blob": blob}, timeout=30))
    others = [asyncio.create_task(client.submit("one", {"n": n}, timeout=30)) for n in range(31)]
    done = await asyncio.gather(*others)
    refused = await big

    assert {r.status for r in done} == {WorkflowStatus.COMPLETED}
    assert refused.status is WorkflowStatus.FAILED
    assert refused.error is not None and refused.error.code == "payload_too_large"
    assert refused.error.step == "a" and "max_message_bytes" in refused.error.message
    assert refused.steps["a"].status == "failed"
    await wait_for(lambda: _outbox_empty(mediator), timeout=10, what="an empty outbox")
    counters = await _counters(mediator)
    assert counters.get("svc:svc:refused") == 1
    assert counters.get("svc:svc:sent") == 31  # the refused command was never counted sent


async def test_a_request_over_the_size_limit_gets_a_payload_too_large_result(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    await system.mediator()
    request = RequestEvent(request_id="huge", workflow="one", payload={"blob": "q" * 5_000_000})
    producer = AIOKafkaProducer(
        bootstrap_servers=system.bootstrap, enable_idempotence=False, max_request_size=8_000_000
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            system.topics.requests, request.model_dump_json().encode(), key=b"huge"
        )
    finally:
        await producer.stop()

    [record] = await consume_all(system.bootstrap, system.topics.results, count=1, timeout=30)
    result = ResultEvent.model_validate_json(record.value)
    assert (result.request_id, result.status) == ("huge", WorkflowStatus.FAILED)
    assert result.error is not None and result.error.code == "payload_too_large"
    [dead] = await dead_letters(system, 1)
    assert dead.truncated and dead.size is not None and dead.size > 5_000_000


async def _outbox_empty(mediator: Any) -> bool:
    return await mediator.store.outbox_size() == 0


async def _counters(mediator: Any) -> dict[str, int]:
    keys = mediator.store.keys
    totals: dict[str, int] = {}
    for shard in range(keys.shards):
        for name, value in (await mediator.redis.hgetall(keys.counters(shard))).items():
            totals[name.decode()] = totals.get(name.decode(), 0) + int(value)
    return totals
