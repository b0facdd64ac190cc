"""The requests and replies subscribers run concurrently on one runtime: what one batch
dead-letters or counts must never be lost to, or sent by, the other."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.runtime.batches import Runtime
from mediator.storage.catalog import DefinitionStore
from mediator.storage.keys import Keys
from mediator.storage.store import Store
from tests.helpers import TOPICS, Record, RecordingDispatcher
from topics import DeadLetter, RequestEvent


async def test_concurrent_batches_keep_their_own_dead_letters(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 4)
    definitions = Definitions(
        parse_workflows({"name": "one", "steps": [{"id": "a", "service": "s", "action": "x"}]})
    )
    dispatcher = RecordingDispatcher()
    runtime = Runtime(
        definitions=DefinitionStore(redis_client, keys, definitions),
        store=Store(redis_client, keys, retention_ms=60_000),
        dispatcher=dispatcher,
        topics=TOPICS,
    )
    good = RequestEvent(request_id="r-1", workflow="one").model_dump_json().encode()
    requests = [Record(TOPICS.requests, 0, 0, b"not json"), Record(TOPICS.requests, 0, 1, good)]
    replies = [Record(TOPICS.replies, 0, 0, b'{"type": "reply"}')]

    await asyncio.gather(runtime.handle_requests(requests), runtime.handle_replies(replies))

    dead = [
        DeadLetter.model_validate_json(m.value) for m in dispatcher.direct if m.topic == TOPICS.dlq
    ]
    assert sorted((d.source_topic, d.offset) for d in dead) == [
        (TOPICS.replies, 0),
        (TOPICS.requests, 0),
    ]
    stats = await redis_client.hgetall(keys.stats)
    assert stats[b"dead_letters:invalid"] == b"2"
    assert [m.kind for m in dispatcher.sent] == ["command"]
