"""Schedules against the real broker and Redis: two replicas fire every tick exactly once
(one run per tick, no tick lost), and after every replica was down, `catch_up: one` fires
the latest missed tick once and goes on."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson

from mediator.core.schedules import parse_schedules
from mediator.settings import ScheduleSettings
from mediator.storage.connection import connect_to
from mediator.storage.keys import Keys
from mediator.storage.schedules import ScheduleStates
from tests.helpers import cli, wait_for

TICK_MS = 500
FLOW = {"name": "tick", "steps": [{"id": "a", "service": "svc", "action": "work"}]}
SCHEDULE = {
    "name": "heartbeat",
    "workflow": "tick",
    "every": f"{TICK_MS}ms",
    "catch_up": "one",
    "overlap": "allow",
    "payload": {"tick": "schedule.tick_ms"},
}


async def _ticking(make_system: Any, spec: dict[str, Any]) -> tuple[Any, Counter[int]]:
    """A system with the schedule `spec` loaded and the service its runs call, which
    counts the runs of each tick (no replica started yet)."""
    system = await make_system(FLOW, schedules=ScheduleSettings(poll_ms=50))
    for schedule in parse_schedules({"schedules": [spec]}):
        system.definitions.add_schedule(schedule)
    runs: Counter[int] = Counter()

    async def work(data: Any, command: Any) -> dict[str, Any]:
        runs[data["tick"]] += 1
        return {}

    await system.worker("svc", {"work": work})
    return system, runs


async def test_two_replicas_fire_each_tick_once_and_catch_up_one_after_a_restart(
    make_system: Any,
) -> None:
    system, runs = await _ticking(make_system, SCHEDULE)
    first, second = await system.mediator(), await system.mediator()
    await wait_for(lambda: len(runs) >= 21, timeout=40, what="21 ticks")
    ticks = sorted(runs)
    # Every tick from the first to the last fired, each once, by two replicas looking.
    assert ticks == list(range(ticks[0], ticks[-1] + TICK_MS, TICK_MS)), ticks
    assert set(runs.values()) == {1}, runs
    fired = first.scheduler.fired + second.scheduler.fired  # type: ignore[union-attr]
    assert fired >= 20 and first.scheduler.fired and second.scheduler.fired  # type: ignore[union-attr]

    # Every replica down for about six ticks; one comes back.
    await first.stop()
    await second.stop()
    redis = connect_to(system.settings.redis)
    try:
        keys = Keys(system.settings.redis.key_prefix, system.settings.redis.shards)
        stopped = (await ScheduleStates(redis, keys).read())["heartbeat"].fired_ms
    finally:
        await redis.aclose()
    assert stopped is not None
    await asyncio.sleep(6 * TICK_MS / 1000)
    third = await system.mediator()
    await wait_for(
        lambda: len([t for t in runs if t > stopped]) >= 3, timeout=20, what="ticks after restart"
    )
    assert sorted(t for t in runs if t <= stopped) == list(
        range(ticks[0], stopped + TICK_MS, TICK_MS)
    )  # every tick fired before the stop ran, once
    after = sorted(t for t in runs if t > stopped)
    # Of the ticks missed while every replica was down, only the latest fired, then every
    # tick again.
    caught_up = after[0]
    assert caught_up - stopped >= 4 * TICK_MS, (stopped, after)
    assert after == list(range(caught_up, after[-1] + TICK_MS, TICK_MS)), after
    assert set(runs.values()) == {1}, runs
    assert third.scheduler is not None and third.scheduler.skipped >= 3


async def test_the_cli_lists_pauses_triggers_and_backfills_a_schedule(make_system: Any) -> None:
    spec = {**SCHEDULE, "every": "1h", "name": "hourly"}
    system, runs = await _ticking(make_system, spec)
    await system.mediator()
    settings = system.settings
    code, out, err = await cli(settings, "schedules", "list")
    assert code == 0, err
    assert out.split()[:5] == ["hourly", "tick", "every", "1h", "active"], out

    code, out, err = await cli(settings, "schedules", "trigger", "hourly")
    assert code == 0 and "fired now as schedule.hourly.now." in out, err
    await wait_for(lambda: len(runs) == 1, what="the triggered run")

    code, out, err = await cli(settings, "schedules", "backfill", "hourly", "--since", "3h",
                               "--dry-run")  # fmt: skip
    assert (code, out.strip()) == (0, "schedule hourly: 3 ticks in the window"), err
    for _ in range(2):  # twice: the ticks run once
        code, out, err = await cli(settings, "schedules", "backfill", "hourly", "--since", "3h")
        assert code == 0 and "3 ticks fired" in out, err
    await wait_for(lambda: len(runs) == 4, what="the backfilled runs")
    await asyncio.sleep(1.0)
    assert set(runs.values()) == {1} and len(runs) == 4, runs

    code, out, err = await cli(settings, "schedules", "pause", "hourly")
    assert (code, out.strip()) == (0, "schedule hourly paused"), err
    code, out, err = await cli(settings, "schedules", "list", "--json")
    assert orjson.loads(out)[0]["paused"] is True
    code, _, err = await cli(settings, "schedules", "pause", "nightly")
    assert code == 2 and "no schedule 'nightly'" in err and "['hourly']" in err, err
