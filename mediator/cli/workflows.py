"""``mediator workflows``: list runs with filters, show one run in full; and
``mediator dashboard``, the web dashboard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

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
from mediator.ops.window import parse_moment

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from mediator.settings import Settings
    from mediator.storage.keys import Keys

__all__ = ["dashboard_command", "dashboard_site", "serve_dashboard", "workflows_app"]

workflows_app = typer.Typer(
    help="Workflow runs in Redis: list them with filters, show one.", no_args_is_help=True
)


def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _moment(text: str | None, now: int) -> int | None:
    """`parse_moment`, or exit 2 saying why not."""
    try:
        return parse_moment(text, now_ms=now)
    except MediatorError as exc:
        raise fail(str(exc)) from None


@workflows_app.command("list")
def list_command(
    status: Annotated[
        str | None,
        typer.Option(help="running, compensating, completed, failed, cancelled, ..."),
    ] = None,
    workflow: Annotated[str | None, typer.Option("--workflow", "-w", help="Workflow name.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Updated since: epoch ms, ISO time or an age (10m).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Updated until (same forms).")] = None,
    request_id: Annotated[str | None, typer.Option(help="The run of one request.")] = None,
    paused: Annotated[
        bool | None, typer.Option("--paused/--not-paused", help="Only paused runs (or not).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    json_output: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Runs matching the filters, newest first."""
    from mediator.clock import now_ms

    settings = load(config)
    quiet_libraries()
    now = now_ms()
    since_ms = _moment(since, now)
    until_ms = _moment(until, now)

    async def query() -> list[dict[str, Any]]:
        from mediator.ops.runs import list_runs

        async with redis_session(settings) as (redis, keys):
            return await list_runs(
                redis,
                keys,
                status=status,
                workflow=workflow,
                since_ms=since_ms,
                until_ms=until_ms,
                request_id=request_id,
                paused=paused,
                limit=limit,
            )

    runs = run(query())
    if json_output:
        typer.echo(orjson.dumps(runs, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("workflow id", "workflow", "status", "updated (UTC)", "steps", "error")
    for row in runs:
        done = sum(1 for s in row["steps"].values() if s == "completed")
        table.add_row(
            row["workflow_id"],
            row["workflow"],
            f"{row['status']}, paused" if row.get("paused_ms") else row["status"],
            _time(row["updated_ms"]),
            f"{done}/{len(row['steps'])}",
            row["error"] or "",
        )
    Console(width=160).print(table)
    typer.echo(f"{len(runs)} run" if len(runs) == 1 else f"{len(runs)} runs")


@workflows_app.command("show")
def show_command(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id, or its request id.")],
    json_output: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """One run: its status, every attempt of every step and of every compensation, and its
    audit log (timeline)."""
    settings = load(config)
    quiet_libraries()

    async def query() -> dict[str, Any] | None:
        from mediator.ops.runs import show_run
        from mediator.storage.keys import workflow_id_for

        async with redis_session(settings) as (redis, keys):
            found = await show_run(redis, keys, workflow_id)
            if found is None:  # a request id names its run too
                found = await show_run(redis, keys, workflow_id_for(workflow_id))
            return found

    found = run(query())
    if found is None:
        msg = f"no run {workflow_id!r} in Redis (no such run or request id, or expired)"
        raise fail(msg)
    if json_output:
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print(
        f"run {found['workflow_id']}  {found['workflow']} v{found['version']}  "
        f"[bold]{found['status']}[/bold]  request {found['request_id']}"
    )
    if found.get("paused_ms"):
        console.print(
            f"[bold]paused[/bold] since {_time(found['paused_ms'])}: nothing is sent until "
            f"`mediator resume {found['workflow_id']}`"
        )
    console.print(f"started {_time(found['created_ms'])}  finished {_time(found['finished_ms'])}")
    if found["error"]:
        console.print(f"error: {found['error'].get('message')}")
    if parent := found.get("parent"):
        console.print(
            f"parent: {parent['workflow_id']} (step {parent['step']}, attempt {parent['attempt']})"
        )
    for sid, runs in (found.get("children") or {}).items():
        for n, child in enumerate(runs, start=1):
            console.print(f"step {sid} attempt {n}: child run {child}")
    console.print(_steps_table(found))
    timeline = Table("time (UTC)", "event", "step", "attempt", "instance", "status after", "sent")
    for entry in found["audit"]:
        timeline.add_row(
            _time(entry.get("t")),
            entry.get("event", ""),
            entry.get("step") or "",
            str(entry.get("attempt") or ""),
            entry.get("instance") or "",
            entry.get("status") or "",
            ", ".join(f"{s['step']}#{s['attempt']}" for s in entry.get("sent", [])),
        )
    console.print(timeline)


def _steps_table(found: dict[str, Any]) -> Any:
    """Every attempt of every step, then of every compensation ("undo"), one row each:
    the service (the fallback's, if rerouted), instance, start, duration and error."""
    from rich.table import Table

    services = {s["id"]: s.get("service") for s in found["definition"]["steps"]}
    table = Table("step", "status", "attempt", "service", "instance", "started", "ms", "error")
    result = found["result"]
    for sid, step in result.get("steps", {}).items():
        service = step.get("service") or services.get(sid) or ""
        attempts = found["attempts"].get(sid) or [{"attempt": step.get("attempts") or ""}]
        for n, attempt in enumerate(attempts):
            status = step["status"] if n == len(attempts) - 1 else "failed"
            table.add_row(sid, status, *_attempt_cells(service, attempt))
    for sid, undo in result.get("compensations", {}).items():
        current = {
            "attempt": undo.get("attempts"),
            "instance": undo.get("instance"),
            "error": undo.get("error"),
            "ms": undo.get("duration_ms"),
        }
        attempts = [*undo.get("history", []), current]
        for n, attempt in enumerate(attempts):
            status = undo["status"] if n == len(attempts) - 1 else "failed"
            table.add_row(f"undo {sid}", status, *_attempt_cells(services.get(sid), attempt))
    return table


def _attempt_cells(service: str | None, attempt: dict[str, Any]) -> list[str]:
    started, finished = attempt.get("started_ms"), attempt.get("finished_ms")
    ms = attempt.get("ms")
    if ms is None and started is not None and finished is not None:
        ms = finished - started
    error = attempt.get("error") or {}
    return [
        str(attempt.get("attempt", "")),
        service or "",
        attempt.get("instance") or "",
        _time(started),
        "" if ms is None else str(ms),
        error.get("message", "") if isinstance(error, dict) else str(error),
    ]


def dashboard_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    config: ConfigOption = None,
) -> None:
    """The web dashboard: runs, services, metrics, alerts, dead letters and controls."""
    settings = load(config)
    quiet_libraries()
    run(serve_dashboard(settings, host, port, announce=typer.echo))


async def serve_dashboard(
    settings: Settings, host: str, port: int, announce: Any = None, ready: Any = None
) -> None:
    """Serve the dashboard until cancelled; `ready(url)` is called once it listens."""
    import asyncio

    async with (
        redis_session(settings) as (redis, keys),
        dashboard_site(settings, redis, keys, host, port) as url,
    ):
        if announce is not None:
            announce(f"dashboard on {url}")
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()


@asynccontextmanager
async def dashboard_site(
    settings: Settings, redis: Redis, keys: Keys, host: str, port: int
) -> AsyncIterator[str]:
    """The dashboard listening on `host`:`port` (0: a free port) while in the block; its URL."""
    from mediator.ops.dashboard import Dashboard
    from mediator.runtime.endpoints import listen

    try:
        runner, bound = await listen(Dashboard(settings, redis, keys, host).app, host, port)
    except OSError as exc:
        msg = f"cannot listen on {host}:{port}: {exc}"
        raise fail(msg) from None
    except MediatorError as exc:
        raise fail(str(exc)) from None
    try:
        yield f"http://{host}:{bound}/"
    finally:
        await runner.cleanup()
