"""`mediator schedules`: list the schedules the replicas loaded, pause and resume one, fire
one now, and backfill the ticks of a time window."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
import typer
from redis.asyncio import Redis

from mediator.cli.common import (
    ConfigOption,
    JsonOption,
    fail,
    load,
    quiet_libraries,
    redis_session,
    run,
)
from mediator.errors import MediatorError
from mediator.storage.keys import Keys

__all__ = ["schedules_app"]

T = TypeVar("T")

schedules_app = typer.Typer(
    help="Schedules: list them, pause or resume one, fire one now, backfill a window.",
    no_args_is_help=True,
)

NameArgument = Annotated[str, typer.Argument(help="The schedule's name.")]

#: The most ticks one backfill publishes.
MAX_BACKFILL = 1_000


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _with_redis(settings: Any, work: Callable[[Redis, Keys], Awaitable[T]]) -> T:
    async def go() -> T:
        async with redis_session(settings) as (redis, keys):
            return await work(redis, keys)

    return run(go())


@schedules_app.command("list")
def list_command(json_output: JsonOption = False, config: ConfigOption = None) -> None:
    """Every schedule a replica loaded: its workflow, when, its last and next tick."""
    from mediator.ops.schedules import schedule_rows

    settings = load(config)
    quiet_libraries()
    _, rows = _with_redis(settings, schedule_rows)
    if json_output:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        typer.echo("no schedules (a replica records those it loads when it starts)")
    for row in rows:
        status = "paused" if row["paused"] else "active"
        typer.echo(
            f"{row['name']:<20} {row['workflow']:<20} {row['when']:<28} {status:<7} "
            f"last {_when(row['last_fired_ms'])}  next {_when(row['next_ms'])}"
        )


@schedules_app.command("pause")
def pause_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Stop firing a schedule (ticks missed while paused are not caught up)."""
    _set_paused(name, True, config)


@schedules_app.command("resume")
def resume_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Fire a paused schedule's ticks again, from the next one."""
    _set_paused(name, False, config)


def _set_paused(name: str, paused: bool, config: Any) -> None:
    from mediator.ops.schedules import find
    from mediator.storage.schedules import ScheduleStates

    settings = load(config)
    quiet_libraries()

    async def apply(redis: Redis, keys: Keys) -> None:
        await find(redis, keys, name)
        await ScheduleStates(redis, keys).set_paused(name, paused)

    _with_redis(settings, apply)
    typer.echo(f"schedule {name} {'paused' if paused else 'resumed'}")


@schedules_app.command("trigger")
def trigger_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Fire a schedule now, outside its ticks (a new run each time)."""
    from mediator.ops.schedules import compiled, find, manual_request

    settings = load(config)
    quiet_libraries()
    state, now = _with_redis(settings, lambda redis, keys: find(redis, keys, name))
    try:
        request = manual_request(compiled(state), now)
    except MediatorError as exc:  # its payload does not render, say
        msg = f"schedule {name}: {exc}"
        raise fail(msg) from None
    run(_publish(settings, [request]))
    typer.echo(f"schedule {name}: fired now as {request.request_id}")


@schedules_app.command("backfill")
def backfill_command(
    name: NameArgument,
    since: Annotated[str, typer.Option(help="From (epoch ms, ISO time or an age: 2h).")],
    until: Annotated[str | None, typer.Option(help="Until (same forms; default now).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the count, and stop.")] = False,
    config: ConfigOption = None,
) -> None:
    """Fire every tick of a window, each as the request its tick would have been: a tick
    that already fired is not run again."""
    from mediator.core.schedules import ticks_between
    from mediator.ops.schedules import compiled, find, tick_request
    from mediator.ops.window import parse_moment

    settings = load(config)
    quiet_libraries()
    state, now = _with_redis(settings, lambda redis, keys: find(redis, keys, name))
    schedule = compiled(state)
    try:
        since_ms = parse_moment(since, now_ms=now)
        until_ms = parse_moment(until, now_ms=now) if until else now
    except ValueError as exc:
        raise fail(str(exc)) from None
    assert since_ms is not None and until_ms is not None
    if until_ms > now:
        msg = "backfill fires ticks that are due: --until cannot be in the future"
        raise fail(msg)
    ticks = ticks_between(schedule, since_ms - 1, until_ms)
    if len(ticks) > MAX_BACKFILL:
        msg = f"{len(ticks)} ticks in that window; backfill at most {MAX_BACKFILL} at a time"
        raise fail(msg)
    if dry_run:
        typer.echo(f"schedule {name}: {len(ticks)} ticks in the window")
        return
    try:
        requests = [tick_request(schedule, tick, now) for tick in ticks]
    except MediatorError as exc:
        msg = f"schedule {name}: {exc}"
        raise fail(msg) from None
    run(_publish(settings, requests))
    typer.echo(f"schedule {name}: {len(ticks)} ticks fired (those already run are not again)")


async def _publish(settings: Any, requests: list[Any]) -> None:
    from mediator.sdk.client import MediatorClient

    async with MediatorClient.from_settings(settings) as client:
        for request in requests:
            await client.publish(request.workflow, request.payload, request_id=request.request_id)
