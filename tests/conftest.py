"""Fixtures: one real broker and one real Redis per session; fresh names for every test."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from redis.asyncio import Redis

from mediator.cli.infra import EmbeddedKafka, EmbeddedRedis, create_topics
from mediator.settings import Settings, load_settings
from tests.helpers import TEST_KEYS, TEST_OPERATORS
from tests.system import System
from topics.names import Topics

#: How long before pytest-timeout's limit a stuck test dumps its asyncio tasks.
DUMP_AHEAD_S = 15.0


def _dump_tasks(test: str) -> None:
    """Print every asyncio task's stack: pytest-timeout shows only the threads, and a hung
    test's threads all sit in the event loop's select."""
    print(f"\n=== {test} looks stuck; its asyncio tasks ===", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


@pytest.fixture(autouse=True)
async def _dump_tasks_when_stuck(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker else float(request.config.getini("timeout") or 0)
    if limit <= DUMP_AHEAD_S:
        yield
        return
    loop = asyncio.get_running_loop()
    handle = loop.call_later(limit - DUMP_AHEAD_S, _dump_tasks, request.node.nodeid)
    try:
        yield
    finally:
        handle.cancel()


def _tag() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
async def kafka() -> AsyncIterator[EmbeddedKafka]:
    """A Tansu broker shared by the whole session.

    Tests that kill or pause a server should start their own `EmbeddedKafka`, so that the
    tests after them keep a working broker.
    """
    async with EmbeddedKafka() as server:
        yield server


@pytest.fixture(scope="session")
async def redis_server() -> AsyncIterator[EmbeddedRedis]:
    """A Valkey (or Redis) server shared by the whole session."""
    async with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def own_redis() -> AsyncIterator[EmbeddedRedis]:
    """A Redis of the test's own, for tests that pause, kill or restart it: the tests
    after them keep the session's."""
    async with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def topics(kafka: EmbeddedKafka) -> Topics:
    """Topic names no other test uses, with the mediator's topics already created."""
    tag = _tag()
    names = Topics(prefix=f"{tag}.", service_prefix=f"{tag}.svc.")
    await create_topics(kafka.bootstrap_servers, names.mediator_topics(), partitions=4)
    return names


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix no other test uses."""
    return _tag()


@pytest.fixture
async def redis_client(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A client of the session Redis, closed after the test."""
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings(
    kafka: EmbeddedKafka, redis_server: EmbeddedRedis, topics: Topics, key_prefix: str
) -> Settings:
    """Settings pointing at the session servers, this test's topics and its key prefix."""
    return load_settings(
        kafka={
            "bootstrap_servers": kafka.bootstrap_servers,
            "enable_idempotence": False,
            "topic_prefix": topics.prefix,
            "service_topic_prefix": topics.service_prefix,
            "partitions": 4,
            "group_id": f"{key_prefix}-mediator",
            # Tansu holds empty fetches and JoinGroup replies for their full timeouts.
            "fetch_max_wait_ms": 5,
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 200,
        },
        redis={"url": redis_server.url, "key_prefix": key_prefix, "shards": 4},
        signing={"keys": TEST_KEYS, "operators": TEST_OPERATORS},
        http={"port": 0},
    )


@pytest.fixture
async def make_system(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[System]]]:
    """Build a `System` for some workflow definitions; everything is stopped afterwards."""
    systems: list[System] = []

    async def make(*workflows: Mapping[str, Any], **overrides: Any) -> System:
        merged = settings.model_copy(update=overrides) if overrides else settings
        system = System(merged, list(workflows))
        await system.create_topics()
        systems.append(system)
        return system

    try:
        yield make
    finally:
        for system in reversed(systems):
            await system.close()
