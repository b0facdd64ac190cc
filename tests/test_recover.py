"""`mediator recover` against the real broker and Redis, with no mediator running.

Requests are published to the requests topic; Redis is given the runs of some of them (as
if it had kept those); recover must re-publish exactly the others, byte for byte.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer, ConsumerRecord
from redis.asyncio import Redis

from mediator import clock, codec, producers
from mediator.cli.infra import EmbeddedRedisCluster
from mediator.errors import BadTime, RecoverError
from mediator.ops.recover import parse_time, recover
from mediator.settings import Settings, settings_document
from mediator.storage.connection import connect_to
from mediator.storage.keys import Keys, workflow_id_for
from tests.helpers import records_on, step, wait_for
from topics.events import RequestEvent

# The layout recover must read from med:meta, unlike the settings' 4 shards.
STORED_SHARDS = 8


async def publish_requests(settings: Settings, request_ids: list[str]) -> list[RequestEvent]:
    """Publish one request per id, as the client SDK does (key, value, headers)."""
    requests = [
        RequestEvent(
            request_id=rid,
            workflow="order",
            payload={"n": i},
            trace_id=f"trace-{rid}",
            created_ms=clock.now_ms(),
        )
        for i, rid in enumerate(request_ids)
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_idempotence=False,
        partitioner=producers.partition_for,
    )
    await producer.start()
    try:
        for request in requests:
            await producer.send_and_wait(
                settings.kafka.topics.requests,
                codec.encode(request),
                key=request.request_id.encode(),
                headers=codec.headers(request),
            )
    finally:
        await producer.stop()
    return requests


async def publish_junk(settings: Settings, *values: bytes) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=False
    )
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.kafka.topics.requests, value, key=b"junk")
    finally:
        await producer.stop()


async def read_requests(settings: Settings) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on the requests topic."""
    return await records_on(settings.kafka.bootstrap_servers, settings.kafka.topics.requests)


async def record_count(settings: Settings) -> int:
    """How many records the requests topic holds."""
    return len(await read_requests(settings))


async def request_copies(settings: Settings) -> tuple[Counter[str], int]:
    """How often each request id is on the requests topic, and how many distinct records
    (key, value, headers) there are: a re-published record is an exact copy of another."""
    copies: Counter[str] = Counter()
    distinct = set()
    for record in await read_requests(settings):
        if record.key == b"junk":
            continue
        copies[RequestEvent.model_validate_json(record.value).request_id] += 1
        distinct.add((record.key, record.value, tuple(record.headers)))
    return copies, len(distinct)


@pytest.fixture(params=["standalone", "cluster"])
async def on_either(
    request: pytest.FixtureRequest,
    settings: Settings,
    redis_client: Redis,
    redis_cluster: EmbeddedRedisCluster,
) -> AsyncIterator[tuple[Settings, Redis]]:
    """The settings and a client of the session's Redis, or of its Redis Cluster."""
    if request.param == "standalone":
        yield settings, redis_client
        return
    cluster = {"url": redis_cluster.url, "mode": "cluster"}
    on = settings.model_copy(update={"redis": settings.redis.model_copy(update=cluster)})
    client = connect_to(on.redis)
    try:
        yield on, client
    finally:
        await client.aclose()


@pytest.fixture
async def layout(redis_client: Redis, settings: Settings) -> Keys:
    """The prefix laid out with STORED_SHARDS shards, as a replica records it in med:meta."""
    keys = Keys(settings.redis.key_prefix, STORED_SHARDS)
    await redis_client.hset(keys.meta, mapping={"shards": STORED_SHARDS, "schema": 1})
    return keys


async def keep_runs(redis: Redis, keys: Keys, request_ids: list[str]) -> None:
    """Give Redis the workflow hashes of these requests, as a mediator would have written."""
    for rid in request_ids:
        wid = workflow_id_for(rid)
        await redis.hset(keys.workflow(wid), mapping={"status": "running", "workflow": "order"})


def test_time_forms() -> None:
    now = 1_795_357_524_000
    assert parse_time("15m", now_ms=now) == now - 15 * 60_000
    assert parse_time("2h", now_ms=now) == now - 2 * 3_600_000
    assert parse_time("1.5d", now_ms=now) == now - 36 * 3_600_000
    assert parse_time("2026-11-22T14:00:00Z", now_ms=now) == 1_795_356_000_000
    assert parse_time("2026-11-22T15:00:00+01:00", now_ms=now) == 1_795_356_000_000
    assert parse_time("2026-11-22T14:00:00", now_ms=now) == 1_795_356_000_000  # naive: UTC
    for bad in ("", "soon", "15", "-5m", "2026-13-01"):
        with pytest.raises(BadTime, match="ISO-8601"):
            parse_time(bad, now_ms=now)


async def test_republishes_exactly_the_runs_redis_lost(on_either: tuple[Settings, Redis]) -> None:
    settings, redis_client = on_either
    layout = Keys(settings.redis.key_prefix, STORED_SHARDS)
    await redis_client.hset(layout.meta, mapping={"shards": STORED_SHARDS, "schema": 1})
    since = clock.now_ms() - 1000
    ids = [f"r-{i}" for i in range(12)]
    await publish_requests(settings, ids)
    await publish_junk(settings, b"not json", b'{"type": "request"}')
    kept, finished, lost = ids[:5], ids[5:7], ids[7:]
    await keep_runs(redis_client, layout, kept)
    for rid in finished:  # finished runs whose state expired leave a tombstone
        await redis_client.hset(layout.tombstone(workflow_id_for(rid)), "status", "completed")

    dry = await recover(settings, since_ms=since, dry_run=True)

    assert (dry.scanned, dry.undecodable, dry.present, dry.missing) == (14, 2, 7, 5)
    assert dry.republished == 0 and dry.dry_run
    assert await record_count(settings) == 14

    report = await recover(settings, since_ms=since)

    assert (report.scanned, report.undecodable, report.present) == (14, 2, 7)
    assert report.missing == report.republished == len(lost)
    assert report.partitions == 4 and report.topic == settings.kafka.topics.requests
    copies, distinct = await request_copies(settings)
    assert copies == Counter({rid: 1 for rid in kept + finished} | {rid: 2 for rid in lost})
    assert distinct == len(ids)

    # A mediator consumes the re-published requests and starts their runs again.
    await keep_runs(redis_client, layout, lost)
    again = await recover(settings, since_ms=since)

    assert (again.scanned, again.present, again.republished) == (19, 17, 0)
    assert await record_count(settings) == 19


async def test_window_bounds_and_duplicates(
    settings: Settings, redis_client: Redis, layout: Keys
) -> None:
    start = clock.now_ms() - 1000
    await publish_requests(settings, ["early-1", "early-2"])
    await asyncio.sleep(0.3)
    middle = clock.now_ms()
    await asyncio.sleep(0.3)
    # A client that re-sent its request: two records, one run to start.
    await publish_requests(settings, ["late-1", "late-1", "late-2"])

    first = await recover(settings, since_ms=start, until_ms=middle, dry_run=True)
    second = await recover(settings, since_ms=middle, dry_run=True)

    assert (first.scanned, first.missing) == (2, 2)
    assert (second.scanned, second.missing, second.repeated) == (3, 2, 1)
    report = await recover(settings, since_ms=middle)
    assert report.republished == 2
    copies, distinct = await request_copies(settings)
    assert copies == Counter({"early-1": 1, "early-2": 1, "late-1": 3, "late-2": 2})
    assert distinct == 5
    with pytest.raises(RecoverError, match="in the future"):
        await recover(settings, since_ms=clock.now_ms() + 60_000)
    with pytest.raises(RecoverError, match="not after its start"):
        await recover(settings, since_ms=middle, until_ms=middle)


async def test_only_loaded_workflows_are_republished(
    settings: Settings, redis_client: Redis, layout: Keys
) -> None:
    since = clock.now_ms() - 1000
    await publish_requests(settings, ["a", "b"])

    report = await recover(settings, since_ms=since, dry_run=True, workflows={"other"})

    assert (report.unknown_workflow, report.missing) == (2, 0)


async def test_missing_topic_is_an_error(settings: Settings) -> None:
    absent = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic_prefix": "absent."})}
    )
    with pytest.raises(RecoverError, match=r"'absent\.requests' does not exist"):
        await recover(absent, since_ms=clock.now_ms() - 1000, timeout_s=10)


async def run_cli(config: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mediator",
        "recover",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "mediator.yaml"
    path.write_text(yaml.safe_dump(settings_document(settings)))
    return path


async def test_cli(
    settings: Settings, redis_client: Redis, layout: Keys, config_file: Path
) -> None:
    await publish_requests(settings, ["c-1", "c-2", "c-3"])
    await keep_runs(redis_client, layout, ["c-1"])

    code, out, err = await run_cli(config_file, "--since", "10m", "--dry-run")
    assert code == 0, err
    assert "scanned 3  already present 1  missing 2 (dry run: nothing published)" in out
    assert await record_count(settings) == 3

    code, out, err = await run_cli(config_file, "--since", "10m", "--json")
    assert code == 0, err
    report = orjson.loads(out)
    assert (report["scanned"], report["present"], report["republished"]) == (3, 1, 2)
    assert await request_copies(settings) == (Counter({"c-1": 1, "c-2": 2, "c-3": 2}), 3)

    await keep_runs(redis_client, layout, ["c-2", "c-3"])
    code, out, err = await run_cli(config_file, "--since", "10m")
    assert code == 0, err
    assert "scanned 5  already present 5  re-published 0  undecodable 0" in out


async def test_cli_bad_input_is_one_line(config_file: Path) -> None:
    for args, expected in [
        (("--since", "yesterday"), "--since: invalid time 'yesterday'"),
        (("--since", "1h", "--until", "noon"), "--until: invalid time 'noon'"),
        (("--since", "1h", "--until", "2h"), "not after its start"),
        (("--since", "2999-01-01T00:00:00Z"), "in the future"),
    ]:
        code, out, err = await run_cli(config_file, *args)
        assert code == 2, (args, out, err)
        assert expected in err, err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
async def test_a_run_a_lossy_failover_rolled_back_is_brought_forward(
    make_system: Any, redis_client: Redis
) -> None:
    """Redis loses its latest writes (an asynchronous replica promoted before it had them):
    a run is back at the revision where step `a` was running, though `a` answered, the
    reply was applied and its offset committed. Nothing would move it on: `recover`
    publishes again the reply it waits for, and the run finishes, each step run once."""
    system = await make_system(
        {"name": "two", "steps": [step("a", action="a"), step("b", action="b", depends_on=["a"])]}
    )
    ran: Counter[str] = Counter()
    release_a, release_b = asyncio.Event(), asyncio.Event()

    async def held(gate: asyncio.Event, name: str) -> dict[str, Any]:
        ran[name] += 1
        await gate.wait()
        return {name: True}

    await system.worker(
        "svc", {"a": lambda data: held(release_a, "a"), "b": lambda data: held(release_b, "b")}
    )
    first = await system.mediator()
    client = await system.client()
    began = clock.now_ms()
    keys = first.store.keys
    wid = workflow_id_for("r-1")
    await client.publish("two", {}, request_id="r-1")
    await wait_for(lambda: ran["a"] == 1, what="step a to run")
    lost = await redis_client.dump(keys.workflow(wid))  # the revision the failover keeps
    release_a.set()
    await wait_for(lambda: ran["b"] == 1, what="step b to run")
    await first.stop()
    await redis_client.restore(keys.workflow(wid), 0, lost, replace=True)
    second = await system.mediator()

    report = await recover(system.settings, since_ms=began - 1_000)
    release_b.set()

    async def completed() -> bool:
        state = await second.store.load(wid)
        return state is not None and state.status.value == "completed"

    await wait_for(completed, timeout=20, what="the rolled-back run to finish")
    assert ran == {"a": 1, "b": 1}
    assert report.missing == 0  # the run was there, only behind
    assert (report.replies_awaited, report.replies_republished) == (1, 1), report
    again = await recover(system.settings, since_ms=began - 1_000)
    assert again.replies_awaited == 0  # nothing a finished run waits for
