"""Schedules (pure): a workflow started on a cron expression or at a fixed interval.

A schedule's ticks are instants on Redis's clock: for ``every: 10m``, the multiples of ten
minutes since the epoch; for ``cron``, the times the expression matches in the schedule's
time zone (`cronsim`, daylight saving included). Each tick fires one request whose id is
derived from the schedule and the tick (`request_id`), so the same tick fired twice, by two
replicas or after a restart, is one run (requests are idempotent by id).

What fires after a gap (the mediator stopped, every replica down) is the schedule's
``catch_up``: ``none`` fires only a tick no older than the grace period, ``one`` the latest
missed tick, ``all`` every missed tick, the latest ``max_catch_up`` of them. What fires
while the previous fire's run is still going is its ``overlap``: ``skip`` this tick,
``allow`` it, or ``cancel_previous`` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mediator.core.durations import parse_duration_ms
from mediator.core.expressions import ExpressionError, Template
from mediator.errors import DefinitionError

__all__ = [
    "Plan",
    "Schedule",
    "ScheduleSpec",
    "parse_schedules",
    "plan",
    "request_id",
    "ticks_between",
]

#: How far back a cron schedule looks for missed ticks (a gap longer than this catches up
#: from its end).
LOOKBACK_MS = 35 * 24 * 3_600_000

#: Ticks looked at in one `ticks_between` call at most.
MAX_TICKS = 10_000


class ScheduleSpec(BaseModel):
    """A schedule as written in YAML (under ``schedules:``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="Unique name.")
    workflow: str = Field(description="The workflow each tick starts.")
    cron: str | None = Field(default=None, description="A cron expression (5 fields).")
    every: bool | float | str | None = Field(
        default=None, description="Or a fixed interval (``30s``, ``1h``): ticks at its multiples."
    )
    timezone: str = Field(default="UTC", description="The cron expression's time zone.")
    payload: Any = Field(
        default_factory=dict,
        description="The request's payload: a template like a step's `input`, evaluated "
        "against ``{schedule: {name, tick, tick_ms}}`` (literal strings in quotes: "
        "``\"'nightly'\"``).",
    )
    overlap: Literal["skip", "allow", "cancel_previous"] = Field(
        default="skip", description="When the previous fire's run is still going."
    )
    catch_up: Literal["none", "one", "all"] = Field(
        default="one", description="What fires after a gap in which ticks were missed."
    )
    max_catch_up: int = Field(
        default=10, ge=1, le=1_000, description="With ``catch_up: all``: at most this many."
    )

    @model_validator(mode="after")
    def _one_clock(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every is None):
            msg = "give exactly one of `cron` and `every`"
            raise ValueError(msg)
        return self


@dataclass(frozen=True, slots=True)
class Schedule:
    """A compiled schedule."""

    name: str
    workflow: str
    cron: str | None
    every_ms: int | None
    zone: ZoneInfo
    payload: Template
    overlap: str
    catch_up: str
    max_catch_up: int
    #: The spec as written (stored in Redis for the CLI and the dashboard).
    spec: Mapping[str, Any]

    def render(self, tick_ms: int) -> Any:
        """The payload of the request `tick_ms` fires."""
        tick = datetime.fromtimestamp(tick_ms / 1000, UTC).isoformat().replace("+00:00", "Z")
        return self.payload.render(
            {"schedule": {"name": self.name, "tick": tick, "tick_ms": tick_ms}}
        )


def request_id(name: str, tick_ms: int) -> str:
    """The id of the request schedule `name` fires for `tick_ms`: the same on every
    replica, so a tick fired twice starts one run."""
    return f"schedule.{name}.{tick_ms}"


def ticks_between(schedule: Schedule, after_ms: int, until_ms: int) -> list[int]:
    """The ticks in (`after_ms`, `until_ms`], oldest first; at most `MAX_TICKS` (the
    latest of them)."""
    if until_ms <= after_ms:
        return []
    if schedule.every_ms is not None:
        every = schedule.every_ms
        first = (after_ms // every + 1) * every
        last = until_ms // every * every
        if last < first:
            return []
        first = max(first, last - (MAX_TICKS - 1) * every)
        return list(range(first, last + 1, every))
    assert schedule.cron is not None
    start = max(after_ms, until_ms - LOOKBACK_MS)
    found: list[int] = []
    moments = CronSim(schedule.cron, datetime.fromtimestamp(start / 1000, schedule.zone))
    for moment in moments:
        tick = int(moment.timestamp() * 1000)
        if tick > until_ms:
            break
        found.append(tick)
        if len(found) > MAX_TICKS:
            found.pop(0)
    return found


def next_tick(schedule: Schedule, now_ms: int) -> int | None:
    """The first tick after `now_ms` (None when the cron expression never matches again)."""
    if schedule.every_ms is not None:
        return (now_ms // schedule.every_ms + 1) * schedule.every_ms
    assert schedule.cron is not None
    moments = CronSim(schedule.cron, datetime.fromtimestamp(now_ms / 1000, schedule.zone))
    moment = next(moments, None)
    return int(moment.timestamp() * 1000) if moment is not None else None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one look at a schedule fires: `fire` (ticks, oldest first), the tick it is
    then at (`last_ms`) and how many missed ticks it left out (`skipped`)."""

    fire: list[int]
    last_ms: int
    skipped: int


def plan(schedule: Schedule, last_ms: int, now_ms: int, grace_ms: int) -> Plan:
    """The ticks due since `last_ms` (the last tick seen), by the catch-up policy."""
    due = ticks_between(schedule, last_ms, now_ms)
    if not due:
        return Plan([], last_ms, 0)
    latest = due[-1]
    if schedule.catch_up == "all":
        fire = due[-schedule.max_catch_up :]
    elif schedule.catch_up == "one" or now_ms - latest <= grace_ms:
        fire = [latest]
    else:
        fire = []
    return Plan(fire, latest, len(due) - len(fire))


def parse_schedules(document: Any, source: str = "<memory>") -> list[Schedule]:
    """The schedules of one parsed YAML document (its ``schedules:`` list, if any)."""
    if not isinstance(document, Mapping) or "schedules" not in document:
        return []
    items = document["schedules"] or []
    if not isinstance(items, list):
        msg = "`schedules` must be a list of schedules"
        raise DefinitionError(msg, source=source)
    found = [_compile(item, index, source) for index, item in enumerate(items)]
    names = [s.name for s in found]
    for name in names:
        if names.count(name) > 1:
            msg = f"schedule {name!r} is defined twice"
            raise DefinitionError(msg, source=source)
    return found


def _compile(item: Any, index: int, source: str) -> Schedule:
    label = f"schedule {item.get('name', f'#{index}')!r}" if isinstance(item, Mapping) else ""
    try:
        spec = ScheduleSpec.model_validate(item)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        msg = f"{label or f'schedules[{index}]'}: {where}"
        raise DefinitionError(msg, source=source) from None
    try:
        zone = ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"{label}: unknown time zone {spec.timezone!r} (an IANA name, e.g. Europe/Paris)"
        raise DefinitionError(msg, source=source) from None
    every_ms = None
    if spec.every is not None:
        every_ms = parse_duration_ms(spec.every)
        if not every_ms or every_ms < 100:
            msg = f"{label}: every: {spec.every!r} is not a duration of at least 100ms"
            raise DefinitionError(msg, source=source)
    if spec.cron is not None:
        try:
            CronSim(spec.cron, datetime.now(zone))
        except CronSimError as exc:
            msg = f"{label}: cron {spec.cron!r}: {exc}"
            raise DefinitionError(msg, source=source) from None
    try:
        payload = Template.compile(spec.payload)
    except ExpressionError as exc:
        msg = f"{label}: payload: {exc}"
        raise DefinitionError(msg, source=source) from None
    return Schedule(
        name=spec.name,
        workflow=spec.workflow,
        cron=spec.cron,
        every_ms=every_ms,
        zone=zone,
        payload=payload,
        overlap=spec.overlap,
        catch_up=spec.catch_up,
        max_catch_up=spec.max_catch_up,
        spec=spec.model_dump(mode="json", exclude_defaults=True),
    )
