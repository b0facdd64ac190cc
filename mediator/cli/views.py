"""Commands that read: `status`, `services`, `validate`, `schemas`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, load, quiet_libraries, redis_session
from mediator.cli.common import run as run_coroutine
from mediator.errors import MediatorError


def status(
    json_output: JsonOption = False,
    limit: Annotated[int, typer.Option(help="How many recent workflows to list.")] = 10,
    config: ConfigOption = None,
) -> None:
    """Workflow counts, per-workflow and per-service counters, and recent runs, from Redis."""
    from mediator.ops.status import format_stats

    settings = load(config)
    quiet_libraries()
    summary = run_coroutine(_status(settings, limit))
    if json_output:
        typer.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return
    counts = summary["counts"]
    typer.echo(
        f"running {counts['running']}  completed {counts['completed']}  failed {counts['failed']}"
        f"  outbox pending {summary['outbox_pending']}"
    )
    if summary["stats"]:
        typer.echo(format_stats(summary["stats"]))
    for name, values in summary["workflows"].items():
        typer.echo(f"workflow {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(values.items())))
    for name, values in summary["services"].items():
        typer.echo(f"service  {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(values.items())))
    for row in summary["recent"]:
        typer.echo(f"  {row['workflow_id']}  {row['workflow']:<16} {row['status']}")


async def _status(settings: Any, limit: int) -> dict[str, Any]:
    from mediator.ops.status import collect_status

    # The layout the prefix was written with, which `mediator dev` may have chosen.
    async with redis_session(settings) as (redis, keys):
        return await collect_status(redis, keys, limit=limit)


def services(json_output: JsonOption = False, config: ConfigOption = None) -> None:
    """Service instances from the registry: health, last heartbeat, load, breaker, parked,
    flow-control limits; then workflows' concurrency keys and their queues."""
    from mediator.ops.services import format_keys, format_services

    settings = load(config)
    quiet_libraries()
    found, concurrency = run_coroutine(_services_view(settings))
    if json_output:  # the concurrency keys' JSON is `mediator keys --json`'s
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(format_services(found))
        if concurrency["workflows"]:
            typer.echo(format_keys(concurrency))


def concurrency_keys(json_output: JsonOption = False, config: ConfigOption = None) -> None:
    """Workflows' concurrency keys: runs in progress and queued per workflow, and the
    keys with the longest queues, with how long their oldest run has waited."""
    from mediator.ops.services import format_keys

    settings = load(config)
    quiet_libraries()
    found = run_coroutine(_keys_view(settings))
    if json_output:
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(format_keys(found) or "no run holds or waits for a concurrency key's slot")


async def _keys_view(settings: Any) -> dict[str, Any]:
    from mediator.ops.services import collect_keys

    async with redis_session(settings) as (redis, keys):
        return await collect_keys(redis, keys)


async def _services_view(settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from mediator.ops.services import collect_keys, collect_services

    async with redis_session(settings) as (redis, keys):
        return await collect_services(redis, keys), await collect_keys(redis, keys)


def validate(
    paths: Annotated[list[Path], typer.Argument(help="Workflow YAML files or folders.")],
) -> None:
    """Check workflow definitions: every problem of every file, each with its file, line,
    workflow and step (exit 2 if there is any)."""
    from mediator.definitions import Definitions, workflow_files
    from mediator.linting import check_file

    definitions = Definitions()  # also catches one name and version defined twice
    problems = 0
    for file in (f for path in paths for f in workflow_files(path)):
        workflows, found = check_file(file)
        for problem in found:
            typer.echo(f"error: {problem}", err=True)
        problems += len(found)
        for wf in workflows:
            try:
                definitions.add(wf, source=str(file))
            except MediatorError as exc:
                typer.echo(f"error: {exc}", err=True)
                problems += 1
                continue
            count = len(wf.steps)
            typer.echo(f"ok: {file}: {wf.key} ({count} step{'s' if count != 1 else ''})")
    try:
        definitions.check_children()  # across files: what child steps run, and no cycle
    except MediatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        problems += 1
    if problems:
        if problems > 1:
            typer.echo(f"{problems} problems found", err=True)
        raise typer.Exit(code=2)


def schemas() -> None:
    """Print the JSON Schema of every event on the wire."""
    from topics import json_schemas

    typer.echo(orjson.dumps(json_schemas(), option=orjson.OPT_INDENT_2).decode())
