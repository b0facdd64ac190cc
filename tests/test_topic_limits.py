"""What the broker takes per topic, and a producer out of step with it, on the real broker:
each topic's `max.message.bytes` read at start, a topic that takes less than a batch of
ours may hold named in a warning before a batch is refused, and a producer made again."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from aiokafka.admin import NewTopic

from mediator.cli.infra import EmbeddedKafka
from mediator.kafka import new_admin
from mediator.producers import MAX_BATCH_BYTES, DeferredProducer, new_producer
from mediator.sdk.worker import Worker
from mediator.settings import Settings
from mediator.topic_limits import too_small, topic_size_limits, warn_of_small_topics
from tests.helpers import consume_all, step

ONE = {"name": "one", "steps": [step("a", action="work")]}


async def create_topic(bootstrap: str, name: str, **configs: str) -> None:
    admin = new_admin(bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def test_a_topics_own_limit_is_read_and_topics_without_one_are_left_out(
    kafka: EmbeddedKafka, topics: Any
) -> None:
    small, plain = f"{topics.prefix}small", f"{topics.prefix}plain"
    await create_topic(kafka.bootstrap_servers, small, **{"max.message.bytes": "50000"})
    await create_topic(kafka.bootstrap_servers, plain)

    found = await topic_size_limits(
        kafka.bootstrap_servers, [small, plain, f"{topics.prefix}missing"]
    )

    # Tansu describes only what a topic set itself; Kafka also gives its default (1 MiB).
    assert found == {small: 50_000}
    assert too_small({small: 50_000, plain: 1_048_588}, 1_000_000) == [(small, 50_000)]


async def test_a_broker_that_cannot_be_asked_is_logged_and_nothing_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="mediator.kafka"):
        assert await warn_of_small_topics("127.0.0.1:1", ["t"], 1_000_000) == []
    assert "not checked" in caplog.text


async def test_a_replica_warns_at_start_of_a_service_topic_smaller_than_its_batches(
    kafka: EmbeddedKafka, settings: Settings, make_system: Any, caplog: pytest.LogCaptureFixture
) -> None:
    svc = settings.kafka.topics.service("svc")
    await create_topic(kafka.bootstrap_servers, svc, **{"max.message.bytes": "50000"})
    system = await make_system(ONE)

    with caplog.at_level(logging.WARNING, logger="mediator.kafka"):
        await system.mediator()

    warned = [r.getMessage() for r in caplog.records if r.name == "mediator.kafka"]
    assert len(warned) == 1, warned
    assert f"topic {svc} takes record batches of at most 50000 bytes" in warned[0]
    assert "Set limits.max_message_bytes to 50000 or less" in warned[0]


async def test_a_worker_warns_at_start_of_a_replies_topic_smaller_than_its_batches(
    kafka: EmbeddedKafka, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topics = dataclasses.replace(settings.kafka.topics, prefix=f"{settings.kafka.topics.prefix}w.")
    await create_topic(kafka.bootstrap_servers, topics.replies, **{"max.message.bytes": "60000"})
    worker = Worker("svc", kafka.bootstrap_servers, topics=topics, enable_idempotence=False,
                    signing=False, heartbeat_interval=None)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mediator.kafka"):
        await worker.start()
    try:
        warned = [r.getMessage() for r in caplog.records if r.name == "mediator.kafka"]
        assert len(warned) == 1, warned
        assert f"topic {topics.replies} takes record batches of at most 60000" in warned[0]
        assert "Set producer_options['max_request_size'] to 60000 or less" in warned[0]
    finally:
        await worker.stop()


async def test_the_producers_batches_never_exceed_its_largest_request() -> None:
    # A batch of small records is bounded by `max_request_size` too, not only each record:
    # so `limits.max_message_bytes` under a topic's limit keeps every batch under it.
    small = new_producer("127.0.0.1:1", client_id="t", enable_idempotence=False,
                         max_request_size=100_000)  # fmt: skip
    default = new_producer("127.0.0.1:1", client_id="t", enable_idempotence=False)
    try:
        assert small._message_accumulator._batch_size == 100_000
        assert default._message_accumulator._batch_size == MAX_BATCH_BYTES
    finally:
        await small.stop()
        await default.stop()


async def test_a_producer_made_again_sends_on_and_the_old_one_is_closed(
    kafka: EmbeddedKafka, topics: Any
) -> None:
    # What the outbox does when an idempotent producer's sequence numbers are out of step
    # with the broker's: a new client in the old one's place (Tansu has no idempotent
    # producers, so here the renewal itself, on the real broker).
    producer = DeferredProducer(kafka.bootstrap_servers, client_id="t-renew",
                                enable_idempotence=False)  # fmt: skip
    await producer.start()
    try:
        first = producer.producer
        await (await producer.send(topics.results, b"before", b"k"))
        await producer.renew()
        assert producer.producer is not first
        assert first._closed
        await (await producer.send(topics.results, b"after", b"k"))
    finally:
        await producer.stop()
    records = await consume_all(kafka.bootstrap_servers, topics.results, count=2, timeout=15)
    assert [r.value for r in records] == [b"before", b"after"]
