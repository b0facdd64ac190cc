"""Shared test helpers: polling with a deadline and small Kafka produce/consume shortcuts."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from mediator.core.signing import Keyring

__all__ = [
    "TEST_KEYRING",
    "TEST_KEYS",
    "TEST_OPERATORS",
    "consume_all",
    "produce",
    "records_on",
    "signing_spec",
    "wait_for",
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
