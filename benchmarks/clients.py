"""What the Kafka client costs per record, by way of producing and consuming.

The question the performance issue asks: does the Kafka client's own per-record work
dominate a step, and would a faster client behind the same port pay? Each way is timed by
the CPU of this process (``time.process_time``: a client's own threads included, the
broker's not) for the same records (300-byte values, three headers as a command carries),
against one embedded broker, alternated:

- ``send``: aiokafka's `AIOKafkaProducer.send` per record, 200 futures awaited together
  (how the outbox handed records over before);
- ``batch``: records appended to batches built here (`create_batch`, one per partition)
  and handed over with `send_batch` (how the SDK worker hands its replies over, and the
  outbox the transition stream's records);
- ``librdkafka``: confluent-kafka's `Producer.produce` with a delivery callback per
  record, resolved in the event loop once per `poll` (only if confluent-kafka is
  installed: ``pip install confluent-kafka``);
- consuming: aiokafka's `getmany` against confluent-kafka's `consume`, in batches of 500.

``python -m benchmarks.clients [--records N] [--repeat R]`` prints one line per
repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from mediator.cli.infra import EmbeddedKafka

__all__ = ["main"]

VALUE = b"x" * 300
HEADERS: list[tuple[str, Any]] = [
    ("type", b"command"),
    ("mediator-key", b"k1"),
    ("mediator-signature-2", b"a" * 64),
]
#: Records handed over before their acknowledgements are awaited.
WINDOW = 200


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1,
                            enable_idempotence=False, max_batch_size=512 * 1024)  # fmt: skip


async def by_send(bootstrap: str, topic: str, records: int) -> float:
    """us of CPU per record, one `send` each."""
    producer = _producer(bootstrap)
    await producer.start()
    try:
        await (await producer.send(topic, VALUE, key=b"warm"))
        started = time.process_time()
        for first in range(0, records, WINDOW):
            futures = [
                await producer.send(topic, VALUE, key=b"k%d" % n, headers=HEADERS)
                for n in range(first, first + WINDOW)
            ]
            await asyncio.gather(*futures)
        return (time.process_time() - started) / records * 1e6
    finally:
        await producer.stop()


async def by_batch(bootstrap: str, topic: str, records: int) -> float:
    """us of CPU per record, in batches built here, one per partition."""
    producer = _producer(bootstrap)
    await producer.start()
    try:
        await (await producer.send(topic, VALUE, key=b"warm"))
        partitions = list(await producer.partitions_for(topic))
        started = time.process_time()
        for first in range(0, records, WINDOW):
            batches: dict[int, Any] = {}
            for n in range(first, first + WINDOW):
                key = b"k%d" % n
                partition = partitions[zlib.crc32(key) % len(partitions)]
                batch = batches.get(partition)
                if batch is None:
                    batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=VALUE, timestamp=None, headers=HEADERS)
            futures = [
                await producer.send_batch(batch, topic, partition=partition)
                for partition, batch in batches.items()
            ]
            await asyncio.gather(*futures)
        return (time.process_time() - started) / records * 1e6
    finally:
        await producer.stop()


async def by_librdkafka(bootstrap: str, topic: str, records: int) -> float | None:
    """us of CPU per record with confluent-kafka (None if it is not installed)."""
    try:
        import confluent_kafka  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    loop = asyncio.get_running_loop()
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                         "linger.ms": 1, "enable.idempotence": False})  # fmt: skip
    reports: list[tuple[asyncio.Future[None], Any]] = []
    stopping = threading.Event()

    def resolve(batch: list[tuple[asyncio.Future[None], Any]]) -> None:
        for future, error in batch:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(RuntimeError(str(error)))

    def poll() -> None:  # delivery reports, handed to the loop once per poll
        nonlocal reports
        while not stopping.is_set():
            producer.poll(0.05)
            if reports:
                batch, reports = reports, []
                loop.call_soon_threadsafe(resolve, batch)

    def produce(key: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = loop.create_future()
        producer.produce(topic, VALUE, key=key, headers=HEADERS,
                         on_delivery=lambda error, _: reports.append((future, error)))  # fmt: skip
        return future

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        await produce(b"warm")
        started = time.process_time()
        for first in range(0, records, WINDOW):
            await asyncio.gather(*(produce(b"k%d" % n) for n in range(first, first + WINDOW)))
        return (time.process_time() - started) / records * 1e6
    finally:
        stopping.set()
        poller.join()
        producer.flush()


async def consume_aiokafka(bootstrap: str, topic: str, records: int) -> float:
    """us of CPU per record read (key, value and headers taken) with `getmany`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_wait_ms=5, max_poll_records=500)  # fmt: skip
    await consumer.start()
    try:
        read, started, first = 0, 0.0, 0
        while read < records:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            got = sum(len(part) for part in batch.values())
            if got and not started:  # the first fetch waits for the group: not counted
                started, first = time.process_time(), got
            else:
                for part in batch.values():
                    for record in part:
                        _ = (record.key, record.value, record.headers)
            read += got
        return (time.process_time() - started) / (records - first) * 1e6
    finally:
        await consumer.stop()


def consume_librdkafka(bootstrap: str, topic: str, records: int) -> float | None:
    """The same with confluent-kafka's `consume` (None if it is not installed)."""
    try:
        import confluent_kafka  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap,
                                         "group.id": f"c-{topic}", "fetch.wait.max.ms": 5,
                                         "auto.offset.reset": "earliest",
                                         "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    try:
        read, started, first = 0, 0.0, 0
        while read < records:
            batch = consumer.consume(500, 0.2)
            if batch and not started:
                started, first = time.process_time(), len(batch)
            else:
                for record in batch:
                    _ = (record.key(), record.value(), record.headers())
            read += len(batch)
        return (time.process_time() - started) / (records - first) * 1e6
    finally:
        consumer.close()


async def _fill(bootstrap: str, topic: str, records: int) -> None:
    await by_batch(bootstrap, topic, records)


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def run(records: int, repeat: int) -> None:
    async with EmbeddedKafka() as broker:
        bootstrap = broker.bootstrap_servers
        print("us CPU per record: produce send / batch / librdkafka; consume aiokafka / librdkafka")
        for n in range(repeat):
            ways: list[Callable[[str, str, int], Awaitable[float | None]]] = [
                by_send, by_batch, by_librdkafka,
            ]  # fmt: skip
            produced = [await way(bootstrap, f"p{n}.{i}", records) for i, way in enumerate(ways)]
            await _fill(bootstrap, f"c{n}.a", records)
            await _fill(bootstrap, f"c{n}.b", records)
            read = await consume_aiokafka(bootstrap, f"c{n}.a", records)
            rd = await asyncio.to_thread(consume_librdkafka, bootstrap, f"c{n}.b", records)
            print(" ".join(_show(v) for v in [*produced, read, rd]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clients", description=__doc__)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.records, args.repeat))


if __name__ == "__main__":
    main()
