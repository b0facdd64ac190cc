"""Outbox fencing across replicas: a replica frozen past its lease, or one whose clock runs
ahead, publishes nothing another replica holds, and copies of a result share a result_id."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from mediator.core.ids import workflow_id_for
from mediator.runtime.groups import inbound_group
from mediator.runtime.messages import frame
from mediator.sdk.client import SubmitTimeout
from mediator.settings import Settings
from mediator.storage.commit import state_of
from mediator.storage.keys import Keys
from tests.helpers import read_to_end, wait_for
from tests.processes import MediatorProcess, group_members
from tests.system import CHAIN3, System, slow_echo
from topics import ResultEvent, WorkflowStatus

#: The frozen replica stays stopped past both its session timeout and its outbox lease.
SESSION_TIMEOUT_MS = 2000
LEASE_MS = 3000
FREEZE_S = 8.0
REQUESTS = 400
SUBMIT_EVERY_S = 0.03
BUSY_OUTBOX = 4

#: How far ahead the skewed replica's clock runs, and how long the test's entries are held.
SKEW_S = 20
HELD_MS = 8000


async def _members_are(bootstrap: str, group: str, n: int) -> bool:
    return await group_members(bootstrap, group) == n


async def _outbox_size(redis: Redis, keys: Keys) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.shards):
            pipe.zcard(keys.outbox_due(shard))
        sizes = await pipe.execute()
    return sum(int(n) for n in sizes)


def _shutdown_stats(output: str) -> str:
    match = re.search(r"mediator stopped: .*", output)
    return match.group(0) if match else "(no shutdown line)"


@pytest.mark.slow
@pytest.mark.timeout(300)  # beyond a request's 90 s, so that a stuck one is reported
async def test_replica_frozen_past_session_and_lease_gives_each_request_one_result(
    make_system: Any, redis_client: Redis, tmp_path: Path
) -> None:
    system: System = await make_system(CHAIN3)
    settings = system.settings
    system.settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": 200}
            ),
            "outbox": settings.outbox.model_copy(
                update={"lease_ms": LEASE_MS, "sweep_interval_ms": 200}
            ),
        }
    )
    # At most 16 commands at a time, 50 ms each: the run lasts seconds, so the freeze
    # lands in the middle of it.
    worker = await system.worker("svc", {"work": slow_echo}, concurrency=16)
    workflows = system.write_workflows(tmp_path)
    frozen, survivor = (
        MediatorProcess(system.settings, workflows, tmp_path, name) for name in ("frozen", "other")
    )
    frozen.start()
    survivor.start()
    group = inbound_group(system.settings.kafka)
    keys = Keys(system.settings.redis.key_prefix, system.settings.redis.shards)
    client = await system.client()
    distinct: list[ResultEvent] = []
    client.on_result = distinct.append
    done: list[ResultEvent] = []
    missing: list[str] = []

    async def submit(n: int) -> None:
        request_id = f"fz-{n}"
        try:
            done.append(await client.submit("chain3", {"n": n}, request_id=request_id, timeout=90))
        except SubmitTimeout:
            missing.append(request_id)

    tasks: list[asyncio.Task[None]] = []

    async def stream() -> None:
        # A steady stream rather than one burst: results flow before, during and after
        # the freeze, so it lands mid-run and the replica resumes under load.
        for n in range(REQUESTS):
            tasks.append(asyncio.create_task(submit(n)))
            await asyncio.sleep(SUBMIT_EVERY_S)

    try:
        await wait_for(
            lambda: _members_are(system.bootstrap, group, 2), timeout=60, what="both replicas"
        )
        submitter = asyncio.create_task(stream())
        tasks.append(submitter)
        await wait_for(lambda: len(done) >= 10, timeout=60, what="first results")
        # Freeze at a moment when several messages are between their commit and their
        # ack, so the frozen replica likely holds some of them (or, after a few seconds,
        # at any moment).
        looked_until = time.monotonic() + 5
        while (in_outbox := await _outbox_size(redis_client, keys)) < BUSY_OUTBOX:
            if time.monotonic() > looked_until:
                break
            await asyncio.sleep(0.001)
        frozen.pause()
        frozen_at = len(done)
        paused, paused_ms = time.monotonic(), time.time() * 1000
        # The frozen replica's session runs out and the group moves on without it.
        await wait_for(
            lambda: _members_are(system.bootstrap, group, 1),
            timeout=FREEZE_S,
            what="the frozen replica to leave the group",
        )
        await asyncio.sleep(FREEZE_S - (time.monotonic() - paused))
        finished_during_freeze = len(done) - frozen_at
        frozen.resume()
        started = time.monotonic()
        await submitter
        await asyncio.gather(*tasks)
        rest_s = time.monotonic() - started
        if not missing:  # else what is left is reported below
            await wait_for(
                lambda: _outbox_empty(redis_client, keys), timeout=30, what="outbox drained"
            )
        # Anything the frozen replica still had in hand went out when it resumed.
        await asyncio.sleep(1.0)
    finally:
        frozen.resume()
        for task in tasks:
            task.cancel()
        codes = [await frozen.stop(), await survivor.stop()]

    raw = await read_to_end(system.bootstrap, system.topics.results)
    copies: dict[str, list[ResultEvent]] = {}
    created: dict[str, list[int]] = {}
    for record in raw:
        result = ResultEvent.model_validate_json(record.value)
        copies.setdefault(result.request_id, []).append(result)
        created.setdefault(result.request_id, []).append(record.timestamp)
    raw_duplicates = len(raw) - len(copies)
    # A copy already handed to the producer when the replica froze cannot be recalled;
    # fencing is about what it would hand over after resuming.
    repeated = [times for times in created.values() if len(times) > 1]
    in_hand = sum(1 for times in repeated if min(times) < paused_ms)
    print(  # the figures, for `pytest -s`
        f"\nfroze at {frozen_at}/{REQUESTS} results with {in_outbox} messages in the outbox; "
        f"{finished_during_freeze} results during the {FREEZE_S:g}s freeze, the rest in "
        f"{rest_s:.1f}s after it\n"
        f"results topic: {len(raw)} records for {len(copies)} requests, {raw_duplicates} "
        f"duplicates ({in_hand} of {len(repeated)} repeated results were first produced "
        f"before the freeze); client dropped {client.duplicates_dropped}\n"
        f"worker: {dict(worker.stats)}\n"
        f"frozen: {_shutdown_stats(frozen.output())}\n"
        f"other:  {_shutdown_stats(survivor.output())}"
    )

    assert codes == [0, 0], [r.output()[-3000:] for r in (frozen, survivor)]
    if missing:
        pytest.fail(await _stuck(redis_client, keys, sorted(missing), (frozen, survivor)))
    assert frozen_at < REQUESTS, "the run finished before the freeze; make the service slower"
    assert {r.request_id for r in done} == {f"fz-{n}" for n in range(REQUESTS)}
    assert all(r.status is WorkflowStatus.COMPLETED for r in done)
    # Through the SDK each request has exactly one result, whatever reached the topic.
    per_request = Counter(r.request_id for r in distinct)
    assert set(per_request) == {f"fz-{n}" for n in range(REQUESTS)}
    assert [rid for rid, n in per_request.items() if n != 1] == []
    assert client.duplicates_dropped == raw_duplicates
    # Every copy on the topic is the same result: one result_id per request.
    assert set(copies) == set(per_request)
    mixed = {rid: {r.result_id for r in rs} for rid, rs in copies.items()}
    assert {rid: ids for rid, ids in mixed.items() if len(ids) != 1 or None in ids} == {}
    assert {rid: ids.pop() for rid, ids in mixed.items()} == {
        r.request_id: r.result_id for r in distinct
    }


async def _stuck(
    redis: Redis, keys: Keys, missing: list[str], replicas: tuple[MediatorProcess, ...]
) -> str:
    """What Redis and the replicas' logs say about requests that got no result."""
    lines = [f"{len(missing)} requests got no result: {missing[:20]}"]
    for request_id in missing[:5]:
        workflow_id = workflow_id_for(request_id)
        state = state_of(workflow_id, await redis.hgetall(keys.workflow(workflow_id)))
        run = (
            "no state"
            if state is None
            else f"{state.status.value}, steps "
            + str({sid: (s.status.value, s.attempt, s.command_id, s.instance)
                   for sid, s in state.steps.items()})
        )  # fmt: skip
        outbox = await redis.hkeys(keys.outbox(keys.shard_of(workflow_id)))
        pending = [k.decode() for k in outbox if k.decode().startswith(workflow_id)]
        lines.append(f"{request_id} ({workflow_id}): {run}; outbox {pending}")
        for replica in replicas:
            said = [ln for ln in replica.output().splitlines() if workflow_id in ln]
            lines.append(f"  {replica.name} logged: {said[-10:]}")
    for replica in replicas:
        lines.append(f"{replica.name}'s last lines:\n{replica.output()[-2000:]}")
    return "\n".join(lines)


async def _outbox_empty(redis: Redis, keys: Keys) -> bool:
    return await _outbox_size(redis, keys) == 0


# -- clock skew ----------------------------------------------------------------------------


def _libfaketime() -> str | None:
    """The path of libfaketime.so.1 (Debian package libfaketime), if it is installed."""
    if shutil.which("dpkg") is not None:
        listing = subprocess.run(
            ["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=False
        )
        for line in listing.stdout.splitlines():
            if line.endswith("/libfaketime.so.1"):
                return line
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ):
        if Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def skewed_env() -> dict[str, str]:
    """The environment that sets a process's wall clock `SKEW_S` seconds ahead (its
    monotonic clock untouched), or a skip if libfaketime is missing."""
    library = _libfaketime()
    if library is None:
        pytest.skip(
            "libfaketime is not installed: `apt-get install -y faketime` as root "
            "(.ci/run does) to run the clock-skew test"
        )
    return {
        "LD_PRELOAD": library,
        "FAKETIME": f"+{SKEW_S}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


async def _wall_clock_of(env: Mapping[str, str]) -> float:
    """What `time.time()` says in a Python process started with `env`."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; print(time.time())",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(child.communicate(), timeout=30)
    return float(out)


async def _redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _started_at(output: str) -> datetime | None:
    """The wall-clock time the replica stamped on its "mediator started" log line."""
    match = re.search(r"^(\S+ \S+),(\d{3}) INFO \S+: mediator started", output, re.M)
    if match is None:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    return stamp.replace(microsecond=int(match.group(2)) * 1000)


@pytest.mark.slow
async def test_replica_with_clock_ahead_resends_nothing_it_does_not_own(
    make_system: Any, redis_client: Redis, skewed_env: dict[str, str], tmp_path: Path
) -> None:
    skew = await _wall_clock_of(skewed_env) - time.time()
    assert SKEW_S - 2 < skew < SKEW_S + 2, f"libfaketime did not skew the clock: {skew:+.1f}s"

    system: System = await make_system(CHAIN3)
    settings: Settings = system.settings
    system.settings = settings.model_copy(
        update={"outbox": settings.outbox.model_copy(update={"sweep_interval_ms": 200})}
    )
    keys = Keys(settings.redis.key_prefix, settings.redis.shards)
    target = system.topics.results
    replica = MediatorProcess(system.settings, system.write_workflows(tmp_path), tmp_path, "ahead")
    replica.start(env=skewed_env)
    try:
        output = await wait_for(
            lambda: "mediator started" in replica.output() and replica.output(),
            timeout=60,
            what="the skewed replica to start",
        )
        started = _started_at(str(output))
        assert started is not None, str(output)[-2000:]
        ahead = (started - datetime.now()).total_seconds()
        assert ahead > SKEW_S - 5, f"the replica logged its start {ahead:+.1f}s from now"

        # Entries a live replica holds until HELD_MS from now on Redis's clock, and one
        # whose holder is gone (its lease ran out a second ago).
        now = await _redis_now_ms(redis_client)
        deadline = now + HELD_MS
        held = {f"result.fence-{i}": i % keys.shards for i in range(8)}
        entries = {**held, "result.orphan": 0}
        async with redis_client.pipeline(transaction=False) as pipe:
            for message_id, shard in entries.items():
                value = orjson.dumps({"id": message_id})
                data = frame(target, message_id.encode(), value, [("type", b"result")], "result")
                pipe.hset(keys.outbox(shard), message_id, data)
                due = now - 1000 if message_id == "result.orphan" else deadline
                pipe.zadd(keys.outbox_due(shard), {message_id: due})
            await pipe.execute()

        # The orphan goes out: the skewed replica's sweeper is live...
        await wait_for(
            lambda: _published(system.bootstrap, target),
            timeout=5,
            what="the orphaned entry to be swept",
        )
        # ...but for half the lease it leaves alone what is held, skew or no skew.
        while await _redis_now_ms(redis_client) < now + HELD_MS // 2:
            scores = await _scores(redis_client, keys, held)
            assert scores == dict.fromkeys(held, float(deadline)), "a held entry was claimed"
            await asyncio.sleep(0.2)
        early = await _published(system.bootstrap, target)
        assert early == {"result.orphan": 1}, f"published before the lease ran out: {early}"

        # Once the lease ran out on Redis's clock, each is published once and cleared.
        await wait_for(
            lambda: _outbox_empty(redis_client, keys),
            timeout=HELD_MS / 1000 + 10,
            what="the held entries to be swept once their lease ran out",
        )
        cleared_ms = await _redis_now_ms(redis_client)
        await asyncio.sleep(1.0)  # five more sweeps: nothing more goes out
        published = await _published(system.bootstrap, target)
    finally:
        code = await replica.stop()

    assert code == 0, replica.output()[-3000:]
    assert cleared_ms >= deadline, f"cleared {deadline - cleared_ms} ms before the deadline"
    assert published == dict.fromkeys(entries, 1)
    assert await _outbox_size(redis_client, keys) == 0


async def _published(bootstrap: str, topic: str) -> dict[str, int]:
    """How many times each outbox entry id was published to `topic`."""
    records = await read_to_end(bootstrap, topic)
    return dict(Counter(orjson.loads(r.value)["id"] for r in records))


async def _scores(redis: Redis, keys: Keys, entries: Mapping[str, int]) -> dict[str, float | None]:
    """Each entry's lease deadline in the outbox (None: not there, or its frame is gone)."""
    async with redis.pipeline(transaction=False) as pipe:
        for message_id, shard in entries.items():
            pipe.zscore(keys.outbox_due(shard), message_id)
            pipe.hexists(keys.outbox(shard), message_id)
        replies = await pipe.execute()
    return {
        message_id: score if present else None
        for message_id, score, present in zip(entries, replies[::2], replies[1::2], strict=True)
    }
