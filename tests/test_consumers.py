"""The replica's consumer loop against the real broker: a batch that fails transiently is
read again from its first record, offsets are committed only for batches done, and a
halt lets the batch in hand finish."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

from mediator.errors import StateUnavailable
from mediator.runtime.boundary import Boundary
from mediator.runtime.consumers import BatchConsumer, Offsets, Subscription
from mediator.runtime.groups import group_name
from mediator.settings import BackoffSettings, Settings
from tests.helpers import committed, produce, wait_for


async def _reject(*_: Any) -> None:
    msg = "nothing here is permanent"
    raise AssertionError(msg)


def _consumer(settings: Settings, name: str, process: Any) -> BatchConsumer:
    topic = settings.kafka.topics.control
    subscription = Subscription(name, (topic,), process)
    boundary = Boundary(name, _reject, BackoffSettings(initial_ms=1, max_ms=5))
    return BatchConsumer(settings.kafka, subscription, boundary, Offsets())


async def test_a_transient_failure_rewinds_to_the_batch_and_commits_only_what_is_done(
    settings: Settings,
) -> None:
    topic = settings.kafka.topics.control
    seen: list[bytes] = []
    failures = 2

    async def process(records: Sequence[Any]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            msg = "Redis unavailable while committing"
            raise StateUnavailable(msg)
        seen.extend(r.value for r in records)

    consumer = _consumer(settings, "rewind", process)
    await consumer.start()
    try:
        values = [f"r{n}".encode() for n in range(20)]
        await produce(settings.kafka.bootstrap_servers, topic, values)
        await wait_for(lambda: len(seen) >= 20, timeout=30, what="every record")
        assert sorted(seen) == sorted(values)  # each once: the failed batch was read again
        assert consumer.boundary.rewinds == 2
        await consumer.halt()
        await consumer.offsets.flush()
        group = group_name(settings.kafka, "rewind")
        assert await committed(settings.kafka.bootstrap_servers, group, topic) == 20
    finally:
        await consumer.close()


async def test_a_halt_lets_the_batch_in_hand_finish_and_its_offsets_commit(
    settings: Settings,
) -> None:
    topic = settings.kafka.topics.control
    started, release = asyncio.Event(), asyncio.Event()
    done: list[bytes] = []

    async def process(records: Sequence[Any]) -> None:
        started.set()
        await release.wait()
        done.extend(r.value for r in records)

    consumer = _consumer(settings, "halt", process)
    await consumer.start()
    try:
        await produce(settings.kafka.bootstrap_servers, topic, [b"only"])
        await asyncio.wait_for(started.wait(), 30)
        halting = asyncio.create_task(consumer.halt())
        await asyncio.sleep(0.2)
        assert not halting.done()  # waits for the batch in hand
        release.set()
        await halting
        assert done == [b"only"]
        await consumer.offsets.flush()
        group = group_name(settings.kafka, "halt")
        assert await committed(settings.kafka.bootstrap_servers, group, topic) == 1
    finally:
        await consumer.close()


async def test_a_failing_poll_is_retried_with_backoff_and_logged_by_kind(
    settings: Settings, caplog: Any
) -> None:
    """Fetching fails three times (the broker away, then no right to read, then a bug): each
    is retried after a backoff, not in a hot loop, a permanent cause is logged as an error,
    and reading then goes on with nothing lost."""
    from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

    topic = settings.kafka.topics.control
    seen: list[bytes] = []

    async def process(records: Sequence[Any]) -> None:
        seen.extend(r.value for r in records)

    consumer = _consumer(settings, "poll", process)
    consumer.backoff = BackoffSettings(initial_ms=50, max_ms=200)
    await consumer.start()
    assert consumer.consumer is not None
    fetch = consumer.consumer.getmany
    failures: list[Exception] = [
        KafkaConnectionError("no broker"),
        TopicAuthorizationFailedError(),
        RuntimeError("a bug in a library"),
    ]
    polled: list[float] = []
    streaks: list[int] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        polled.append(asyncio.get_running_loop().time())
        streaks.append(consumer.poll_failures)
        if failures:
            raise failures.pop(0)
        return await fetch(*args, **kwargs)

    consumer.consumer.getmany = flaky  # type: ignore[method-assign]
    try:
        values = [f"p{n}".encode() for n in range(10)]
        await produce(settings.kafka.bootstrap_servers, topic, values)
        await wait_for(lambda: len(seen) >= 10, timeout=30, what="every record")
        assert sorted(seen) == sorted(values)
        assert streaks[:4] == [0, 1, 2, 3]  # counted in a row while failing...
        assert consumer.poll_failures == 0  # ...and reset by the first poll that works
        gaps = [later - earlier for earlier, later in itertools.pairwise(polled[:4])]
        assert all(gap >= 0.04 for gap in gaps), gaps  # each retry waited its backoff
        logged = [(r.levelname, r.getMessage()) for r in caplog.records if "fetching" in r.msg]
        # The first of the streak, and each new kind: the permanent ones as errors.
        assert [level for level, _ in logged] == ["WARNING", "ERROR", "ERROR"], logged
        assert "fetching failed (1 in a row)" in logged[0][1]
        assert "(2 in a row)" in logged[1][1] and "TopicAuthorizationFailed" in logged[1][1]
    finally:
        await consumer.close()
