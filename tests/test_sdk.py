"""The service SDK (`Worker`) and the client SDK (`MediatorClient`) against a real broker.

The module runs on a Tansu broker of its own (conftest's `broker`, `names` and `producer`),
so it does not depend on the session's servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RequestTimedOutError

from mediator import clock, codec
from mediator.core.signing import Keyring
from mediator.errors import ConfigurationError, IdempotenceUnsupported
from mediator.producers import partition_for
from mediator.sdk.client import ClientClosed, MediatorClient, ResultsTopicMissing, SubmitTimeout
from mediator.sdk.worker import ActionError, Worker
from tests.helpers import (
    FAST_GROUP,
    SERVICE,
    TEST_KEYRING,
    TEST_KEYS,
    FakeBatch,
    command,
    committed,
    read,
    records_on,
    replies,
    send,
    wait_for,
)
from topics.events import (
    CommandEvent,
    DeadLetter,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
    WorkflowStatus,
)
from topics.names import Topics


@pytest.fixture
def calls() -> list[str]:
    """The command ids the worker's ``reserve`` action ran, in order."""
    return []


@pytest.fixture
def gate() -> asyncio.Event:
    """Holds the worker's ``hold`` action until the test sets it."""
    return asyncio.Event()


@pytest.fixture
async def worker(
    broker: str, names: Topics, calls: list[str], gate: asyncio.Event
) -> AsyncIterator[Worker]:
    """A started worker for SERVICE with a few actions, stopped after the test."""
    w = Worker(
        SERVICE, broker, topics=names, instance="inv-1", enable_idempotence=False,
        consumer_options=FAST_GROUP, keys=TEST_KEYRING,
    )  # fmt: skip

    @w.action("reserve")
    async def reserve(input: dict[str, Any], command: CommandEvent) -> dict[str, Any]:
        calls.append(command.command_id)
        if input.get("slow"):
            await asyncio.sleep(0.3)
        return {"reserved": input["sku"], "step": command.step}

    @w.action("echo")
    def echo(input: Any) -> Any:
        return input

    @w.action("hold")
    async def hold(input: Any, command: CommandEvent) -> Any:
        calls.append(command.command_id)
        await gate.wait()
        return input

    @w.action("boom")
    async def boom(input: Any) -> None:
        msg = "kaput"
        raise ValueError(msg)

    @w.action("refuse")
    async def refuse(input: Any) -> None:
        msg = "out of stock"
        raise ActionError(msg, code="out_of_stock", retryable=False)

    await w.start()
    try:
        yield w
    finally:
        await w.stop()


def test_codec_round_trips() -> None:
    cmd = command(Topics(), "echo", {"a": None, "b": [1, 2.5]})
    assert CommandEvent.model_validate_json(codec.encode(cmd)) == cmd
    assert b"deadline_ms" not in codec.encode(cmd)  # None fields are left out
    assert ("trace-id", b"trace-1") in codec.headers(cmd)


async def test_ok_reply_carries_output(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    cmd = command(names, "reserve", {"sku": "A"})
    await send(producer, names, cmd, command(names, "echo", [1, "two"]))
    got = {r.command_id: r for r in await replies(broker, names, 2)}
    reply = got[cmd.command_id]
    assert reply.status is ReplyStatus.OK
    assert reply.output == {"reserved": "A", "step": "reserve"}
    assert (reply.workflow_id, reply.step, reply.attempt) == ("wf-1", "reserve", 1)
    assert (reply.service, reply.instance, reply.trace_id) == (SERVICE, "inv-1", "trace-1")
    assert reply.replied_ms is not None and reply.error is None
    assert [r.output for r in got.values() if r.command_id != cmd.command_id] == [[1, "two"]]


async def test_handler_exception_is_a_retryable_error(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    await send(producer, names, command(names, "boom"))
    [reply] = await replies(broker, names, 1)
    assert reply.status is ReplyStatus.ERROR and reply.error is not None
    assert reply.error.code == "exception" and reply.error.retryable
    assert reply.error.message == "ValueError: kaput"
    assert reply.error.step == "reserve"
    assert worker.stats["errors"] == 1


async def test_action_error_keeps_code_and_is_not_retryable(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    await send(producer, names, command(names, "refuse"))
    [reply] = await replies(broker, names, 1)
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable) == ("out_of_stock", False)
    assert reply.error.message == "out of stock"


async def test_unknown_action_names_the_known_ones(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    await send(producer, names, command(names, "teleport"))
    [reply] = await replies(broker, names, 1)
    assert reply.error is not None
    assert (reply.error.code, reply.error.retryable) == ("unknown_action", False)
    assert "teleport" in reply.error.message
    assert "boom, echo, hold, refuse, reserve" in reply.error.message


async def test_duplicate_command_runs_once_and_reply_is_resent(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer, calls: list[str]
) -> None:
    # Two copies in one batch: the second arrives while the first is still running.
    slow = command(names, "reserve", {"sku": "S", "slow": True})
    await send(producer, names, slow, slow)
    # A later redelivery (once both are answered) is answered from the reply cache.
    await replies(broker, names, 2)
    await send(producer, names, slow)
    got = await replies(broker, names, 3)
    assert calls == [slow.command_id]
    assert {r.command_id for r in got} == {slow.command_id}
    assert len({r.replied_ms for r in got}) == 1  # the very same reply, re-sent
    assert worker.stats["duplicates"] == 2 and worker.stats["executed"] == 1


async def test_invalid_message_is_skipped(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    inbox = names.service(SERVICE)
    # The model refuses such a command, so write its bytes by hand, as a buggy producer would.
    unanswerable = orjson.dumps(
        {**orjson.loads(codec.encode(command(names, "echo"))), "reply_to": "not a topic!"}
    )
    for junk in (b"not json", b'{"type": "command"}', b"[]", None, unanswerable):
        signed = TEST_KEYRING.headers(junk or b"", inbox, b"wf-1")
        await producer.send_and_wait(inbox, junk, key=b"wf-1", headers=signed)
    good = command(names, "echo", {"ok": True})
    await send(producer, names, good)
    [reply] = await replies(broker, names, 1)
    assert reply.command_id == good.command_id and reply.output == {"ok": True}
    assert worker.stats["invalid"] == 5 and worker.stats["received"] == 6
    assert worker.stats["executed"] == 1


async def test_a_command_not_signed_with_its_key_is_never_run(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    """Unsigned, signed with an unknown key, or altered after signing: dead-lettered with
    the reason and counted, never executed, never answered. A reply the worker does send
    is signed with its key."""
    inbox = names.service(SERVICE)
    unsigned, unknown, altered, good = (command(names, "echo", {"n": i}) for i in range(4))
    stranger = Keyring.parse("other=another-secret-0123456789")
    await producer.send_and_wait(inbox, codec.encode(unsigned), key=b"wf-1")
    value = codec.encode(unknown)
    await producer.send_and_wait(
        inbox, value, key=b"wf-1", headers=stranger.headers(value, inbox, b"wf-1")
    )
    value = codec.encode(altered)
    tampered = value.replace(b'"n":2', b'"n":9')
    assert tampered != value
    await producer.send_and_wait(
        inbox, tampered, key=b"wf-1", headers=TEST_KEYRING.headers(value, inbox, b"wf-1")
    )
    await send(producer, names, good)
    [reply] = await replies(broker, names, 1)
    assert reply.command_id == good.command_id
    assert worker.stats["bad_signatures"] == 3 and worker.stats["executed"] == 1
    letters = [DeadLetter.model_validate_json(v) for v in await read(broker, names.dlq, 3)]
    letters.sort(key=lambda d: d.offset or 0)
    assert [d.code for d in letters] == ["unsigned", "bad_signature", "bad_signature"]
    assert "not signed" in letters[0].reason
    assert "'other'" in letters[1].reason and "not one of ours" in letters[1].reason
    assert "does not match" in letters[2].reason
    records = await records_on(broker, names.replies)
    assert len(records) == 1
    record = records[0]
    TEST_KEYRING.check(record.value, record.headers, record.topic, record.key)  # or raises


@pytest.mark.slow
async def test_offsets_are_committed_so_a_restart_does_not_rerun(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    first = command(names, "echo", 1)
    await send(producer, names, first)
    await replies(broker, names, 1)
    await worker.stop()
    second = command(names, "echo", 2)
    await send(producer, names, second)
    fresh = Worker(
        SERVICE, broker, topics=names, instance="inv-2", enable_idempotence=False,
        consumer_options=FAST_GROUP, keys=TEST_KEYRING,
    )  # fmt: skip
    fresh.add_action("echo", lambda input: input)
    async with fresh:
        got = await replies(broker, names, 2)
    assert fresh.stats["received"] == 1  # only the command the first worker never saw
    assert [r.instance for r in got if r.command_id == second.command_id] == ["inv-2"]


async def test_stop_finishes_in_flight_commands_then_commits(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer, calls: list[str]
) -> None:
    slow = command(names, "reserve", {"sku": "S", "slow": True})
    await send(producer, names, slow)
    await wait_for(lambda: calls, what="the command to start")
    await worker.stop()  # the handler is still sleeping
    [reply] = await replies(broker, names, 1)
    assert reply.command_id == slow.command_id and reply.status is ReplyStatus.OK
    assert await committed(broker, worker.group_id, names.service(SERVICE)) == 1


async def test_a_stalled_command_holds_up_neither_later_commands_nor_their_replies(
    broker: str,
    names: Topics,
    worker: Worker,
    producer: AIOKafkaProducer,
    calls: list[str],
    gate: asyncio.Event,
) -> None:
    stalled = command(names, "hold", "stalled")
    await send(producer, names, stalled)
    await wait_for(lambda: calls, what="the stalled command to start")
    # Same key, so same partition, fetched after the stalled one started.
    later = [command(names, "echo", n) for n in range(3)]
    await send(producer, names, *later)
    got = await replies(broker, names, 3)
    assert [r.command_id for r in got] == [c.command_id for c in later]
    # Their offsets come after the stalled command's, so none may be committed yet.
    assert await committed(broker, worker.group_id, names.service(SERVICE)) == 0
    gate.set()
    got = await replies(broker, names, 4)
    assert got[3].command_id == stalled.command_id

    async def all_four() -> bool:
        return await committed(broker, worker.group_id, names.service(SERVICE)) == 4

    await wait_for(all_four, interval=0.1, what="all four offsets committed")


async def test_a_reply_the_broker_refuses_becomes_an_undeliverable_error_reply(
    broker: str, names: Topics, producer: AIOKafkaProducer
) -> None:
    w = Worker(
        SERVICE, broker, topics=names, instance="inv-big", enable_idempotence=False,
        consumer_options=FAST_GROUP, keys=TEST_KEYRING,
        producer_options={"max_request_size": 4000},
    )  # fmt: skip
    w.add_action("huge", lambda input: "x" * 10_000)
    async with w:
        big = command(names, "huge")
        await send(producer, names, big)
        [reply] = await replies(broker, names, 1)
    assert reply.command_id == big.command_id and reply.status is ReplyStatus.ERROR
    assert reply.error is not None and reply.error.code == "undeliverable"
    assert "MessageSizeTooLarge" in reply.error.message
    assert w.stats["undeliverable"] == 1 and w.stats["send_retries"] == 0


async def test_a_delivery_failing_outside_kafka_releases_its_offset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not reachable through a real broker (aiokafka fails deliveries with KafkaErrors);
    # whatever else fails one must be logged and must not hold the partition's commits.
    w = Worker(SERVICE, "127.0.0.1:1", signing=False)
    tp = TopicPartition("inbox", 0)
    w._offsets.add(tp, 7)
    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("serialiser crashed"))
    w._batch_delivered([(command(Topics(), "echo"), b"{}", tp, 7)], failed)
    assert w._offsets.committable([tp]) == {tp: 8}
    assert "serialiser crashed" in caplog.text


async def test_handling_that_raises_releases_its_offset(caplog: pytest.LogCaptureFixture) -> None:
    # Actions' failures become error replies; this is whatever else could raise in the
    # handling of a record (a bug): logged, and the partition's commits go on past it.
    w = Worker(SERVICE, "127.0.0.1:1", signing=False)
    tp = TopicPartition("inbox", 0)
    w._offsets.add(tp, 7)

    async def broken() -> None:
        msg = "handling crashed"
        raise RuntimeError(msg)

    w._spawn(broken(), tp, 7)
    await asyncio.gather(*w._tasks, return_exceptions=True)
    await asyncio.sleep(0)  # the done callback
    assert w._offsets.committable([tp]) == {tp: 8}
    assert "handling crashed" in caplog.text


def test_handler_signature_is_checked() -> None:
    w = Worker(SERVICE, "127.0.0.1:1", keys=TEST_KEYS)
    with pytest.raises(TypeError, match="must take"):
        w.add_action("nothing", lambda: None)
    w.add_action("one", lambda input: input)
    with pytest.raises(ValueError, match="already registered"):
        w.add_action("one", lambda input: input)


async def fake_mediator(broker: str, names: Topics, output: Any) -> None:
    """Answer every request on the requests topic with a completed result."""
    consumer = AIOKafkaConsumer(
        names.requests, bootstrap_servers=broker, group_id=None, auto_offset_reset="earliest"
    )
    prod = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await consumer.start()
    await prod.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for record in (r for rs in batch.values() for r in rs):
                request = RequestEvent.model_validate_json(record.value)
                for request_id in (f"other-{request.request_id}", request.request_id):
                    result = ResultEvent(
                        request_id=request_id,
                        workflow_id=f"wf-{request_id}",
                        workflow=request.workflow,
                        status=WorkflowStatus.COMPLETED,
                        output={"echo": request.payload, "extra": output},
                        finished_ms=clock.now_ms(),
                    )
                    await prod.send_and_wait(
                        names.results, codec.encode(result), key=request_id.encode()
                    )
    finally:
        await prod.stop()
        await consumer.stop()


@pytest.fixture
async def mediator_stub(broker: str, names: Topics) -> AsyncIterator[None]:
    task = asyncio.create_task(fake_mediator(broker, names, "stub"))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_submit_resolves_with_its_result(
    broker: str, names: Topics, mediator_stub: None
) -> None:
    async with MediatorClient(broker, topics=names, enable_idempotence=False) as client:
        result = await client.submit("order", {"sku": "A"}, request_id="r-1", timeout=15)
        assert (result.request_id, result.status) == ("r-1", WorkflowStatus.COMPLETED)
        assert result.output == {"echo": {"sku": "A"}, "extra": "stub"}
        many = await asyncio.gather(
            *(client.submit("order", {"n": i}, timeout=15) for i in range(200))
        )
        assert [r.output["echo"]["n"] for r in many] == list(range(200))
        assert client.pending == 0


async def test_submit_times_out_without_a_result(broker: str, names: Topics) -> None:
    async with MediatorClient(broker, topics=names, enable_idempotence=False) as client:
        with pytest.raises(SubmitTimeout, match=r"'r-lost' within 0\.5s") as info:
            await client.submit("order", {}, request_id="r-lost", timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        assert client.pending == 0
        request_id = await client.publish("order", {"x": 1})
    sent = await read(broker, names.requests, 2)
    assert {RequestEvent.model_validate_json(v).request_id for v in sent} == {"r-lost", request_id}


async def test_client_needs_the_results_topic(broker: str) -> None:
    client = MediatorClient(broker, topics=Topics(prefix="absent."), enable_idempotence=False)
    with pytest.raises(ResultsTopicMissing, match=r"absent\.results"):
        await client.start()


async def test_client_explains_a_refused_idempotent_producer(broker: str, names: Topics) -> None:
    # Tansu rejects InitProducerId; aiokafka reports it as a bare UnknownError.
    client = MediatorClient(broker, topics=names, enable_idempotence=True)
    with pytest.raises(IdempotenceUnsupported, match=r"enable_idempotence=False") as info:
        await client.start()
    message = str(info.value)
    assert "MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE=false" in message and "\n" not in message
    assert broker in message
    with pytest.raises(ClientClosed):
        await client.publish("order", {})
    async with MediatorClient(broker, topics=names, enable_idempotence=False) as client:
        assert await client.publish("order", {})


async def test_a_command_for_another_service_or_long_past_its_deadline_is_not_run(
    broker: str, names: Topics, worker: Worker, producer: AIOKafkaProducer
) -> None:
    """A command replayed later (the mediator gave up on it at its deadline), or one for
    another service put in this one's inbox, signed as it would be there: never run."""
    inbox = names.service(SERVICE)
    elsewhere = command(names, "echo", {"n": 1}, service="payments")
    value = codec.encode(elsewhere)
    await producer.send_and_wait(
        inbox, value, key=b"wf-1", headers=TEST_KEYRING.headers(value, inbox, b"wf-1")
    )
    stale = command(names, "echo", {"n": 2}, deadline_ms=clock.now_ms() - 3_600_000)
    good = command(names, "echo", {"n": 3}, deadline_ms=clock.now_ms() + 60_000)
    await send(producer, names, stale, good)
    [reply] = await replies(broker, names, 1)
    assert reply.command_id == good.command_id
    assert worker.stats["misdelivered"] == 1 and worker.stats["expired"] == 1
    assert worker.stats["executed"] == 1
    [letter] = [DeadLetter.model_validate_json(v) for v in await read(broker, names.dlq, 1)]
    assert letter.code == "misdelivered" and "'payments'" in letter.reason


async def test_a_result_on_a_partition_added_after_the_client_started_is_read(
    broker: str, names: Topics
) -> None:
    """A client that started when the results topic had fewer partitions (here: it is
    made to read only partition 0) reads a partition that appears later from its start,
    so a result published there before it looked is not skipped."""
    client = MediatorClient(broker, topics=names, enable_idempotence=False)
    async with client:
        assert client._consumer is not None
        first = TopicPartition(names.results, 0)
        client._consumer.assign([first])  # as if partitions 1-3 did not exist at start
        await client._consumer.seek_to_end(first)
        await client._consumer.position(first)
        waiting = asyncio.create_task(client.submit("order", {}, request_id="late", timeout=20))
        await asyncio.sleep(0.2)
        result = ResultEvent(request_id="late", workflow_id="wf-late", workflow="order",
                             status=WorkflowStatus.COMPLETED, result_id="res-late",
                             finished_ms=1)  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(
                names.results, result.model_dump_json().encode(), key=b"late", partition=3
            )
        finally:
            await producer.stop()
        assert (await waiting).result_id == "res-late"  # read once the client looked again
        assert len(client._consumer.assignment()) == 4


class ReplyProducer:
    """The part of aiokafka's producer a worker's replies use: batches built by the worker
    (`send_batch`, answered with `batch_failure` if set), and `send` and `send_and_wait`
    one by one (a value in `refuse` is refused for good, as too large)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, list[bytes]]] = []
        self.alone: list[bytes] = []
        self.batch_failure: BaseException | None = None
        self.refuse_batch: BaseException | None = None
        self.refuse: set[bytes] = set()
        self.client = SimpleNamespace(
            cluster=SimpleNamespace(partitions_for_topic=lambda topic: {0, 1})
        )

    def create_batch(self) -> FakeBatch:
        return FakeBatch(1 << 20)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        if self.refuse_batch is not None:
            raise self.refuse_batch
        delivery: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.batch_failure is not None:
            delivery.set_exception(self.batch_failure)
        else:
            self.batches.append((topic, partition, [value for _, value, _ in batch.records]))
            delivery.set_result(None)
        return delivery

    async def send_and_wait(self, topic: str, value: bytes, **_: Any) -> None:
        if value in self.refuse:
            raise MessageSizeTooLargeError
        self.alone.append(value)


def reply_worker(producer: ReplyProducer) -> tuple[Worker, TopicPartition]:
    w = Worker(SERVICE, "127.0.0.1:1", signing=False)
    w._producer = producer  # type: ignore[assignment]
    tp = TopicPartition("inbox", 0)
    for offset in range(10):
        w._offsets.add(tp, offset)
    return w, tp


async def replied(w: Worker, *pairs: tuple[CommandEvent, bytes]) -> None:
    """Queue one reply per pair, as commands finishing in one turn of the loop do, and wait
    until each is delivered or given up."""
    tp = TopicPartition("inbox", 0)
    for offset, (cmd, reply) in enumerate(pairs):
        await w._send(cmd, reply, tp, offset)
    await asyncio.sleep(0)  # the hand-over, scheduled for the loop's next turn
    while w._flush_due or w._submits or w._tasks:
        await asyncio.gather(*w._submits, *w._tasks, return_exceptions=True)
        await asyncio.sleep(0)


def answer(n: int, size: int = 10) -> tuple[CommandEvent, bytes]:
    cmd = command(Topics(), "echo", workflow_id=f"wf-{n}")
    return cmd, orjson.dumps({"command_id": cmd.command_id, "pad": "x" * size})


async def test_replies_of_one_turn_go_in_batches_one_per_partition() -> None:
    producer = ReplyProducer()
    w, tp = reply_worker(producer)
    pairs = [answer(n) for n in range(6)]

    await replied(w, *pairs)

    expected: dict[int, list[bytes]] = {}
    for cmd, reply in pairs:
        expected.setdefault(partition_for(cmd.workflow_id.encode(), [0, 1], []), []).append(reply)
    assert {p: values for _, p, values in producer.batches} == expected
    assert len(producer.batches) == len(expected) and producer.alone == []
    assert w._offsets.committable([tp]) == {tp: 6}


async def test_a_batch_refused_for_good_sends_each_reply_alone_only_the_culprit_is_replaced() -> (
    None
):
    producer = ReplyProducer()
    producer.batch_failure = MessageSizeTooLargeError("too big")
    w, tp = reply_worker(producer)
    ok1, big, ok2 = answer(1), answer(1, size=5000), answer(1)  # one key: one batch
    producer.refuse.add(big[1])

    await replied(w, ok1, big, ok2)

    assert producer.batches == []
    assert ok1[1] in producer.alone and ok2[1] in producer.alone and len(producer.alone) == 3
    [error] = [orjson.loads(v) for v in producer.alone if v not in (ok1[1], ok2[1])]
    assert error["command_id"] == big[0].command_id
    assert error["status"] == "error" and error["error"]["code"] == "undeliverable"
    assert w.stats["undeliverable"] == 1 and w.stats["send_retries"] == 0
    assert w._offsets.committable([tp]) == {tp: 3}


async def test_a_batch_the_producer_will_not_take_sends_each_reply_alone() -> None:
    # aiokafka waits for room in the partition and then refuses with a KafkaTimeoutError,
    # which is not retriable: the replies must not become error replies for it.
    producer = ReplyProducer()
    producer.refuse_batch = KafkaTimeoutError()
    w, tp = reply_worker(producer)
    pairs = [answer(1), answer(2), answer(1)]

    await replied(w, *pairs)

    assert sorted(producer.alone) == sorted(reply for _, reply in pairs)
    assert w.stats["undeliverable"] == 0 and not w._submits
    assert w._offsets.committable([tp]) == {tp: 3}


async def test_a_reply_that_cannot_be_signed_releases_its_offset_the_others_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = ReplyProducer()
    w, tp = reply_worker(producer)
    pairs = [answer(1), answer(2), answer(3)]
    broken = pairs[1][1]
    signed = w._reply_headers

    def headers(command: CommandEvent, reply: bytes) -> list[tuple[str, bytes]]:
        if reply == broken:
            msg = "signing failed"
            raise RuntimeError(msg)
        return signed(command, reply)

    w._reply_headers = headers  # type: ignore[method-assign]

    await replied(w, *pairs)

    assert sorted(v for _, _, vs in producer.batches for v in vs) == sorted(
        [pairs[0][1], pairs[2][1]]
    )
    assert "signing failed" in caplog.text
    assert w._offsets.committable([tp]) == {tp: 3}


async def test_a_batch_failing_for_now_retries_each_of_its_replies() -> None:
    producer = ReplyProducer()
    producer.batch_failure = RequestTimedOutError()
    w, tp = reply_worker(producer)
    pairs = [answer(1), answer(1)]

    await replied(w, *pairs)

    assert sorted(producer.alone) == sorted(reply for _, reply in pairs)
    assert w.stats["send_retries"] == 2 and w.stats["undeliverable"] == 0
    assert w._offsets.committable([tp]) == {tp: 2}


@pytest.mark.parametrize("option", ["key_serializer", "value_serializer", "partitioner"])
def test_producer_options_the_worker_decides_itself_are_refused(option: str) -> None:
    # Its reply batches are placed by the raw key, as the mediator's producers place them:
    # a serializer or a partitioner of the caller's would make `send` disagree.
    with pytest.raises(ConfigurationError, match=option):
        Worker("svc", "localhost:9092", signing=False, producer_options={option: lambda *a: b""})
