"""Every effect runs as the workflow intends, over the real broker: an idempotent action
does its work once per idempotency key, and a command routed to a partition its topic does
not have still goes out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from mediator.codec import encode, headers
from mediator.producers import new_producer
from mediator.runtime.messages import Message
from mediator.runtime.outbox import Dispatcher
from mediator.sdk.worker import ActionError, Worker
from mediator.storage.keys import Keys
from mediator.storage.store import Store
from tests.helpers import FAST_GROUP, SERVICE, TEST_KEYRING, command, read, replies, send
from topics.events import CommandEvent, ReplyStatus
from topics.names import Topics


@pytest.fixture
async def charges() -> list[str]:
    """The command ids whose ``charge`` actually charged, in order."""
    return []


@pytest.fixture
async def payer(broker: str, names: Topics, charges: list[str]) -> AsyncIterator[Worker]:
    w = Worker(
        SERVICE, broker, topics=names, instance="pay-1", enable_idempotence=False,
        consumer_options=FAST_GROUP, keys=TEST_KEYRING,
    )  # fmt: skip
    flaky: set[str] = set()

    @w.action("charge", idempotent=True)
    async def charge(input: dict[str, Any], command: CommandEvent) -> dict[str, Any]:
        if input.get("flaky") and command.idempotency_key not in flaky:
            flaky.add(command.idempotency_key or "")
            msg = "gateway busy"
            raise ActionError(msg, code="busy", retryable=True)
        charges.append(command.command_id)
        await asyncio.sleep(0.3)  # long enough for the next attempt to arrive meanwhile
        return {"payment": f"p-{len(charges)}"}

    @w.action("ping")
    async def ping(input: Any, command: CommandEvent) -> Any:
        charges.append(command.command_id)
        return input

    await w.start()
    try:
        yield w
    finally:
        await w.stop()


async def test_an_idempotent_action_does_its_work_once_per_key(
    broker: str,
    names: Topics,
    payer: Worker,
    producer: AIOKafkaProducer,
    charges: list[str],
) -> None:
    key = "wf-1.charge.r0"
    first = command(names, "charge", {}, idempotency_key=key)
    # Attempt 2 (its timeout passed) arrives while attempt 1 still runs; attempt 3 (its
    # instance was taken for dead) after it finished. One charge; three replies, each
    # addressed to its own attempt.
    second = command(names, "charge", {}, idempotency_key=key, attempt=2)
    await send(producer, names, first, second)
    await replies(broker, names, 2)  # attempt 1 has finished
    third = command(names, "charge", {}, idempotency_key=key, attempt=3)
    await send(producer, names, third)
    got = {r.command_id: r for r in await replies(broker, names, 3)}
    assert charges == [first.command_id]
    assert set(got) == {first.command_id, second.command_id, third.command_id}
    assert {r.attempt for r in got.values()} == {1, 2, 3}
    assert {r.output["payment"] for r in got.values()} == {"p-1"}  # type: ignore[index]
    assert payer.stats["executed"] == 1 and payer.stats["duplicates"] == 2


async def test_a_retryable_failure_is_not_remembered_and_other_keys_are_other_work(
    broker: str,
    names: Topics,
    payer: Worker,
    producer: AIOKafkaProducer,
    charges: list[str],
) -> None:
    busy = command(names, "charge", {"flaky": True}, idempotency_key="k-1")
    await send(producer, names, busy)
    [failed] = await replies(broker, names, 1)
    assert failed.status is ReplyStatus.ERROR
    again = command(names, "charge", {"flaky": True}, idempotency_key="k-1", attempt=2)
    other_round = command(names, "charge", {}, idempotency_key="k-2")
    await send(producer, names, again, other_round)
    got = {r.command_id: r for r in await replies(broker, names, 3)}
    assert got[again.command_id].status is ReplyStatus.OK
    assert sorted(charges) == sorted([again.command_id, other_round.command_id])
    # An action not declared idempotent does what each command asks, key or not.
    pings = [command(names, "ping", 1, idempotency_key="k-3") for _ in range(2)]
    await send(producer, names, *pings)
    await replies(broker, names, 5)
    assert charges[-2:] == [p.command_id for p in pings]


async def test_a_command_for_a_partition_the_topic_lacks_goes_where_its_key_falls(
    broker: str,
    names: Topics,
    redis_client: Redis,
    key_prefix: str,
) -> None:
    """An instance announced a partition its topic does not have (it shrank, or the
    announcement is wrong): the command goes out by its key, not to the dead letters."""
    kafka = new_producer(broker, client_id="t-outbox", enable_idempotence=False)
    await kafka.start()
    store = Store(redis_client, Keys(key_prefix, 1), retention_ms=60_000)
    dispatcher = Dispatcher(store, kafka, topics=names)
    cmd = command(names, "ping", 1)
    value = encode(cmd)
    message = Message(
        -1, cmd.command_id, names.service(SERVICE), b"wf-1", value,
        headers(cmd), "command", partition=99,
    )  # fmt: skip
    try:
        await dispatcher.send([message])
        await dispatcher.stop()
    finally:
        await kafka.stop()
    [sent] = await read(broker, names.service(SERVICE), 1)
    assert sent == value
    assert dispatcher.stats.unknown_partition == 1 and dispatcher.stats.dead == 0
