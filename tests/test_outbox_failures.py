"""The outbox sorts failures per message: fast tests with a fake producer and store.

The real broker here (Tansu) accepts anything and creates any topic, so refusals such as
an unknown topic on a broker that does not auto-create topics are driven by fakes; the
size refusal is also covered end to end in test_boundary.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson
import pytest
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownTopicOrPartitionError,
)

import mediator.producers as producers
from mediator.errors import StateUnavailable
from mediator.producers import DeferredProducer, partition_for
from mediator.runtime.messages import EVENTS, Message
from mediator.runtime.outbox import Dispatcher
from mediator.settings import BackoffSettings
from mediator.storage.keys import Keys
from tests.helpers import FakeBatch
from topics import DeadLetter, ReplyEvent
from topics.names import Topics

TOPICS = Topics(prefix="t.", service_prefix="t.svc.")


class FakeCluster:
    def __init__(self) -> None:
        self._last_successful_refresh_ms = time.time() * 1000


class FakeClient:
    def __init__(self) -> None:
        self.cluster = FakeCluster()


class FakeProducer:
    """Acknowledges everything but what a rule refuses, now or when the future settles."""

    def __init__(self) -> None:
        self.client = FakeClient()
        self.published: list[tuple[str, bytes]] = []
        self.refuse_now: dict[bytes, BaseException] = {}
        self.fail_later: dict[bytes, BaseException] = {}
        self.missing_topics: set[str] = set()
        #: Records `send` takes in one turn of the loop go in one batch, which the broker
        #: takes or refuses whole (`fail_later` of any of them), as aiokafka's do.
        self.shared_fate = False
        self._open: list[tuple[str, bytes, asyncio.Future[object]]] = []

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        assert value is not None
        if topic in self.missing_topics:
            raise UnknownTopicOrPartitionError
        if value in self.refuse_now:
            raise self.refuse_now[value]
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.shared_fate:
            self._open.append((topic, value, future))
            if len(self._open) == 1:
                asyncio.get_running_loop().call_soon(self._deliver_open)
        elif value in self.fail_later:
            future.set_exception(self.fail_later[value])
        else:
            self.published.append((topic, value))
            future.set_result(None)
        return future

    def _deliver_open(self) -> None:
        batch, self._open = self._open, []
        values = [value for _, value, _ in batch]
        failure = next((self.fail_later[v] for v in values if v in self.fail_later), None)
        for topic, value, future in batch:
            if failure is not None:
                future.set_exception(failure)
            else:
                self.published.append((topic, value))
                future.set_result(None)


class FakeStore:
    def __init__(self, shards: int = 2) -> None:
        self.keys = Keys("t", shards)
        self.lease_ms = 1000
        self.done: list[tuple[int, str]] = []
        self.clears = 0
        self.renewed: list[tuple[int, list[tuple[str, int]], int | None]] = []
        self.lost: set[str] = set()
        self.claimable: dict[int, list[tuple[str, bytes]]] = {}
        self.broken_shards: set[int] = set()

    async def outbox_done(self, entries: Sequence[tuple[int, str]]) -> None:
        self.done += entries
        self.clears += 1

    async def claim_expired(self, shard: int, limit: int) -> tuple[int, list[tuple[str, bytes]]]:
        if shard in self.broken_shards:
            msg = "shard unreachable"
            raise StateUnavailable(msg)
        return 99, self.claimable.pop(shard, [])

    async def renew(
        self, shard: int, held: Sequence[tuple[str, int]], *, delay_ms: int | None = None
    ) -> tuple[int, list[bool]]:
        self.renewed.append((shard, list(held), delay_ms))
        return 1234, [mid not in self.lost for mid, _ in held]


def command(n: int, size: int = 10) -> Message:
    value = orjson.dumps(
        {
            "command_id": f"wf-{n}.a.1",
            "workflow_id": f"wf-{n}",
            "step": "a",
            "attempt": 1,
            "service": "svc",
            "pad": "x" * size,
        }
    )
    return Message(0, f"wf-{n}.a.1", TOPICS.service("svc"), f"wf-{n}".encode(), value, [],
                   "command", 7)  # fmt: skip


def dispatcher(store: FakeStore, producer: FakeProducer, clear_ms: int = 0) -> Dispatcher:
    return Dispatcher(
        store,
        producer,
        topics=TOPICS,
        backoff=BackoffSettings(initial_ms=250, max_ms=1000),
        excerpt_bytes=256,
        clear_ms=clear_ms,
    )


def published_by_topic(producer: FakeProducer) -> dict[str, list[bytes]]:
    by_topic: dict[str, list[bytes]] = {}
    for topic, value in producer.published:
        by_topic.setdefault(topic, []).append(value)
    return by_topic


async def settle(d: Dispatcher) -> None:
    while d._pending:  # a publish settling schedules its clearing
        await asyncio.wait(set(d._pending))


async def test_acknowledged_entries_of_several_batches_are_cleared_in_one_call() -> None:
    store, producer = FakeStore(), FakeProducer()
    d = dispatcher(store, producer, clear_ms=50)
    await d.send([command(1), command(2)])
    await asyncio.sleep(0.01)
    await d.send([command(3)])
    await settle(d)
    assert sorted(store.done) == [(0, "wf-1.a.1"), (0, "wf-2.a.1"), (0, "wf-3.a.1")]
    assert store.clears == 1
    # Later acknowledgements start a new clearing; stop waits for it.
    await d.send([command(4)])
    await asyncio.sleep(0)
    await d.stop()
    assert (0, "wf-4.a.1") in store.done
    assert store.clears == 2


async def test_a_refused_command_is_dead_lettered_and_fails_its_step_the_rest_go() -> None:
    store, producer = FakeStore(), FakeProducer()
    ok1, big, ok2 = command(1), command(2, size=5000), command(3)
    producer.refuse_now[big.value] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([ok1, big, ok2])
    await settle(d)

    by_topic = published_by_topic(producer)
    assert by_topic[TOPICS.service("svc")] == [ok1.value, ok2.value]
    [dead] = [DeadLetter.model_validate_json(v) for v in by_topic[TOPICS.dlq]]
    assert dead.code == "too_large"
    assert dead.truncated and dead.size == len(big.value) and len(dead.value) <= 256
    [reply] = [ReplyEvent.model_validate_json(v) for v in by_topic[TOPICS.replies]]
    assert (reply.command_id, reply.status, reply.error and reply.error.code) == (
        "wf-2.a.1",
        "error",
        "too_large",
    )
    assert reply.error is not None and not reply.error.retryable
    assert sorted(store.done) == [(0, "wf-1.a.1"), (0, "wf-2.a.1"), (0, "wf-3.a.1")]
    assert d.stats.dead == 1


async def test_a_transient_failure_reschedules_that_entry_alone_with_backoff() -> None:
    store, producer = FakeStore(), FakeProducer()
    ok, slow = command(1), command(2)
    producer.fail_later[slow.value] = KafkaTimeoutError()
    d = dispatcher(store, producer)

    await d.send([ok, slow])
    await settle(d)
    await d.send([slow])  # the retry fails again: the pause doubles
    await settle(d)

    assert store.done == [(0, "wf-1.a.1")]
    assert [(held, delay) for _, held, delay in store.renewed] == [
        ([("wf-2.a.1", 7)], 250),
        ([("wf-2.a.1", 7)], 500),
    ]
    assert d.stats.retried == 2 and d.stats.dead == 0


async def test_a_result_for_a_topic_the_broker_does_not_have_is_dead_lettered() -> None:
    store, producer = FakeStore(), FakeProducer()
    producer.missing_topics.add("nowhere")
    result = Message(-1, "rejected.r1", "nowhere", b"r1", b'{"x":1}', [], "result")
    d = dispatcher(store, producer)

    await d.send_now([result])

    [(topic, value)] = producer.published
    assert topic == TOPICS.dlq
    dead = DeadLetter.model_validate_json(value)
    assert dead.code == "unknown_topic" and dead.source_topic == "nowhere"


async def test_an_unknown_topic_while_the_broker_is_silent_is_transient() -> None:
    store, producer = FakeStore(), FakeProducer()
    producer.missing_topics.add("nowhere")
    producer.client.cluster._last_successful_refresh_ms = 0  # never heard from it
    d = dispatcher(store, producer)

    with pytest.raises(UnknownTopicOrPartitionError):
        await d.send_now([Message(-1, "r", "nowhere", None, b"{}", [], "result")])
    assert producer.published == []


async def test_a_replica_that_stalled_past_its_lease_publishes_only_what_it_still_holds() -> None:
    store, producer = FakeStore(), FakeProducer()
    store.lost.add("wf-1.a.1")  # another replica claimed it meanwhile
    d = dispatcher(store, producer)
    stalled_since = time.monotonic() - 10  # far more than half the 1 s lease ago

    await d.send([command(1), command(2)], stalled_since)
    await settle(d)

    assert [v for _, v in producer.published] == [command(2).value]
    assert d.stats.fenced == 1


async def test_a_failing_shard_does_not_stop_the_sweep_of_the_others() -> None:
    store, producer = FakeStore(shards=3), FakeProducer()
    store.broken_shards.add(0)
    store.claimable[1] = [("wf-5.a.1", command(5).frame)]
    store.claimable[2] = [("wf-6.a.1", command(6).frame)]
    d = dispatcher(store, producer)

    assert await d.sweep_once() == 2
    await settle(d)

    assert sorted(v for _, v in producer.published) == sorted([command(5).value, command(6).value])
    assert d.stats.sweep_failures == 1


def events(n: int, count: int = 3) -> Message:
    """A commit's transition events: one outbox entry of `count` records."""
    values = [orjson.dumps({"event_id": f"wf-{n}:2:{i}", "rev": 2}) for i in range(count)]
    return Message(0, f"wf-{n}:2:events", TOPICS.events, f"wf-{n}".encode(), b"\n".join(values),
                   [("type", b"transition")], EVENTS)  # fmt: skip


async def test_a_commits_events_are_one_entry_published_as_one_record_each() -> None:
    store, producer = FakeStore(), FakeProducer()
    entry = events(1)
    d = dispatcher(store, producer)

    await d.send([command(1), entry])
    await settle(d)

    assert [v for t, v in producer.published if t == TOPICS.events] == entry.records
    assert [orjson.loads(v)["event_id"] for v in entry.records] == [f"wf-1:2:{i}" for i in range(3)]
    assert sorted(store.done) == [(0, "wf-1.a.1"), (0, "wf-1:2:events")]
    assert d.published == 4


async def test_an_events_entry_with_one_record_failing_is_retried_whole() -> None:
    store, producer = FakeStore(), FakeProducer()
    entry = events(1)
    producer.fail_later[entry.records[1]] = KafkaTimeoutError()
    d = dispatcher(store, producer)

    await d.send([entry])
    await settle(d)
    assert store.done == [] and store.renewed == [(0, [("wf-1:2:events", 0)], 250)]
    del producer.fail_later[entry.records[1]]
    await d.send([entry])  # the retry: the records that got through go again (same ids)
    await settle(d)

    sent = [orjson.loads(v)["event_id"] for _, v in producer.published]
    assert sent == ["wf-1:2:0", "wf-1:2:2", "wf-1:2:0", "wf-1:2:1", "wf-1:2:2"]
    assert store.done == [(0, "wf-1:2:events")]
    assert d.stats.retried == 1 and d.stats.dead == 0


async def test_an_events_record_refused_for_good_is_dead_lettered_alone_the_others_go() -> None:
    # One event too large (a step's error message near the size limit) must not take the
    # commit's other events, its `run_finished` among them, off the stream.
    store, producer = FakeStore(), FakeProducer()
    entry, later = events(1), events(2)
    producer.refuse_now[entry.records[1]] = MessageSizeTooLargeError("too big")
    producer.refuse_now[later.records[0]] = MessageSizeTooLargeError("too big")  # both ways
    producer.fail_later[later.records[2]] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([entry, later])
    await settle(d)

    sent = [orjson.loads(v)["event_id"] for t, v in producer.published if t == TOPICS.events]
    assert sent == ["wf-1:2:0", "wf-1:2:2", "wf-2:2:1"]
    dead = [DeadLetter.model_validate_json(v) for t, v in producer.published if t == TOPICS.dlq]
    assert [(x.source_topic, x.code, orjson.loads(x.value)["event_id"]) for x in dead] == [
        (TOPICS.events, "too_large", "wf-1:2:1"),
        (TOPICS.events, "too_large", "wf-2:2:0"),
        (TOPICS.events, "too_large", "wf-2:2:2"),
    ]
    assert sorted(store.done) == [(0, "wf-1:2:events"), (0, "wf-2:2:events")]
    assert d.stats.dead == 3 and d.stats.retried == 0
    assert d.published == 6  # the three events that went, and the three dead letters


def test_an_events_entry_round_trips_through_its_outbox_frame() -> None:
    from mediator.runtime.messages import unframe

    entry = events(7)
    back = unframe(0, entry.id, entry.frame)
    assert (back.kind, back.records, back.headers) == (EVENTS, entry.records, entry.headers)
    assert back.size == entry.size == len(b"wf-7") + max(map(len, entry.records)) + 14


def test_a_message_round_trips_through_its_outbox_frame() -> None:
    from mediator.runtime.messages import unframe

    message = command(4)
    back = unframe(0, message.id, message.frame)
    assert (back.topic, back.key, back.value, back.kind) == (
        message.topic,
        message.key,
        message.value,
        "command",
    )


def test_backoff_doubles_and_is_capped() -> None:
    backoff = BackoffSettings(initial_ms=100, max_ms=1000)
    assert [backoff.delay_ms(n) for n in (1, 2, 3, 4, 5, 50)] == [100, 200, 400, 800, 1000, 1000]


async def test_leases_of_slow_publishes_are_renewed_by_elapsed_time_not_wall_clock() -> None:
    store, producer = FakeStore(), FakeProducer()
    d = dispatcher(store, producer)
    pending: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def never_acked(*args: object, **kwargs: object) -> asyncio.Future[object]:
        return pending

    producer.send = never_acked  # type: ignore[method-assign]
    slow, lost = command(1), command(2)
    store.lost.add(lost.id)
    await d.send([slow, lost])
    await d.renew_inflight()  # just sent: nothing to renew yet
    assert store.renewed == []

    for slot, (message, _) in list(d._inflight.items()):
        d._inflight[slot] = (message, time.monotonic() - 1)  # a second ago: past 1/3 lease
    await d.renew_inflight()

    assert [held for _, held, delay in store.renewed if delay is None] == [
        [(slow.id, 7), (lost.id, 7)]
    ]
    assert set(d._inflight) == {(0, slow.id)}  # the lost one is no longer renewed
    assert d.stats.lost_in_flight == 1 and d.stats.fenced == 0
    pending.cancel()


class BatchingProducer(FakeProducer):
    """Also takes batches its caller built, as aiokafka's producer does: records go in
    whole batches, and a batch with a record in `fail_later` fails whole (the broker
    answers for the batch). `refuse_batch` makes `send_batch` raise for a topic; while
    `hold` is set, `send_batch` waits for it to be released."""

    def __init__(self, partitions: int = 4, batch_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.partitions = partitions
        self.batch_bytes = batch_bytes
        self.batches: list[tuple[str, int, list[bytes]]] = []
        self.refuse_batch: dict[str, BaseException] = {}
        self.hold: asyncio.Event | None = None

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.missing_topics:
            raise UnknownTopicOrPartitionError
        return set(range(self.partitions))

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_bytes)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        if self.hold is not None:
            await self.hold.wait()
        if topic in self.refuse_batch:
            raise self.refuse_batch[topic]
        assert 0 <= partition < self.partitions, "Unrecognized partition"
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        values = [value for _, value, _ in batch.records]
        failure = next((self.fail_later[v] for v in values if v in self.fail_later), None)
        if failure is not None:
            future.set_exception(failure)
        else:
            self.batches.append((topic, partition, values))
            self.published += [(topic, value) for value in values]
            future.set_result(None)
        return future


def partition_of(entry: Message) -> int:
    assert entry.key is not None
    return partition_for(entry.key, [0, 1, 2, 3], [])


def event_ids(values: Sequence[bytes]) -> list[str]:
    return [orjson.loads(v)["event_id"] for v in values]


async def test_events_go_in_batches_one_per_partition_in_order_commands_by_send() -> None:
    store, producer = FakeStore(), BatchingProducer()
    entries = [events(n) for n in range(1, 9)]
    d = dispatcher(store, producer)

    await d.send([command(1), *entries])
    await settle(d)

    expected: dict[int, list[bytes]] = {}
    for entry in entries:
        expected.setdefault(partition_of(entry), []).extend(entry.records)
    assert len(expected) > 1  # the keys spread over partitions
    assert {p: v for t, p, v in producer.batches if t == TOPICS.events} == expected
    assert len(producer.batches) == len(expected)  # the command went by `send`
    assert (TOPICS.service("svc"), command(1).value) in producer.published
    assert len(store.done) == 9 and d.published == 1 + 3 * 8
    assert not d._queues and not d._submitters


async def test_events_queued_while_a_partitions_batch_waits_go_together_in_the_next() -> None:
    store, producer = FakeStore(), BatchingProducer(partitions=1)
    producer.hold = asyncio.Event()
    first, second, third = events(1), events(2), events(3)
    d = dispatcher(store, producer)

    await d.send([first])
    await asyncio.sleep(0)  # its batch is with the producer, which has no room yet
    await d.send([second])
    await d.send([third])
    assert store.done == [] and producer.batches == []
    producer.hold.set()
    await settle(d)

    assert [event_ids(v) for _, _, v in producer.batches] == [
        event_ids(first.records),
        event_ids(second.records + third.records),
    ]
    assert sorted(store.done) == sorted((0, e.id) for e in (first, second, third))


async def test_an_events_batch_refused_for_good_sends_each_entry_again_record_by_record() -> None:
    # The broker refuses a batch for one record in it: only that record is dead-lettered;
    # the other entries' records, and the culprit's siblings, are published.
    store, producer = FakeStore(), BatchingProducer(partitions=1)
    entry, other = events(1), events(2)
    producer.fail_later[entry.records[1]] = MessageSizeTooLargeError("too big")
    producer.refuse_now[entry.records[1]] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([entry, other])
    await settle(d)

    # The one batch was refused; each record went again in a batch of its own.
    assert [len(values) for _, _, values in producer.batches] == [1] * 5
    sent = event_ids([v for t, v in producer.published if t == TOPICS.events])
    assert sent == ["wf-1:2:0", "wf-1:2:2", "wf-2:2:0", "wf-2:2:1", "wf-2:2:2"]
    [dead] = [DeadLetter.model_validate_json(v) for t, v in producer.published if t == TOPICS.dlq]
    assert dead.code == "too_large" and orjson.loads(dead.value)["event_id"] == "wf-1:2:1"
    assert sorted(store.done) == [(0, "wf-1:2:events"), (0, "wf-2:2:events")]
    assert d.stats.dead == 1 and d.stats.retried == 0


async def test_an_events_batch_failing_for_now_reschedules_each_of_its_entries() -> None:
    store, producer = FakeStore(), BatchingProducer(partitions=1)
    entry, other = events(1), events(2)
    producer.fail_later[other.records[0]] = KafkaTimeoutError()
    d = dispatcher(store, producer)

    await d.send([entry, other])
    await settle(d)

    assert store.done == [] and producer.batches == []
    assert sorted((held, delay) for _, held, delay in store.renewed) == [
        ([("wf-1:2:events", 0)], 250),
        ([("wf-2:2:events", 0)], 250),
    ]
    assert d.stats.retried == 2 and d.stats.dead == 0


async def test_an_events_batch_the_producer_will_not_take_reschedules_its_entries() -> None:
    # aiokafka raises KafkaTimeoutError when no room was made for a batch in time.
    store, producer = FakeStore(), BatchingProducer()
    producer.refuse_batch[TOPICS.events] = KafkaTimeoutError()
    d = dispatcher(store, producer)

    await d.send([command(1), events(2), events(3)])
    await settle(d)

    assert store.done == [(0, "wf-1.a.1")]
    assert sorted(held[0][0] for _, held, _ in store.renewed) == ["wf-2:2:events", "wf-3:2:events"]
    assert d.stats.retried == 2 and not d._submitters


async def test_an_events_record_near_the_producers_size_limit_goes_by_send() -> None:
    # A batch built here is not checked against max_request_size; `send` checks it.
    store, producer = FakeStore(), BatchingProducer()
    big = events(1)
    big.value = b"\n".join([orjson.dumps({"event_id": "wf-1:2:0", "pad": "x" * 2000}),
                            orjson.dumps({"event_id": "wf-1:2:1"})])  # fmt: skip
    small = events(2)
    d = Dispatcher(store, producer, topics=TOPICS, max_request_size=2048)

    await d.send([big, small])
    await settle(d)

    assert [event_ids(v) for _, _, v in producer.batches] == [event_ids(small.records)]
    assert event_ids([v for t, v in producer.published if t == TOPICS.events]) == [
        "wf-1:2:0",
        "wf-1:2:1",
        *event_ids(small.records),
    ]
    assert sorted(store.done) == [(0, "wf-1:2:events"), (0, "wf-2:2:events")]


async def test_stopping_leaves_the_events_the_producer_has_not_taken_in_the_outbox() -> None:
    store, producer = FakeStore(), BatchingProducer()
    producer.hold = asyncio.Event()
    d = dispatcher(store, producer)
    await d.send([events(1), events(2)])

    await asyncio.wait_for(d.stop(wait_s=0.2), 5)  # the producer never took them

    assert store.done == [] and producer.published == [] and not d._submitters
    await settle(d)
    assert not d._inflight and d.stats.dead == 0 and d.stats.retried == 0


async def refused_after_half_a_lease(
    store: FakeStore,
) -> tuple[Dispatcher, BatchingProducer, Message]:
    """An events entry in a batch the producer holds past half a lease (so sending it
    again first checks Redis still leases it), and then refuses for good."""
    producer = BatchingProducer(partitions=1)
    store.lease_ms = 100
    producer.hold = asyncio.Event()
    entry = events(1)
    producer.fail_later[entry.records[0]] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)
    await d.send([entry])
    await asyncio.sleep(0.08)
    return d, producer, entry


async def release(d: Dispatcher, producer: BatchingProducer) -> None:
    assert producer.hold is not None
    producer.hold.set()
    await settle(d)


async def test_entries_of_a_refused_batch_redis_cannot_check_are_left_to_the_sweeper() -> None:
    # The batch waited past half a lease; sending its entries again first asks Redis
    # whether this replica still holds them, and Redis does not answer: they must not
    # stay "in flight" for ever (renewed, never sent), and nothing may escape the task.
    class Unreachable(FakeStore):
        down = False

        async def renew(
            self, shard: int, held: Sequence[tuple[str, int]], *, delay_ms: int | None = None
        ) -> tuple[int, list[bool]]:
            if self.down:
                msg = "redis unreachable"
                raise StateUnavailable(msg)
            return await super().renew(shard, held, delay_ms=delay_ms)

    store = Unreachable()
    d, producer, _ = await refused_after_half_a_lease(store)
    store.down = True
    await release(d, producer)  # raises if the settling task failed

    assert not d._inflight
    assert store.done == [] and producer.published == [] and d.stats.dead == 0


async def test_stopping_before_a_partitions_batches_were_handed_over_lets_their_entries_go() -> (
    None
):
    store, producer = FakeStore(), BatchingProducer()
    producer.hold = asyncio.Event()  # the producer takes none of them
    d = dispatcher(store, producer)

    await d.send([events(1), events(2)])  # their partitions' submitters have not run yet
    await d.stop(wait_s=0)
    await asyncio.wait_for(settle(d), 5)

    assert not d._submitters and not d._queues and not d._inflight
    assert store.done == [] and producer.published == []


async def test_an_events_topic_the_producer_cannot_place_is_sorted_record_by_record() -> None:
    store, producer = FakeStore(), BatchingProducer()
    producer.missing_topics.add(TOPICS.events)  # `partitions_for` and `send` refuse it
    entry = events(1)
    d = dispatcher(store, producer)

    await d.send([entry])
    await settle(d)

    dead = [DeadLetter.model_validate_json(v) for t, v in producer.published if t == TOPICS.dlq]
    assert [orjson.loads(x.value)["event_id"] for x in dead] == event_ids(entry.records)
    assert {x.code for x in dead} == {"unknown_topic"} and producer.batches == []
    assert store.done == [(0, entry.id)]


async def test_an_entry_taken_over_before_it_is_sent_again_is_counted_once_and_let_go() -> None:
    store = FakeStore()
    d, producer, entry = await refused_after_half_a_lease(store)
    store.lost.add(entry.id)  # another replica took it over meanwhile
    await release(d, producer)
    await d.renew_inflight()

    assert not d._inflight and producer.published == [] and store.done == []
    assert d.stats.fenced == 1 and d.stats.lost_in_flight == 0


async def test_entries_sent_again_go_record_by_record_so_a_batch_refusal_is_the_culprits() -> None:
    # The broker refuses batches whole: sent again together, the records of a refused
    # batch would share a batch again, and all be dead-lettered with the one at fault.
    store, producer = FakeStore(), BatchingProducer(partitions=1)
    producer.shared_fate = True
    entry, other = events(1), events(2)
    producer.fail_later[entry.records[1]] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([entry, other])
    await settle(d)

    sent = event_ids([v for t, v in producer.published if t == TOPICS.events])
    assert sent == ["wf-1:2:0", "wf-1:2:2", "wf-2:2:0", "wf-2:2:1", "wf-2:2:2"]
    [dead] = [DeadLetter.model_validate_json(v) for t, v in producer.published if t == TOPICS.dlq]
    assert orjson.loads(dead.value)["event_id"] == "wf-1:2:1"
    assert sorted(store.done) == [(0, "wf-1:2:events"), (0, "wf-2:2:events")]
    assert d.stats.dead == 1


@pytest.mark.parametrize("publish", ["send", "send_now"])
@pytest.mark.parametrize("batches", [False, True], ids=["send only", "takes batches"])
async def test_commands_whose_batch_was_refused_go_again_alone_so_only_the_culprit_fails(
    publish: str, batches: bool
) -> None:
    # aiokafka puts the records `send` takes in one turn of the loop in one batch, and a
    # broker refuses a batch whole (a record over its message.max.bytes): the others in
    # it must not become error replies with the one at fault. So for outbox entries
    # (`send`) and for what is published directly (`send_now`: answers to refused
    # requests, dead letters, error replies), each sent again in a batch of its own where
    # the producer takes batches, a record without a key too.
    store = FakeStore()
    producer = BatchingProducer(partitions=1) if batches else FakeProducer()
    producer.shared_fate = True
    ok1, big, ok2 = command(1), command(2, size=5000), command(3)
    ok2.key = None
    producer.fail_later[big.value] = MessageSizeTooLargeError("too big for the broker")
    d = dispatcher(store, producer)

    if publish == "send":
        await d.send([ok1, big, ok2])
        await settle(d)
        assert sorted(store.done) == [(0, "wf-1.a.1"), (0, "wf-2.a.1"), (0, "wf-3.a.1")]
    else:
        await d.send_now([ok1, big, ok2])

    by_topic = published_by_topic(producer)
    assert sorted(by_topic[TOPICS.service("svc")]) == sorted([ok1.value, ok2.value])
    [dead] = [DeadLetter.model_validate_json(v) for v in by_topic[TOPICS.dlq]]
    assert (dead.code, dead.source_topic) == ("too_large", TOPICS.service("svc"))
    [reply] = [ReplyEvent.model_validate_json(v) for v in by_topic[TOPICS.replies]]
    assert (reply.command_id, reply.status) == ("wf-2.a.1", "error")
    assert (d.stats.dead, d.published) == (1, 4)
    if isinstance(producer, BatchingProducer):
        sent_again = [values for topic, _, values in producer.batches if topic != TOPICS.dlq]
        assert sorted(sent_again) == sorted([[ok1.value], [ok2.value]])


async def test_nothing_is_dead_lettered_by_a_direct_publish_that_fails_for_now() -> None:
    # The caller publishes the lot again after a transient failure: a message refused for
    # good in the same call must not be dead-lettered now and again then.
    store, producer = FakeStore(), FakeProducer()
    producer.shared_fate = True
    big, ok = command(1, size=5000), command(2)
    producer.fail_later[big.value] = MessageSizeTooLargeError("too big for the broker")
    d = dispatcher(store, producer)
    produce = d._produce

    async def busy_when_alone(message: Message, *, alone: bool = False) -> Any:
        if alone and message is ok:
            msg = "the producer's buffer is full"
            raise KafkaTimeoutError(msg)
        return await produce(message, alone=alone)

    d._produce = busy_when_alone  # type: ignore[method-assign]

    with pytest.raises(KafkaTimeoutError):
        await d.send_now([big, ok])

    assert TOPICS.dlq not in published_by_topic(producer)
    assert d.stats.dead == 0


async def test_an_entry_let_go_in_flight_is_not_sent_again_when_its_batch_is_refused() -> None:
    # Leases renewed while the batch waited found the entry taken over (counted lost in
    # flight, let go); the batch is then refused: another replica has it, so not this one.
    store = FakeStore()
    d, producer, entry = await refused_after_half_a_lease(store)
    store.lost.add(entry.id)
    await d.renew_inflight()
    await release(d, producer)

    assert producer.published == [] and store.done == [] and not d._inflight
    assert d.stats.lost_in_flight == 1 and d.stats.fenced == 0 and d.stats.dead == 0


class HoldsSingles(BatchingProducer):
    """Holds batches of one record (those of entries sent again) until `singles` is set."""

    def __init__(self) -> None:
        super().__init__(partitions=1)
        self.singles = asyncio.Event()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        if len(batch.records) == 1:
            await self.singles.wait()
        return await super().send_batch(batch, topic, partition=partition)


async def test_entries_waiting_their_turn_to_go_again_keep_their_leases_or_are_let_go() -> None:
    store, producer = FakeStore(), HoldsSingles()
    store.lease_ms = 100
    first, second = events(1), events(2)
    producer.fail_later[first.records[1]] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([first, second])  # one batch, refused: each record goes again alone
    await asyncio.sleep(0.05)  # the first record sent again is held; a third of a lease on
    assert {(0, first.id), (0, second.id)} <= set(d._inflight)  # renewed while they wait
    store.lost.add(second.id)  # another replica took the second over meanwhile
    await d.renew_inflight()
    producer.singles.set()
    await settle(d)

    sent = event_ids([v for t, v in producer.published if t == TOPICS.events])
    assert sent == ["wf-1:2:0", "wf-1:2:2"]  # none of the second's: it is the other's now
    assert store.done == [(0, first.id)] and not d._inflight
    assert d.stats.lost_in_flight == 1 and d.stats.dead == 1


async def test_entries_sent_again_side_by_side_each_go_in_a_batch_of_their_own() -> None:
    # Two refused batches' entries sent again at the same time: by `send`, the producer
    # would put one's good command in a batch with the other's bad one.
    store, producer = FakeStore(), BatchingProducer(partitions=8)
    producer.shared_fate = True
    good1, bad1, good2, bad2 = command(1), command(2, 600), command(3), command(4, 600)
    producer.fail_later[bad1.value] = MessageSizeTooLargeError("too big")
    producer.fail_later[bad2.value] = MessageSizeTooLargeError("too big")
    d = dispatcher(store, producer)

    await d.send([bad1, good1])
    await d.send([good2, bad2])  # in step, each one's bad beside the other's good
    await settle(d)

    by_topic = published_by_topic(producer)
    assert sorted(by_topic[TOPICS.service("svc")]) == sorted([good1.value, good2.value])
    replies = [ReplyEvent.model_validate_json(v) for v in by_topic[TOPICS.replies]]
    assert sorted(r.command_id for r in replies) == ["wf-2.a.1", "wf-4.a.1"]
    assert d.stats.dead == 2


class OutOfStep(FakeProducer):
    """As an idempotent aiokafka producer after the broker refused a batch: it does not
    take back that batch's sequence numbers, so every later send fails as out of order,
    until it is made again (`renew`)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_of_step = False
        self.renewed = 0

    async def send(self, topic: str, value: bytes | None = None, *args: Any,
                   **kwargs: Any) -> asyncio.Future[object]:  # fmt: skip
        if self.out_of_step:
            future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            future.set_exception(OutOfOrderSequenceNumber())
            return future
        assert value is not None
        if value in self.fail_later:
            self.out_of_step = True
        return await super().send(topic, value, *args, **kwargs)

    async def renew(self) -> None:
        self.renewed += 1
        self.out_of_step = False


async def test_a_producer_out_of_step_with_the_broker_is_made_again() -> None:
    store, producer = FakeStore(), OutOfStep()
    big, ok = command(1, size=5000), command(2)
    producer.fail_later[big.value] = MessageSizeTooLargeError("too big for the broker")
    d = dispatcher(store, producer)

    await d.send([big])
    await settle(d)
    # Sent again alone, it failed as out of order: retried later (transient), and the
    # producer is made again meanwhile, once.
    if d._renewing is not None:
        await d._renewing
    assert (producer.renewed, d.stats.producer_renewed) == (1, 1)
    assert d.stats.dead == 0 and d.stats.retried == 1

    await d.send([ok])
    await settle(d)
    assert producer.published == [(ok.topic, ok.value)]
    assert (0, ok.id) in store.done
    await d.stop()


# -- making the producer again: once per producer (not again for the late failures of the
# one it replaced), never once stopped, and no Kafka client left open whichever way a stop
# and a renewal cross. `Client` is a fake with aiokafka's stop (closed first, then a flush
# that waits for the broker): idempotent producers, and so the failures that call for a
# renewal, cannot be had from the embedded broker (tests/test_topic_limits.py renews a real
# producer).


class SlowStore(FakeStore):
    """Redis with a round trip: `_failed` awaits `store.renew` once per entry."""

    async def renew(self, shard: int, held: Sequence[tuple[str, int]], *,
                    delay_ms: int | None = None) -> tuple[int, list[bool]]:  # fmt: skip
        await asyncio.sleep(0.02)
        return await super().renew(shard, held, delay_ms=delay_ms)


class SlowRenew(OutOfStep):
    async def renew(self) -> None:
        await asyncio.sleep(0.005)  # a new client started, the old one stopped
        await super().renew()


async def test_late_failures_of_the_old_producer_do_not_renew_the_new_one() -> None:
    store, producer = SlowStore(), SlowRenew()
    producer.out_of_step = True
    d = dispatcher(store, producer)
    # Three entries the old producer failed as out of order, sorted one after another
    # (a Redis round trip each), while the renewal is already done.
    await d.send([command(1), command(2), command(3)])
    while d._pending or d._renewing:
        await asyncio.wait({*d._pending, *([d._renewing] if d._renewing else [])})
    assert d.stats.retried == 3
    assert (producer.renewed, d.stats.producer_renewed) == (1, 1)
    await d.stop()


async def test_no_renewal_starts_once_the_outbox_stopped() -> None:
    # A publish still settling when `stop`'s wait ran out sorts its failures later, while
    # (or after) the replica stops the producer: nothing would stop what it started.
    d = dispatcher(FakeStore(), OutOfStep())
    await d.stop()
    await d._failed(command(1), OutOfOrderSequenceNumber())
    assert d._renewing is None


class Client:
    """A client with aiokafka's stop: `_closed` first, then the flush (waiting for the
    broker), then its connections; a second stop returns at once."""

    made: ClassVar[list[Client]] = []
    start_s = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._closed: bool | None = None
        self.connections_closed = False
        Client.made.append(self)

    async def start(self) -> None:
        await asyncio.sleep(Client.start_s)
        self._closed = False

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.sleep(0.3)  # flushing what the broker has not acknowledged yet
        self.connections_closed = True


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[Client]:
    Client.made = []
    Client.start_s = 0.0
    monkeypatch.setattr(producers, "new_producer", lambda *a, **k: Client())
    return Client.made


async def test_a_renewal_cancelled_by_stop_leaves_no_client_open(clients: list[Client]) -> None:
    deferred = DeferredProducer("k:9092", client_id="x", enable_idempotence=True)
    await deferred.start()
    d = dispatcher(FakeStore(), deferred)  # type: ignore[arg-type]
    d._out_of_step(OutOfOrderSequenceNumber())
    await asyncio.sleep(0.05)  # swapped in; the old one is flushing
    await d.stop()  # the replica stops its outbox first (cancelling the renewal) ...
    await deferred.stop()  # ... then the producer
    assert [c.connections_closed for c in clients] == [True, True]


async def test_a_renewal_outliving_stop_leaves_no_client_open(clients: list[Client]) -> None:
    # The outbox's stop cut short (the replica bounds it) before it cancelled a renewal
    # whose new client was still starting when the producer was stopped.
    deferred = DeferredProducer("k:9092", client_id="x", enable_idempotence=True)
    await deferred.start()
    Client.start_s = 0.1  # bootstrap and InitProducerId
    renewal = asyncio.create_task(deferred.renew())
    await asyncio.sleep(0.01)
    await deferred.stop()
    await renewal
    assert [c.connections_closed for c in clients] == [True, True]
