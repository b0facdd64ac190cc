"""`mediator schedules`: list the schedules the replicas loaded, pause and resume one, fire
one now, and backfill the ticks of a time window."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries, run

__all__ = ["schedules_app"]

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


async def _states(settings: Any) -> dict[str, Any]:
    from mediator.storage.connection import connect_to
    from mediator.storage.keys import Keys
    from mediator.storage.schedules import ScheduleStates

    redis = connect_to(settings.redis)
    try:
        states = ScheduleStates(redis, Keys(settings.redis.key_prefix, settings.redis.shards))
        return {"now_ms": await states.now_ms(), "states": await states.read()}
    finally:
        await redis.aclose()


def _compiled(state: Any) -> Any:
    """The schedule as the replicas loaded it (from its stored spec)."""
    from mediator.core.schedules import parse_schedules
    from mediator.errors import DefinitionError

    try:
        return parse_schedules({"schedules": [state.spec]})[0]
    except DefinitionError as exc:
        msg = f"schedule {state.name!r} as stored cannot be read: {exc}"
        raise fail(msg) from None


def _one(settings: Any, name: str) -> tuple[Any, int]:
    found = run(_states(settings))
    state = found["states"].get(name)
    if state is None or not state.spec:
        known = sorted(n for n, s in found["states"].items() if s.spec)
        msg = f"no schedule {name!r} (a replica that loaded it records it); known: {known}"
        raise fail(msg)
    return state, found["now_ms"]


@schedules_app.command("list")
def list_command(json_output: JsonOption = False, config: ConfigOption = None) -> None:
    """Every schedule a replica loaded: its workflow, when, its last and next tick."""
    from mediator.core.schedules import next_tick

    settings = load(config)
    quiet_libraries()
    found = run(_states(settings))
    rows = []
    for name, state in found["states"].items():
        if not state.spec:
            continue
        schedule = _compiled(state)
        spec = state.spec
        rows.append(
            {
                "name": name,
                "workflow": schedule.workflow,
                "when": f"cron {spec['cron']} {spec.get('timezone', 'UTC')}"
                if spec.get("cron")
                else f"every {spec['every']}",
                "paused": state.paused,
                "last_fired_ms": state.fired_ms,
                "next_ms": None if state.paused else next_tick(schedule, found["now_ms"]),
            }
        )
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
    from mediator.storage.connection import connect_to
    from mediator.storage.keys import Keys
    from mediator.storage.schedules import ScheduleStates

    settings = load(config)
    quiet_libraries()
    _one(settings, name)

    async def apply() -> None:
        redis = connect_to(settings.redis)
        try:
            keys = Keys(settings.redis.key_prefix, settings.redis.shards)
            await ScheduleStates(redis, keys).set_paused(name, paused)
        finally:
            await redis.aclose()

    run(apply())
    typer.echo(f"schedule {name} {'paused' if paused else 'resumed'}")


@schedules_app.command("trigger")
def trigger_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Fire a schedule now, outside its ticks (a new run each time)."""
    settings = load(config)
    quiet_libraries()
    state, now = _one(settings, name)
    schedule = _compiled(state)
    request_id = f"schedule.{name}.now.{now}"
    run(_publish(settings, schedule, [(request_id, now)]))
    typer.echo(f"schedule {name}: fired now as {request_id}")


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
    from mediator.core.schedules import request_id, ticks_between
    from mediator.ops.window import parse_moment

    settings = load(config)
    quiet_libraries()
    state, now = _one(settings, name)
    schedule = _compiled(state)
    try:
        since_ms = parse_moment(since, now_ms=now)
        until_ms = parse_moment(until, now_ms=now) if until else now
    except ValueError as exc:
        raise fail(str(exc)) from None
    assert since_ms is not None and until_ms is not None
    ticks = ticks_between(schedule, since_ms - 1, until_ms)
    if len(ticks) > MAX_BACKFILL:
        msg = f"{len(ticks)} ticks in that window; backfill at most {MAX_BACKFILL} at a time"
        raise fail(msg)
    if dry_run:
        typer.echo(f"schedule {name}: {len(ticks)} ticks in the window")
        return
    run(_publish(settings, schedule, [(request_id(name, tick), tick) for tick in ticks]))
    typer.echo(f"schedule {name}: {len(ticks)} ticks fired (those already run are not again)")


async def _publish(settings: Any, schedule: Any, requests: list[tuple[str, int]]) -> None:
    from mediator.core.expressions import ExpressionError
    from mediator.errors import MediatorError
    from mediator.sdk.client import MediatorClient

    try:
        payloads = [(rid, schedule.render(tick)) for rid, tick in requests]
    except ExpressionError as exc:
        msg = f"schedule {schedule.name}: payload: {exc}"
        raise MediatorError(msg) from None
    async with MediatorClient.from_settings(settings) as client:
        for rid, payload in payloads:
            await client.publish(schedule.workflow, payload, request_id=rid)
