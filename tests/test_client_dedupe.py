"""The client SDK against the real broker: results arrive at least once, callers see each once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from mediator import codec
from mediator.cli.infra import EmbeddedKafka
from mediator.sdk.client import MediatorClient
from tests.helpers import wait_for
from topics.events import RequestEvent, ResultEvent, WorkflowStatus
from topics.names import Topics


def result(request_id: str, result_id: str | None, finished_ms: int = 1) -> ResultEvent:
    return ResultEvent(
        result_id=result_id,
        request_id=request_id,
        workflow_id=f"wf-{request_id}",
        workflow="order",
        status=WorkflowStatus.COMPLETED,
        output={"for": request_id},
        finished_ms=finished_ms,
    )


async def publish(
    bootstrap: str, topic: str, *results: ResultEvent, partition: int | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for event in results:
            await producer.send_and_wait(
                topic,
                codec.encode(event),
                key=event.request_id.encode(),
                headers=codec.headers(event),
                partition=partition,
            )
    finally:
        await producer.stop()


def client(
    kafka: EmbeddedKafka, topics: Topics, seen: list[ResultEvent], dedup_size: int = 100_000
) -> MediatorClient:
    """A client that appends every distinct result it reads to `seen`."""
    return MediatorClient(
        kafka.bootstrap_servers,
        topics=topics,
        enable_idempotence=False,
        fetch_max_wait_ms=5,
        on_result=seen.append,
        dedup_size=dedup_size,
    )


def identity(event: ResultEvent) -> tuple[str, str | None, int]:
    return event.request_id, event.result_id, event.finished_ms


async def test_each_distinct_result_is_observed_once(kafka: EmbeddedKafka, topics: Topics) -> None:
    seen: list[ResultEvent] = []
    first = result("r-a", "res-a")
    other = result("r-a", "res-a2", finished_ms=2)  # a later result of the same request
    legacy = result("r-b", None, finished_ms=7)  # from a mediator without result_id
    legacy_later = result("r-b", None, finished_ms=8)
    async with client(kafka, topics, seen) as c:
        await publish(
            kafka.bootstrap_servers,
            topics.results,
            first,
            first,
            legacy,
            other,
            legacy,
            legacy_later,
            first,
        )

        await wait_for(lambda: len(seen) == 4 and c.duplicates_dropped == 3, what="results")
        await asyncio.sleep(0.3)

        assert sorted(map(identity, seen)) == sorted(
            map(identity, [first, other, legacy, legacy_later])
        )
        assert c.duplicates_dropped == 3


async def test_the_memory_of_seen_results_is_bounded(kafka: EmbeddedKafka, topics: Topics) -> None:
    seen: list[ResultEvent] = []
    a, b, c = (result(f"r-{n}", f"res-{n}") for n in "abc")
    async with client(kafka, topics, seen, dedup_size=2) as observer:
        # One partition, so they are read in this order: `a` is forgotten before it repeats.
        await publish(kafka.bootstrap_servers, topics.results, a, b, c, a, a, partition=0)

        await wait_for(lambda: len(seen) == 4 and observer.duplicates_dropped == 1)

        assert [e.result_id for e in seen] == ["res-a", "res-b", "res-c", "res-a"]


async def answer_twice(bootstrap: str, topics: Topics) -> None:
    """A mediator stand-in whose outbox sends every result twice (same result_id)."""
    consumer = AIOKafkaConsumer(
        topics.requests,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,
    )
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for record in (r for rs in batch.values() for r in rs):
                request = RequestEvent.model_validate_json(record.value)
                answer = result(request.request_id, f"res-{request.request_id}")
                await publish(bootstrap, topics.results, answer, answer)
    finally:
        await consumer.stop()


@pytest.fixture
async def mediator_stub(kafka: EmbeddedKafka, topics: Topics) -> AsyncIterator[None]:
    task = asyncio.create_task(answer_twice(kafka.bootstrap_servers, topics))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_submit_gets_its_result_again_after_seeing_it(
    kafka: EmbeddedKafka, topics: Topics, mediator_stub: None
) -> None:
    seen: list[ResultEvent] = []
    async with client(kafka, topics, seen) as c:
        first = await c.submit("order", {}, request_id="r-1", timeout=15)
        # Asking again for a finished run publishes the same result (same result_id) again:
        # it is a repeat to observers, but the new submit waits for exactly that.
        again = await c.submit("order", {}, request_id="r-1", timeout=15)
        many = await c.submit_many([("order", {"n": n}) for n in range(20)], timeout=15)

        await wait_for(lambda: c.duplicates_dropped == 23, what="the second copies")
        assert first == again and first.result_id == "res-r-1"
        assert len({r.request_id for r in many}) == 20
        assert sorted(e.request_id for e in seen) == sorted(["r-1", *(r.request_id for r in many)])
        assert c.pending == 0


async def test_a_reader_whose_position_is_out_of_range_reads_what_the_log_still_holds(
    kafka: EmbeddedKafka, topics: Topics
) -> None:
    # A broker answers OffsetOutOfRange when the reader's position left the log (records
    # deleted by retention while it lagged, or a log truncated behind it); the reader
    # then resets by its policy. From the log's start it reads what is still there; from
    # the end it would skip those results, and their submits would wait for ever.
    seen: list[ResultEvent] = []
    a, b = result("r-a", "res-a"), result("r-b", "res-b")
    async with client(kafka, topics, seen) as c:
        consumer = c._consumer
        assert consumer is not None
        tp = TopicPartition(topics.results, 0)
        consumer.seek(tp, 5)  # past where a and b go: out of the log
        await publish(kafka.bootstrap_servers, topics.results, a, b, partition=0)
        await asyncio.sleep(0.3)
        assert seen == []
        # What aiokafka's fetcher does with an OffsetOutOfRange answer (this broker
        # answers a fetch past the end with no records instead).
        fetcher = consumer._fetcher
        consumer._subscription.subscription.assignment.state_value(tp).await_reset(
            fetcher._default_reset_strategy
        )

        await wait_for(lambda: len(seen) == 2, what="the results still in the log")
        assert [e.result_id for e in seen] == ["res-a", "res-b"]
