"""Shared test helpers: polling with a deadline, Kafka produce/consume shortcuts, consumer
group offsets, workflow definitions, the command line, dead letters, SDK commands and the
fakes that stand in for a broker in runtime tests.

Test modules import from here (or from `tests.engine_harness`, `tests.system`,
`tests.processes`), never from one another: `tests/test_layering.py` checks it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from mediator import clock, codec
from mediator.core.signing import Keyring
from mediator.ops.dlq import Letter, read_dead_letters
from mediator.runtime.messages import Message
from mediator.settings import Settings
from topics.events import CommandEvent, ReplyEvent
from topics.names import Topics

__all__ = [
    "FAST_GROUP",
    "SERVICE",
    "TEST_KEYRING",
    "TEST_KEYS",
    "TEST_OPERATORS",
    "TOPICS",
    "Record",
    "RecordingDispatcher",
    "cli",
    "cli_env",
    "command",
    "commit_to_end",
    "committed",
    "consume_all",
    "letters_of",
    "produce",
    "read",
    "read_to_end",
    "records_on",
    "replies",
    "send",
    "signing_spec",
    "step",
    "wait_for",
    "wait_for_letters",
]

#: The shared signing key of test deployments (`signing.keys`), as ``id=secret``.
TEST_KEYS = "test-1=test-secret-0123456789abcdef"
#: The operator the tests send controls as (every action allowed).
TEST_OPERATORS = {"ops": {"keys": "ops-1=operator-secret-0123456789"}}
TEST_KEYRING = Keyring.parse(TEST_KEYS)


def signing_spec(ring: Keyring | None) -> str:
    """`ring` as ``id=secret,...`` with its current key first (a worker's ``keys=``, or
    ``MEDIATOR_SIGNING__KEYS``); empty for no ring."""
    if ring is None:
        return ""
    keys = [ring.current, *(k for k in ring.keys if k is not ring.current)]
    return ",".join(f"{k.id}={k.secret.decode()}" for k in keys)


async def wait_for(
    predicate: Callable[[], object | Awaitable[object]],
    # A deadline for the assertion, not a cancellation scope: ASYNC109 does not apply.
    timeout: float = 10.0,  # noqa: ASYNC109
    interval: float = 0.05,
    *,
    what: str | None = None,
) -> object:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` (or the predicate) and its last value on timeout.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        result = predicate()
        last = await result if inspect.isawaitable(result) else result
        if last:
            return last
        if loop.time() >= deadline:
            desc = what or getattr(predicate, "__qualname__", repr(predicate))
            msg = f"timed out after {timeout}s waiting for {desc}; last value: {last!r}"
            raise AssertionError(msg)
        await asyncio.sleep(interval)


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    count: int,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the earliest offset, without a group, until ``count`` records arrived.

    Raises AssertionError with what was read so far if fewer arrive within ``timeout``.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    records: list[ConsumerRecord[bytes, bytes]] = []
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(records) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                values = [r.value for r in records]
                msg = f"read {len(records)} of {count} records from {topic!r}: {values!r}"
                raise AssertionError(msg)
            batches = await consumer.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    keys: Sequence[bytes | None] | None = None,
    *,
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """Publish ``values`` (with ``keys``, if given) to ``topic`` and wait for every ack;
    signed with the test key, as a service would sign a reply or heartbeat, unless
    `headers` are given (then each is published with exactly those)."""
    if keys is not None and len(keys) != len(values):
        msg = f"got {len(keys)} keys for {len(values)} values"
        raise ValueError(msg)
    # Tansu rejects InitProducerId, so the idempotent producer must stay off.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(
                topic,
                value,
                key=keys[i] if keys else None,
                headers=list(headers)
                if headers is not None
                else TEST_KEYRING.headers(value, topic, keys[i] if keys else None),
            )
    finally:
        await producer.stop()


async def records_on(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on ``topic`` (none if it does not exist), read up to each partition's
    high watermark: Tansu lists end offsets short of the end when the last batch holds
    several records, as re-published ones do."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            return records
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        async with asyncio.timeout(10):
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                records += [r for batch in batches.values() for r in batch]
                marks = [consumer.highwater(tp) for tp in tps]
                positions = [await consumer.position(tp) for tp in tps]
                if None not in marks and all(p >= m for p, m in zip(positions, marks, strict=True)):
                    return records
    finally:
        await consumer.stop()


async def read_to_end(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` up to its current end, without a consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    records: list[ConsumerRecord[bytes, bytes]] = []
    # Every step has a deadline: a broker that stops answering fails the test, not hangs it.
    async with asyncio.timeout(60):
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer.topics()  # a metadata refresh
                partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            assert tps, f"topic {topic!r} has no partitions"
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
        finally:
            await consumer.stop()
    return records


# -- consumer group offsets -----------------------------------------------------------------


async def committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum of `group`'s committed offsets over `topic`'s partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in partitions]
    finally:
        await consumer.stop()
    return sum(o or 0 for o in offsets)


async def commit_to_end(bootstrap: str, group: str, topic: str) -> int:
    """Commit, for `group`, the end of every partition of `topic` (as a replica that
    handled every record would have); the sum of those offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit(ends)
    finally:
        await consumer.stop()
    return sum(ends.values())


# -- workflow definitions -------------------------------------------------------------------


def step(sid: str, service: str = "svc", action: str | None = None, **extra: Any) -> dict[str, Any]:
    """A step `sid` of a workflow definition, running `action` (by default `sid`) on
    `service`; `extra` are its other fields (``depends_on=[...]``, ``input=...``).

    The engine tests' `tests.engine_harness.step` differs: positional dependencies and
    ``do_<id>`` actions.
    """
    return {"id": sid, "service": service, "action": action or sid, **extra}


# -- the command line -----------------------------------------------------------------------


def cli_env(settings: Settings, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, plus `settings` as ``MEDIATOR_*`` (then `env`)."""
    return {
        **os.environ,
        "MEDIATOR_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE": "false",
        "MEDIATOR_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "MEDIATOR_KAFKA__SERVICE_TOPIC_PREFIX": settings.kafka.service_topic_prefix,
        "MEDIATOR_KAFKA__FETCH_MAX_WAIT_MS": "5",
        "MEDIATOR_REDIS__URL": settings.redis.url,
        "MEDIATOR_REDIS__MODE": settings.redis.mode,
        "MEDIATOR_REDIS__SENTINELS": json.dumps(settings.redis.sentinels),
        "MEDIATOR_REDIS__SENTINEL_MASTER": settings.redis.sentinel_master,
        "MEDIATOR_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "MEDIATOR_REDIS__SHARDS": str(settings.redis.shards),
        "MEDIATOR_SIGNING__KEYS": signing_spec(settings.signing.keyring()),
        # The operator the CLI's controls are signed as.
        "MEDIATOR_SIGNING__OPERATORS": json.dumps(settings.signing.revealed()["operators"]),
        **(env or {}),
    }


async def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m mediator ARGS` with `settings` (then `env`) in its environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mediator",
        *args,
        env=cli_env(settings, env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- dead letters ---------------------------------------------------------------------------


async def letters_of(settings: Settings, **filters: Any) -> list[Letter]:
    """The dead letters on the DLQ of `settings` that match `filters`."""
    kafka = settings.kafka
    return await read_dead_letters(
        kafka.bootstrap_servers,
        kafka.topics,
        limit=None,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        timeout_s=10,
        **filters,
    )


async def wait_for_letters(
    settings: Settings,
    count: int,
    *,
    timeout: float = 10,  # noqa: ASYNC109
    **filters: Any,
) -> list[Letter]:
    """At least `count` dead letters matching `filters`, once they are there."""

    async def enough() -> list[Letter] | None:
        found = await letters_of(settings, **filters)
        return found if len(found) >= count else None

    found = await wait_for(enough, timeout=timeout, interval=0.2, what=f"{count} dead letters")
    assert isinstance(found, list)
    return found


# -- commands to a service worker (the SDK tests' `broker` and `names` fixtures) ------------

#: The service the SDK tests' workers serve; `names` creates its topic.
SERVICE = "inventory"
# Tansu's first group generation is 0, and aiokafka sends no LeaveGroup at generation 0, so
# a restarted worker waits for its predecessor's session to expire: keep it short here.
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def command(names: Topics, action: str, input: Any = None, **fields: Any) -> CommandEvent:
    """A command for SERVICE replying to the test's replies topic."""
    values: dict[str, Any] = {
        "command_id": uuid.uuid4().hex,
        "workflow_id": "wf-1",
        "request_id": "req-1",
        "workflow": "order",
        "step": "reserve",
        "service": SERVICE,
        "action": action,
        "attempt": 1,
        "input": input,
        "reply_to": names.replies,
        "trace_id": "trace-1",
        "sent_ms": clock.now_ms(),
    }
    return CommandEvent(**(values | fields))


async def send(producer: AIOKafkaProducer, names: Topics, *commands: CommandEvent) -> None:
    """Publish `commands` to SERVICE's topic, signed with the test key."""
    for cmd in commands:
        value, topic, key = codec.encode(cmd), names.service(SERVICE), cmd.workflow_id.encode()
        await producer.send_and_wait(
            topic,
            value,
            key=key,
            headers=codec.headers(cmd) + TEST_KEYRING.headers(value, topic, key),
        )


async def read(broker: str, topic: str, count: int, within: float = 15.0) -> list[bytes]:
    """The first ``count`` values of ``topic`` (fails if fewer arrive in time)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(within):
            while len(values) < count:
                batch = await consumer.getmany(timeout_ms=200)
                values.extend(r.value for rs in batch.values() for r in rs)
    finally:
        await consumer.stop()
    return values


async def replies(broker: str, names: Topics, count: int) -> list[ReplyEvent]:
    """The first `count` replies on the test's replies topic."""
    return [ReplyEvent.model_validate_json(v) for v in await read(broker, names.replies, count)]


# -- a runtime without a broker -------------------------------------------------------------

#: Topic names of runtimes fed `Record`s by hand.
TOPICS = Topics(prefix="c.", service_prefix="c.svc.")


@dataclass
class Record:
    """A consumed Kafka record, as the runtime's batch handlers read one."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = field(default_factory=list)


class RecordingDispatcher:
    """Keeps what would be published; `send` yields, as a real producer hand-off does."""

    def __init__(self) -> None:
        self.direct: list[Message] = []
        self.sent: list[Message] = []

    async def send(self, messages: Sequence[Message], since: float | None = None) -> None:
        await asyncio.sleep(0)
        self.sent += messages

    async def send_now(self, messages: Sequence[Message]) -> None:
        await asyncio.sleep(0)
        self.direct += messages


class FakeBatch:
    """A record batch its sender fills (aiokafka's `BatchBuilder`), of at most `limit`
    bytes of values; like aiokafka's, it takes its first record whatever its size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []

    def append(
        self,
        *,
        timestamp: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> object | None:
        assert value is not None
        if self.records and sum(len(v) for _, v, _ in self.records) + len(value) > self.limit:
            return None  # full; like aiokafka's, it takes its first record whatever its size
        self.records.append((key, value, list(headers)))
        return object()

    def close(self) -> None:
        """Closed to records `send` would add (no such thing here)."""
