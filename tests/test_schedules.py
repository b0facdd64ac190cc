"""Schedules, pure: their ticks (intervals and cron in a time zone, daylight saving
included), what a look fires by the catch-up policy, and definitions that are refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from mediator.core.schedules import Schedule, parse_schedules, plan, request_id, ticks_between
from mediator.errors import DefinitionError


def _schedule(**spec: Any) -> Schedule:
    [schedule] = parse_schedules({"schedules": [{"name": "s", "workflow": "w", **spec}]})
    return schedule


def _ms(*args: int, tz: Any = UTC) -> int:
    return int(datetime(*args, tzinfo=tz).timestamp() * 1000)


def test_interval_ticks_are_the_multiples_of_the_interval() -> None:
    every = _schedule(every="500ms")
    assert ticks_between(every, 1_000, 2_600) == [1_500, 2_000, 2_500]
    assert ticks_between(every, 1_000, 1_000) == []
    assert ticks_between(every, 1_001, 1_499) == []


def test_cron_ticks_follow_the_time_zone_through_daylight_saving() -> None:
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    daily = _schedule(cron="30 2 * * *", timezone="Europe/Paris")
    # 2026-03-29: clocks jump from 02:00 to 03:00 in Paris, so 02:30 does not exist.
    ticks = ticks_between(daily, _ms(2026, 3, 27, tz=paris), _ms(2026, 3, 31, tz=paris))
    hours = [datetime.fromtimestamp(t / 1000, paris).strftime("%d %H:%M %Z") for t in ticks]
    # The day 02:30 does not exist, the tick is the first minute after the jump.
    assert hours == ["27 02:30 CET", "28 02:30 CET", "29 03:00 CEST", "30 02:30 CEST"]


def test_a_look_fires_by_the_catch_up_policy() -> None:
    now = 10_000
    one = _schedule(every="1s", catch_up="one")
    assert plan(one, 4_000, now, grace_ms=0).fire == [10_000]
    assert plan(one, 4_000, now, grace_ms=0).skipped == 5
    assert plan(one, 4_000, now, grace_ms=0).last_ms == 10_000
    every = _schedule(every="1s", catch_up="all", max_catch_up=3)
    assert plan(every, 4_000, now, grace_ms=0).fire == [8_000, 9_000, 10_000]
    none = _schedule(every="1s", catch_up="none")
    assert plan(none, 4_000, now + 500, grace_ms=1_000).fire == [10_000]  # on time
    late = plan(none, 4_000, now + 500, grace_ms=100)
    assert (late.fire, late.last_ms, late.skipped) == ([], 10_000, 6)
    assert plan(one, 10_000, 10_999, grace_ms=0).fire == []  # nothing new


def test_a_tick_names_its_request_and_renders_its_payload() -> None:
    schedule = _schedule(every="1m", payload={"at": "schedule.tick", "kind": "'nightly'"})
    assert request_id("s", 60_000) == "schedule.s.60000"
    assert schedule.render(60_000) == {"at": "1970-01-01T00:01:00Z", "kind": "nightly"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"every": "1s", "cron": "* * * * *"}, "exactly one of `cron` and `every`"),
        ({}, "exactly one of `cron` and `every`"),
        ({"cron": "61 * * * *"}, "cron '61 * * * *'"),
        ({"every": "10ms"}, "at least 100ms"),
        ({"every": "1s", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": "1s", "overlap": "queue"}, "overlap"),
        ({"every": "1s", "payload": {"x": "a[?"}}, "payload"),
    ],
)
def test_a_bad_schedule_is_refused_saying_why(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match="schedule") as caught:
        _schedule(**spec)
    assert message in str(caught.value)


def test_a_schedule_of_a_workflow_not_loaded_is_refused(tmp_path: Any) -> None:
    from mediator.definitions import load_paths

    path = tmp_path / "flows.yaml"
    path.write_text(
        "workflows:\n  - name: report\n    steps: [{id: a, service: s, action: x}]\n"
        "schedules:\n  - {name: nightly, workflow: reprot, cron: '0 3 * * *'}\n"
    )
    with pytest.raises(DefinitionError, match="starts workflow 'reprot', which is not loaded"):
        load_paths([path])
    path.write_text(path.read_text().replace("reprot", "report"))
    definitions = load_paths([path])
    assert list(definitions.schedules) == ["nightly"] and definitions.names() == ["report"]


def test_validate_reports_a_bad_schedule_with_its_file_and_line(tmp_path: Any) -> None:
    from mediator.linting import check_file

    path = tmp_path / "flows.yaml"
    path.write_text(
        "workflows:\n  - name: report\n    steps: [{id: a, service: s, action: x}]\n"
        "schedules:\n  - {name: nightly, workflow: report, cron: '0 33 * * *'}\n"
    )
    workflows, problems = check_file(path)
    assert [w.name for w in workflows] == ["report"]
    assert [str(p) for p in problems] == [
        f"{path}:5: schedule 'nightly': cron '0 33 * * *': Bad hour"
    ]


async def test_overlap_skip_sees_a_tick_published_by_a_replica_that_lost_the_race(
    redis_client: Any, key_prefix: str
) -> None:
    """Replica A skipped tick T (the run of F was going) and moved the schedule on; replica
    B, a moment later, published T and lost the compare-and-set, so Redis records F as
    the last fired. At T+1, T's run is still going: T+1 is skipped."""
    from mediator.core.ids import workflow_id_for
    from mediator.runtime.scheduler import Scheduler
    from mediator.storage.keys import Keys
    from mediator.storage.schedules import ScheduleStates
    from topics.names import Topics

    schedule = _schedule(every="1s", overlap="skip")
    keys = Keys(key_prefix, 1)
    states = ScheduleStates(redis_client, keys)
    now = await states.now_ms()
    fired, seen = now // 1000 * 1000 - 2_000, now // 1000 * 1000 - 1_000
    await redis_client.hset(keys.schedules, mapping={"s:last": seen, "s:fired": fired})
    live = {workflow_id_for(request_id("s", seen))}
    unread: set[str] = set()
    published: list[str] = []

    async def publish(topic: str, value: bytes, key: bytes, headers: Any) -> None:
        published.append(key.decode())

    async def is_live(run: str) -> bool | None:
        return True if run in live else None if run in unread else False

    scheduler = Scheduler(states, {"s": schedule}, Topics(), publish, is_live)
    assert await scheduler.look() == 0 and published == []
    live.clear()  # it ended: the next tick fires
    await asyncio.sleep(1.05)
    assert await scheduler.look() == 1 and len(published) == 1
    # That tick's request is published but not read yet (no run in Redis): the next tick
    # waits for it, for up to the grace period.
    unread.add(workflow_id_for(published[0]))
    await asyncio.sleep(1.05)
    assert await scheduler.look() == 0 and len(published) == 1


async def test_a_schedule_whose_spec_changed_starts_again_from_its_next_look(
    redis_client: Any, key_prefix: str
) -> None:
    from mediator.storage.keys import Keys
    from mediator.storage.schedules import ScheduleStates

    states = ScheduleStates(redis_client, Keys(key_prefix, 1))
    hourly = _schedule(every="1h")
    assert await states.publish([hourly]) == []
    await states.start("s", 1_000)
    assert await states.publish([hourly]) == []  # the same spec: its last tick stays
    assert (await states.read())["s"].last_ms == 1_000
    assert await states.publish([_schedule(every="1m")]) == ["s"]
    changed = (await states.read())["s"]
    assert changed.last_ms is None and changed.spec["every"] == "1m"


async def test_a_tick_whose_payload_is_not_an_object_is_skipped_and_said(
    redis_client: Any, key_prefix: str, caplog: Any
) -> None:
    """A permanent failure at fire time: logged as an error and counted, nothing published,
    and the schedule moves on (the tick is not retried for ever)."""
    from mediator.runtime.scheduler import Scheduler
    from mediator.storage.keys import Keys
    from mediator.storage.schedules import ScheduleStates
    from topics.names import Topics

    schedule = _schedule(every="1s", payload="schedule.tick")  # renders a string
    states = ScheduleStates(redis_client, Keys(key_prefix, 1))
    now = await states.now_ms()
    await states.start("s", now - 1_500)
    published: list[bytes] = []

    async def publish(topic: str, value: bytes, key: bytes, headers: Any) -> None:
        published.append(value)

    async def is_live(run: str) -> bool | None:
        return None

    scheduler = Scheduler(states, {"s": schedule}, Topics(), publish, is_live)
    assert await scheduler.look() == 0
    assert published == [] and scheduler.unrenderable == 1
    assert "renders to str, not an object" in caplog.text
    moved = (await states.read())["s"].last_ms
    assert moved is not None and moved >= now // 1000 * 1000  # moved on
