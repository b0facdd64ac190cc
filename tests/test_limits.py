"""Flow-control permits against the real Redis: at most `max_in_flight` held, a token
bucket of `burst` refilled at `rate`, a command that holds one granted again, released
commands before new ones while a queue waits, and lapsed permits dropped; a runtime gives
back at once the permits it took for what it did not commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio import Redis

from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.runtime.batches import Runtime
from mediator.settings import FlowControlSettings, ServiceLimit
from mediator.storage.catalog import DefinitionStore
from mediator.storage.keys import Keys
from mediator.storage.limits import Limits
from mediator.storage.store import Store
from tests.engine_harness import ok
from tests.helpers import TOPICS, Record, RecordingDispatcher
from topics import CommandEvent, RequestEvent


def limits(redis: Redis, prefix: str, lease_ms: int = 60_000) -> Limits:
    return Limits(redis, Keys(prefix, 4), lease_ms)


async def test_in_flight_is_capped_and_freed_by_release(
    redis_client: Redis, key_prefix: str
) -> None:
    permits = limits(redis_client, key_prefix)
    cap = ServiceLimit(max_in_flight=2)
    first = await permits.acquire("pay", cap, [], ["c1", "c2", "c3"], 1_000)
    assert first == {"c1", "c2"} and first.fresh == {"c1", "c2"}
    # Recomputed after a conflict, the same commands are granted again, not twice.
    again = await permits.acquire("pay", cap, [], ["c1", "c2", "c3"], 1_001)
    assert again == {"c1", "c2"} and again.fresh == set()
    assert (await permits.in_flight(["pay"]))["pay"] == 2
    await permits.release("pay", ["c1"])
    assert await permits.acquire("pay", cap, [], ["c3"], 1_002) == {"c3"}
    assert await permits.room("pay", cap, 5, 1_003) == 0


async def test_the_rate_is_a_token_bucket(redis_client: Redis, key_prefix: str) -> None:
    permits = limits(redis_client, key_prefix)
    rate = ServiceLimit(rate=10, burst=3)
    ids = [f"r{n}" for n in range(5)]
    assert len(await permits.acquire("pay", rate, [], ids, 10_000)) == 3  # the burst
    assert await permits.acquire("pay", rate, [], ["r9"], 10_050) == set()  # half a token
    assert await permits.acquire("pay", rate, [], ["r9"], 10_100) == {"r9"}  # one more
    assert await permits.room("pay", rate, 10, 11_000) == 3  # refilled, capped at the burst


async def test_released_commands_go_before_new_ones_while_a_queue_waits(
    redis_client: Redis, key_prefix: str
) -> None:
    permits = limits(redis_client, key_prefix)
    cap = ServiceLimit(max_in_flight=3)
    assert await permits.room("pay", cap, 2, 1_000) == 2  # two queued: recorded
    granted = await permits.acquire("pay", cap, ["old1"], ["new1"], 1_001)
    assert granted == {"old1"}  # the new one waits behind the queue
    assert await permits.room("pay", cap, 0, 1_002) == 0  # the queue emptied: recorded
    assert await permits.acquire("pay", cap, [], ["new1"], 1_003) == {"new1"}


async def test_a_permit_whose_release_was_lost_lapses(redis_client: Redis, key_prefix: str) -> None:
    permits = limits(redis_client, key_prefix, lease_ms=1_000)
    cap = ServiceLimit(max_in_flight=1)
    assert await permits.acquire("pay", cap, [], ["lost"], 1_000) == {"lost"}
    assert await permits.acquire("pay", cap, [], ["next"], 1_500) == set()
    assert await permits.acquire("pay", cap, [], ["next"], 2_001) == {"next"}


async def test_permits_of_answered_commands_are_freed_by_the_next_acquire(
    redis_client: Redis, key_prefix: str
) -> None:
    permits = limits(redis_client, key_prefix)
    cap = ServiceLimit(max_in_flight=1)
    assert await permits.acquire("pay", cap, [], ["a"], 1_000) == {"a"}
    assert await permits.acquire("pay", cap, [], ["b"], 1_001) == set()
    assert await permits.acquire("pay", cap, [], ["b"], 1_002, done=["a"]) == {"b"}


def limited_runtime(redis: Redis, prefix: str, dispatcher: RecordingDispatcher) -> Runtime:
    """A runtime whose one workflow sends one command to `pay`, limited to 1 in flight."""
    keys = Keys(prefix, 4)
    definitions = Definitions(
        parse_workflows({"name": "one", "steps": [{"id": "a", "service": "pay", "action": "x"}]})
    )
    return Runtime(
        definitions=DefinitionStore(redis, keys, definitions),
        store=Store(redis, keys, retention_ms=60_000),
        dispatcher=dispatcher,
        topics=TOPICS,
        flow=FlowControlSettings.model_validate({"services": {"pay": {"max_in_flight": 1}}}),
    )


async def test_a_permit_taken_for_a_start_that_is_a_duplicate_is_given_back(
    redis_client: Redis, key_prefix: str
) -> None:
    """A request redelivered after its run moved on starts nothing: the permit its first
    command was granted on the way is given back at once, not held from other runs until
    the release loop finds nobody holds it."""
    dispatcher = RecordingDispatcher()
    runtime = limited_runtime(redis_client, key_prefix, dispatcher)
    assert runtime.limiter is not None
    request = RequestEvent(request_id="r-1", workflow="one").model_dump_json().encode()
    await runtime.handle_requests([Record(TOPICS.requests, 0, 0, request)])
    [sent] = [m for m in dispatcher.sent if m.kind == "command"]
    command = CommandEvent.model_validate_json(sent.value)
    assert (await runtime.limiter.in_flight(["pay"]))["pay"] == 1
    reply = ok(command).model_dump_json().encode()
    await runtime.handle_replies([Record(TOPICS.replies, 0, 0, reply)])
    await asyncio.sleep(0.05)  # the release is not waited for
    assert (await runtime.limiter.in_flight(["pay"]))["pay"] == 0

    await runtime.handle_requests([Record(TOPICS.requests, 0, 0, request)])  # redelivered
    await asyncio.sleep(0.05)
    assert (await runtime.limiter.in_flight(["pay"]))["pay"] == 0


async def test_releases_queued_while_a_release_is_under_way_are_made_too(
    redis_client: Redis, key_prefix: str
) -> None:
    """The permits of commands answered while the background release of earlier ones is
    waiting on Redis are released when it is done, not left until some later batch."""
    runtime = limited_runtime(redis_client, key_prefix, RecordingDispatcher())
    limiter = runtime.limiter
    assert limiter is not None
    await limiter.acquire("pay", ServiceLimit(max_in_flight=5), [], ["c1", "c2"], 1_000)
    slow, release = asyncio.Event(), limiter.release

    async def held_up(service: str, ids: Sequence[str]) -> None:
        await slow.wait()
        await release(service, ids)

    limiter.release = held_up  # type: ignore[method-assign]
    await runtime._release_permits([("pay", "c1")])
    await asyncio.sleep(0.01)  # the background release is waiting on Redis
    await runtime._release_permits([("pay", "c2")])  # the last answer of a load
    slow.set()
    assert runtime._release_task is not None
    await runtime._release_task
    assert (await limiter.in_flight(["pay"]))["pay"] == 0
