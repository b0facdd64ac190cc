"""Making the outbox's producer again when it is out of step with the broker: once per
producer (not again for the late failures of the one it replaced), never once stopped,
and no Kafka client left open whichever way a stop and a renewal cross.

The clients here are fakes with aiokafka's stop (closed first, then a flush that waits for
the broker): idempotent producers, and so the failures that call for a renewal, cannot
be had from the embedded broker (tests/test_topic_limits.py renews a real producer)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

import mediator.producers as producers
from mediator.producers import DeferredProducer
from tests.test_outbox_failures import FakeStore, OutOfStep, command, dispatcher


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
