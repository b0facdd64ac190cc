"""Schedules as ops see them, read from Redis (what the replicas recorded of those they
loaded): shared by ``mediator schedules`` and the dashboard."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from mediator.core.schedules import Schedule, next_tick, parse_schedules, request_id
from mediator.errors import DefinitionError, MediatorError
from mediator.storage.keys import Keys
from mediator.storage.schedules import ScheduleState, ScheduleStates
from topics.events import RequestEvent

__all__ = [
    "UnknownSchedule",
    "compiled",
    "find",
    "manual_request",
    "schedule_rows",
    "tick_request",
]


class UnknownSchedule(MediatorError):
    """No replica recorded a schedule of that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(
            f"no schedule {name!r} (a replica that loaded it records it); known: {known}"
        )


def compiled(state: ScheduleState) -> Schedule:
    """The schedule as the replicas loaded it (from its recorded spec)."""
    try:
        return parse_schedules({"schedules": [state.spec]})[0]
    except DefinitionError as exc:
        msg = f"schedule {state.name!r} as recorded cannot be read: {exc}"
        raise MediatorError(msg) from None


async def schedule_rows(redis: Redis, keys: Keys) -> tuple[int, list[dict[str, Any]]]:
    """Redis's time, and every recorded schedule: its workflow, when it fires, whether it
    is paused, its last fired and its next tick."""
    states = ScheduleStates(redis, keys)
    now = await states.now_ms()
    rows = []
    for name, state in (await states.read()).items():
        if not state.spec:
            continue
        schedule = compiled(state)
        spec = state.spec
        when = (
            f"cron {spec['cron']} {spec.get('timezone', 'UTC')}"
            if spec.get("cron")
            else f"every {spec['every']}"
        )
        rows.append(
            {
                "name": name,
                "workflow": schedule.workflow,
                "when": when,
                "paused": state.paused,
                "last_fired_ms": state.fired_ms,
                "next_ms": None if state.paused else next_tick(schedule, now),
                "overlap": schedule.overlap,
                "catch_up": schedule.catch_up,
            }
        )
    return now, rows


async def find(redis: Redis, keys: Keys, name: str) -> tuple[ScheduleState, int]:
    """The recorded schedule `name` and Redis's time; raises `UnknownSchedule`."""
    states = ScheduleStates(redis, keys)
    found = await states.read()
    state = found.get(name)
    if state is None or not state.spec:
        raise UnknownSchedule(name, sorted(n for n, s in found.items() if s.spec))
    return state, await states.now_ms()


def tick_request(schedule: Schedule, tick_ms: int, now_ms: int) -> RequestEvent:
    """The request of one tick (as the scheduler fires it: same id, so it runs once)."""
    return RequestEvent(
        request_id=request_id(schedule.name, tick_ms),
        workflow=schedule.workflow,
        payload=schedule.render(tick_ms),
        created_ms=now_ms,
    )


def manual_request(schedule: Schedule, now_ms: int) -> RequestEvent:
    """A fire outside the ticks (`trigger`): a new run each time."""
    return RequestEvent(
        request_id=f"schedule.{schedule.name}.now.{now_ms}",
        workflow=schedule.workflow,
        payload=schedule.render(now_ms),
        created_ms=now_ms,
    )
