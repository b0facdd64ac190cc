"""Durable timers under faults: a replica killed while it holds claimed timers, and Redis
frozen while timers fall due. Every timer fires once, every run gets one result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from mediator.cli.infra import EmbeddedRedis
from mediator.runtime.groups import inbound_group
from mediator.settings import RedisSettings
from mediator.storage.keys import Keys, workflow_id_for
from tests.helpers import read_to_end, step, wait_for
from tests.processes import MediatorProcess, group_members
from tests.system import System
from topics import ResultEvent, WorkflowStatus

#: Runs in the replica-kill test, each: timeout, retry, timeout again.
RUNS = 30
STEP_TIMEOUT_MS = 500
#: Long enough for the checks made between the claim and the kill, short enough that the
#: survivor takes the held timers over within the test.
LEASE_MS = 3000

#: Runs in the Redis-stall test, how long their step waits, and how long Redis is frozen.
STALL_RUNS = 20
STALL_TIMEOUT_MS = 1000
STALL_S = 5.0

#: Loaded into both replicas through PYTHONPATH. The holder's (``HELD_TIMERS_FILE`` set)
#: first claim of due timers is real (the claim script, the lease) but it never applies
#: them, and says which it holds, so the test can kill it at a moment when it certainly
#: holds claimed timers. The survivor (``AFTER_HELD_FILE`` set) claims no timer until the
#: holder has: timers fall due in bursts, and the replica that polls first after a burst
#: claims all of it, so without this the survivor could take every burst.
HOLD_TIMERS = '''\
"""Test fault: the holder claims due timers once, then holds them without applying;
the survivor claims none before it."""

import asyncio
import json
import os
from pathlib import Path

from mediator.runtime.batches import Runtime
from mediator.runtime.timers import TimerPoller

if "AFTER_HELD_FILE" in os.environ:
    _poll_once = TimerPoller.poll_once

    async def _after_held(self, *args):
        if not Path(os.environ["AFTER_HELD_FILE"]).exists():
            return 0
        return await _poll_once(self, *args)

    TimerPoller.poll_once = _after_held


async def _hold(self, claimed):
    marker = Path(os.environ["HELD_TIMERS_FILE"])
    partial = marker.with_suffix(".partial")
    held = [[shard, timer.name] for shard, timers in claimed.items() for timer in timers]
    partial.write_text(json.dumps(held))
    partial.replace(marker)
    await asyncio.Event().wait()


if "HELD_TIMERS_FILE" in os.environ:
    Runtime.handle_timers = _hold
'''


class Service:
    """A service that takes every command and never answers in time: each handler waits
    until the test releases it. Records each command id its handler ran for."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.release = asyncio.Event()

    async def hold(self, data: Any, command: Any) -> dict[str, Any]:
        """The action: note the attempt, then wait (bounded) for the release."""
        self.ran.append(command.command_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), timeout=150)
        return {}


# -- a replica killed while it holds claimed timers ----------------------------------------


@pytest.mark.slow
async def test_timers_a_killed_replica_held_are_fired_once_by_the_other(
    make_system: Any, redis_client: Redis, tmp_path: Path
) -> None:
    retry = {"max_attempts": 2, "backoff": "100ms", "jitter": 0}
    system: System = await make_system(
        {
            "name": "patient",
            "steps": [step("a", action="hold", timeout=f"{STEP_TIMEOUT_MS}ms", retry=retry)],
        }
    )
    settings = system.settings
    # Every attempt times out here, which would open the service's circuit breaker and
    # park the second attempts: this test is about timers, so the breaker is off.
    system.settings = settings.model_copy(
        update={
            "timers": settings.timers.model_copy(update={"lease_ms": LEASE_MS}),
            "circuit_breaker": settings.circuit_breaker.model_copy(update={"enabled": False}),
        }
    )
    keys = Keys(settings.redis.key_prefix, settings.redis.shards)
    service = Service()
    worker = await system.worker("svc", {"hold": service.hold}, stop_timeout=0.2)
    workflows = system.write_workflows(tmp_path)
    holder, survivor = (
        MediatorProcess(system.settings, workflows, tmp_path, name)
        for name in ("holder", "survivor")
    )
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_TIMERS)
    marker = tmp_path / "held.json"
    python_path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    holder.start(env={"PYTHONPATH": python_path, "HELD_TIMERS_FILE": str(marker)})
    survivor.start(env={"PYTHONPATH": python_path, "AFTER_HELD_FILE": str(marker)})
    client = await system.client()
    distinct: list[ResultEvent] = []
    client.on_result = distinct.append
    request_ids = [f"tk-{n}" for n in range(RUNS)]
    wids = {rid: workflow_id_for(rid) for rid in request_ids}
    tasks: list[asyncio.Task[ResultEvent]] = []
    try:
        group = inbound_group(settings.kafka)
        await wait_for(
            lambda: _members_are(system.bootstrap, group, 2), timeout=60, what="both replicas"
        )
        tasks = [
            asyncio.create_task(client.submit("patient", {}, request_id=rid, timeout=90))
            for rid in request_ids
        ]
        await wait_for(marker.exists, timeout=60, what="the holder to claim due timers")
        held = [(int(shard), str(name)) for shard, name in json.loads(marker.read_text())]
        # The holder's only outbox entries are first attempts (it applies no timer): once
        # every run exists and none of them waits in the outbox, killing it strands no
        # command, so any command sent twice would come from a timer fired twice.
        await wait_for(
            lambda: _all_started(redis_client, keys, list(wids.values())),
            timeout=LEASE_MS / 2000,
            what="every run started and its first command published",
        )
        before = await _scores(redis_client, keys, held)
        checked_ms = await _redis_now_ms(redis_client)
        holder.kill()
        killed_ms = await _redis_now_ms(redis_client)
        after = await _scores(redis_client, keys, held)
        results = await asyncio.gather(*tasks)
        service.release.set()
        # Every attempt reaches the service's handler, which holds it until the release.
        await wait_for(
            lambda: len(set(service.ran)) >= 2 * RUNS,
            timeout=60,
            what="every attempt to reach the service",
        )
        await asyncio.sleep(1.0)  # room for a command sent twice to arrive
        commands = await read_to_end(system.bootstrap, system.topics.service("svc"))
        raw_results = await read_to_end(system.bootstrap, system.topics.results)
        timers_left = await _timer_count(redis_client, keys)
    finally:
        service.release.set()
        for task in tasks:
            task.cancel()
        codes = [await holder.stop(), await survivor.stop()]

    survived = _shutdown_stats(survivor.output())
    sent = Counter(json.loads(r.value)["command_id"] for r in commands)
    print(  # the figures, for `pytest -s`
        f"\nholder claimed {len(held)} due timers and was killed holding them "
        f"({killed_ms - checked_ms} ms after the check); survivor: timers={survived['timers']} "
        f"stale_timers={survived['stale_timers']} requests={survived['requests']}; "
        f"service topic: {sum(sent.values())} commands; results topic: {len(raw_results)}; "
        f"worker: {dict(worker.stats)}"
    )

    assert codes[1] == 0, survivor.output()[-3000:]
    assert codes[0] == -9  # SIGKILL, exactly as intended
    # The holder held due timers when it died: each was claimed (leased until after the
    # kill), none was applied, and the kill left its lease as it was.
    assert held, "the holder claimed nothing"
    assert all(score is not None and score > killed_ms for score in before.values()), before
    assert all(score - LEASE_MS <= checked_ms for score in before.values())  # claimed before
    assert after == before

    # One result per request, the expected failure, both attempts shown.
    assert [r.request_id for r in results] == request_ids
    for result in results:
        assert result.status is WorkflowStatus.FAILED, result
        assert result.error is not None and result.error.code == "timeout", result.error
        assert result.error.step == "a"
        assert f"attempt 2 got no reply within {STEP_TIMEOUT_MS} ms" in result.error.message
        summary = result.steps["a"]
        assert summary.status == "failed" and summary.attempts == 2
        assert summary.error is not None and summary.error.code == "timeout"
        assert [(h.attempt, h.error and h.error.code) for h in summary.history] == [(1, "timeout")]
    assert sorted(r.request_id for r in distinct) == sorted(request_ids)
    assert client.duplicates_dropped == 0
    assert sorted(ResultEvent.model_validate_json(r.value).request_id for r in raw_results) == (
        sorted(request_ids)
    )

    # Every timer fired once, all on the survivor: 3 per run (timeout, retry, timeout),
    # none fired a second time (which would show as stale), none left behind.
    assert survived["timers"] == 3 * RUNS
    assert survived["stale_timers"] == 0
    assert timers_left == 0

    # Each attempt was sent once and run once: no timer caused its effect twice.
    expected = {f"{wid}.a.{attempt}" for wid in wids.values() for attempt in (1, 2)}
    assert set(sent) == expected
    assert [cid for cid, n in sent.items() if n != 1] == []
    assert Counter(service.ran) == Counter(expected)


async def _members_are(bootstrap: str, group: str, n: int) -> bool:
    return await group_members(bootstrap, group) == n


async def _all_started(redis: Redis, keys: Keys, wids: list[str]) -> bool:
    """Every run exists and no first attempt is still waiting in the outbox."""
    async with redis.pipeline(transaction=False) as pipe:
        for wid in wids:
            pipe.exists(keys.workflow(wid))
        for shard in range(keys.shards):
            pipe.hkeys(keys.outbox(shard))
        replies = await pipe.execute()
    exists, outboxes = replies[: len(wids)], replies[len(wids) :]
    waiting = [m for ids in outboxes for m in ids if m.decode().endswith(".a.1")]
    return all(exists) and not waiting


async def _scores(redis: Redis, keys: Keys, timers: list[tuple[int, str]]) -> dict[str, Any]:
    """Each timer's score (its due time, or its claim's lease deadline); None: gone."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard, name in timers:
            pipe.zscore(keys.timers(shard), name)
        scores = await pipe.execute()
    return {name: score for (_, name), score in zip(timers, scores, strict=True)}


async def _timer_count(redis: Redis, keys: Keys) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.shards):
            pipe.zcard(keys.timers(shard))
        sizes = await pipe.execute()
    return sum(int(n) for n in sizes)


async def _redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _shutdown_stats(output: str) -> dict[str, int]:
    match = re.search(r"mediator stopped: (.*?);", output)
    assert match, f"no shutdown line in the replica's log:\n{output[-2000:]}"
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


# -- Redis frozen while timers fall due ------------------------------------------------------


@pytest.mark.slow
async def test_timers_due_while_redis_is_frozen_fire_once_after_it_resumes(
    make_system: Any, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mediator")
    redis_settings = RedisSettings(
        url=own_redis.url, key_prefix="tstall", shards=4, socket_timeout_s=0.5
    )
    system: System = await make_system(
        {
            "name": "stalled",
            "steps": [step("a", action="hold", timeout=f"{STALL_TIMEOUT_MS}ms")],
        },
        redis=redis_settings,
    )
    keys = Keys(redis_settings.key_prefix, redis_settings.shards)
    service = Service()
    await system.worker("svc", {"hold": service.hold}, stop_timeout=0.2)
    mediator = await system.mediator()
    client = await system.client()
    distinct: list[ResultEvent] = []
    client.on_result = distinct.append
    request_ids = [f"st-{n}" for n in range(STALL_RUNS)]
    wids = [workflow_id_for(rid) for rid in request_ids]
    redis = Redis.from_url(own_redis.url)
    tasks: list[asyncio.Task[ResultEvent]] = []
    try:
        tasks = [
            asyncio.create_task(client.submit("stalled", {}, request_id=rid, timeout=90))
            for rid in request_ids
        ]
        await wait_for(
            lambda: _started(redis, keys, wids),
            timeout=30,
            interval=0.01,
            what="every run started and its command published",
        )
        due = await _due_times(redis, keys)
        frozen_ms = await _redis_now_ms(redis)
        own_redis.pause()
        paused = time.time()
        await asyncio.sleep(STALL_S)
        resumed = time.time()
        own_redis.resume()
        await asyncio.sleep(0.5)
        leased = [d - int(resumed * 1000) for d in await _due_times(redis, keys)]
        results = await asyncio.gather(*tasks)
        back_s = time.time() - resumed
        service.release.set()
        await wait_for(
            lambda: len(service.ran) >= STALL_RUNS, timeout=30, what="every command to run"
        )
        await asyncio.sleep(0.5)  # room for a command sent twice to arrive
        raw_results = await read_to_end(system.bootstrap, system.topics.results)
        timers_left = await _timer_count(redis, keys)
        outbox_left = await mediator.store.outbox_size()
    finally:
        own_redis.resume()
        service.release.set()
        for task in tasks:
            task.cancel()
        await redis.aclose()

    warnings = [r for r in caplog.records if r.getMessage().startswith("timers:")]
    during = [r for r in warnings if paused <= r.created <= resumed]
    stats = mediator.runtime.stats
    print(  # the figures, for `pytest -s`
        f"\n{len(due)} timers due {min(due) - frozen_ms}..{max(due) - frozen_ms} ms after the "
        f"freeze; 0.5 s after it their scores were {min(leased, default=None)}.."
        f"{max(leased, default=None)} ms after the resume; all results {back_s:.1f}s after "
        f"the resume; timer lag (ms) "
        f"{mediator.runtime.timer_lag.summary()}; "
        f"timers={stats.timers} stale_timers={stats.stale_timers}; "
        f"{len(warnings)} 'timers:' warnings, {len(during)} during the freeze: "
        f"{[r.getMessage() for r in warnings]}"
    )

    # Each timer was set before the freeze and fell due during it.
    assert len(due) == STALL_RUNS
    assert all(frozen_ms < d < frozen_ms + STALL_S * 1000 for d in due), (frozen_ms, due)
    # Every run timed out, once, and only after Redis was back.
    assert [r.request_id for r in results] == request_ids
    for result in results:
        assert result.status is WorkflowStatus.FAILED, result
        assert result.error is not None and result.error.code == "timeout", result.error
        assert result.steps["a"].attempts == 1
        assert result.finished_ms >= resumed * 1000
    assert sorted(r.request_id for r in distinct) == sorted(request_ids)
    assert client.duplicates_dropped == 0
    assert len(raw_results) == STALL_RUNS
    assert stats.timers == STALL_RUNS
    assert stats.stale_timers == 0
    assert timers_left == 0 and outbox_left == 0
    # A claim the poller gave up on during the freeze still runs once Redis reads it, and
    # leases the due timers to a caller no longer listening: they fire when that lease runs
    # out, up to `timers.lease_ms` after the resume, but no later.
    assert back_s < system.settings.timers.lease_ms / 1000 + 15
    # The poller noticed the stall and backed off (500 ms, 1 s, 2 s, 4 s after claims that
    # each time out after 0.5 s) instead of hot-looping.
    assert 2 <= len(during) <= 5, [r.getMessage() for r in during]
    assert Counter(service.ran) == Counter(f"{wid}.a.1" for wid in wids)


async def _started(redis: Redis, keys: Keys, wids: list[str]) -> bool:
    """Every run exists, its timer is set and its command left the outbox."""
    async with redis.pipeline(transaction=False) as pipe:
        for wid in wids:
            pipe.exists(keys.workflow(wid))
        for shard in range(keys.shards):
            pipe.zcard(keys.timers(shard))
            pipe.hlen(keys.outbox(shard))
        replies = await pipe.execute()
    exists, sizes = replies[: len(wids)], replies[len(wids) :]
    return all(exists) and sum(sizes[::2]) == len(wids) and sum(sizes[1::2]) == 0


async def _due_times(redis: Redis, keys: Keys) -> list[int]:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.shards):
            pipe.zrange(keys.timers(shard), 0, -1, withscores=True)
        replies = await pipe.execute()
    return [int(score) for members in replies for _, score in members]
