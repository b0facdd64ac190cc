"""Schedules' state in Redis (`Keys.schedules`): the last tick each one saw and fired,
whether it is paused, and its spec as loaded. Moving a schedule on is a compare-and-set
(``schedule_advance.lua``), so of two replicas looking at the same tick one moves it on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.core.schedules import Schedule
from mediator.errors import StateUnavailable
from mediator.storage.connection import lua_source, text
from mediator.storage.errors import REDIS_ERRORS
from mediator.storage.keys import Keys

__all__ = ["ScheduleState", "ScheduleStates"]

_ADVANCE = lua_source("schedule_advance.lua")
_PUBLISH = lua_source("schedule_publish.lua")


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """One schedule as Redis holds it."""

    name: str
    last_ms: int | None
    fired_ms: int | None
    paused: bool
    spec: dict[str, Any]


class ScheduleStates:
    """Reads and moves on the schedules' state."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.key = keys.schedules
        self._advance = redis.register_script(_ADVANCE)
        self._publish = redis.register_script(_PUBLISH)

    async def now_ms(self) -> int:
        """Redis's clock: every replica reads ticks on it."""
        seconds, micros = await self._call(self.redis.time(), "reading the clock")
        return int(seconds) * 1000 + int(micros) // 1000

    async def publish(self, schedules: Iterable[Schedule]) -> list[str]:
        """Record the loaded schedules' specs (for the CLI and the dashboard); the names of
        those whose spec changed, which start again from their next look (their last tick
        is forgotten, so ticks of the old spec are not caught up under the new)."""
        args: list[Any] = []
        for schedule in schedules:
            args += [schedule.name, orjson.dumps(dict(schedule.spec), option=orjson.OPT_SORT_KEYS)]
        if not args:
            return []
        changed = await self._call(self._publish(keys=[self.key], args=args), "publishing specs")
        return [text(name) for name in changed]

    async def read(self) -> dict[str, ScheduleState]:
        """Every schedule Redis knows of."""
        raw = await self._call(self.redis.hgetall(self.key), "reading schedules")
        fields = {text(k): text(v) for k, v in raw.items()}
        names = {k.rsplit(":", 1)[0] for k in fields}
        return {
            name: ScheduleState(
                name=name,
                last_ms=_int(fields.get(f"{name}:last")),
                fired_ms=_int(fields.get(f"{name}:fired")),
                paused=fields.get(f"{name}:paused") == "1",
                spec=orjson.loads(fields[f"{name}:spec"]) if f"{name}:spec" in fields else {},
            )
            for name in sorted(names)
        }

    async def start(self, name: str, now_ms: int) -> None:
        """A schedule seen for the first time starts at `now_ms`: no tick before it fires."""
        await self._call(self.redis.hsetnx(self.key, f"{name}:last", now_ms), "starting")

    async def advance(
        self, name: str, last_ms: int | None, to_ms: int, fired_ms: int | None
    ) -> bool:
        """Move `name` on from `last_ms` (as read) to `to_ms`; False if another replica
        moved it first."""
        args = [
            name,
            "" if last_ms is None else last_ms,
            to_ms,
            "" if fired_ms is None else fired_ms,
        ]
        done = await self._call(self._advance(keys=[self.key], args=args), "moving on")
        return bool(done)

    async def set_paused(self, name: str, paused: bool) -> None:
        """Pause a schedule (no tick fires while paused; missed ticks are not caught up),
        or let it fire again."""
        if paused:
            await self._call(self.redis.hset(self.key, f"{name}:paused", "1"), "pausing")
        else:
            await self._call(self.redis.hdel(self.key, f"{name}:paused"), "resuming")

    async def _call(self, awaitable: Any, what: str) -> Any:
        try:
            return await awaitable
        except REDIS_ERRORS as exc:
            msg = f"Redis unavailable while {what} (schedules): {exc}"
            raise StateUnavailable(msg) from exc


def _int(value: str | None) -> int | None:
    return int(value) if value else None
