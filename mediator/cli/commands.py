"""The `mediator` command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from mediator import logs
from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries
from mediator.cli.common import run as run_coroutine
from mediator.errors import MediatorError

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="mediator",
    help="Event-driven service orchestrator over Kafka, with its state in Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: log_level)."
    ),
]
LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="text, or json: one object per line with workflow_id, step, attempt and "
        "trace_id as fields (default: log_format).",
    ),
]


def _log_to_stderr(level: str, log_format: str = "text") -> None:
    """Log at `level` (a name in any case, or a number) as `log_format`, or exit 2 naming
    the valid choices."""
    value = logs.level_of(level)
    if value is None:
        msg = (
            f"unknown log level {level!r}; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
            "(--log-level, MEDIATOR_LOG_LEVEL or log_level in the config file)"
        )
        raise fail(msg)
    if log_format.strip().lower() not in ("text", "json"):
        msg = (
            f"unknown log format {log_format!r}; use text or json "
            "(--log-format, MEDIATOR_LOG_FORMAT or log_format in the config file)"
        )
        raise fail(msg)
    logs.configure(value, log_format.strip().lower())


@app.command()
def dev(
    requests: Annotated[
        int | None, typer.Option("--requests", "-n", help="Exit after this many orders.")
    ] = None,
    rate: Annotated[float, typer.Option(help="Orders submitted per second.")] = 10.0,
    workflows: Annotated[
        list[Path] | None, typer.Option("--workflows", "-w", help="Extra workflow files.")
    ] = None,
) -> None:
    """Run everything on an embedded broker and Redis: mediator, demo services, sample orders."""
    from mediator.cli.dev import run_dev

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Group joins on start-up are routine here; aiokafka reports them as warnings.
    logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.ERROR)
    # The demo narrates breaker changes itself (`FaultWatch`), so their warnings would repeat it.
    logging.getLogger("mediator.breakers").setLevel(logging.ERROR)
    if rate <= 0:
        msg = "--rate must be positive"
        raise fail(msg)
    with contextlib.suppress(KeyboardInterrupt):
        run_coroutine(
            run_dev(requests=requests, rate=rate, workflows=workflows or [], echo=typer.echo),
            "auto",
        )


@app.command()
def run(
    config: ConfigOption = None,
    workflows: Annotated[
        list[Path] | None, typer.Option("--workflows", "-w", help="Workflow files or folders.")
    ] = None,
    create_topics: Annotated[
        bool, typer.Option(help="Create the mediator's and services' topics first.")
    ] = False,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run one mediator replica against the configured Kafka and Redis until stopped."""
    settings = load(config, **({"workflows": workflows} if workflows else {}))
    _log_to_stderr(log_level or settings.log_level, log_format or settings.log_format)
    run_coroutine(_serve(settings, create_topics), settings.event_loop)


async def _serve(settings: Any, create: bool) -> None:
    from mediator.cli.dev import service_names
    from mediator.cli.infra import create_topics
    from mediator.definitions import load_paths
    from mediator.runtime.app import Mediator

    if not settings.workflows:
        msg = "no workflows configured: pass --workflows PATH or set MEDIATOR_WORKFLOWS"
        raise MediatorError(msg)
    definitions = load_paths(settings.workflows)
    if create:
        topics = settings.kafka.topics
        await create_topics(
            settings.kafka,
            [*topics.mediator_topics(), *(topics.service(s) for s in service_names(definitions))],
            partitions=settings.kafka.partitions,
            replication_factor=settings.kafka.replication_factor,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Mediator(settings, definitions):
        await stop.wait()


@app.command("demo-services")
def demo_services_command(
    config: ConfigOption = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run the demo order saga's services against the configured Kafka until stopped."""
    settings = load(config)
    _log_to_stderr(log_level or settings.log_level, log_format or settings.log_format)
    run_coroutine(_services(settings), settings.event_loop)


async def _services(settings: Any) -> None:
    from mediator.cli.demo import demo_services

    kafka = settings.kafka
    workers = demo_services(
        kafka,
        kafka.topics,
        enable_idempotence=kafka.enable_idempotence,
        consumer_options=kafka.consumer_options(),
        signing=settings.signing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        typer.echo(f"demo services up: {', '.join(w.service for w in workers)}")
        await stop.wait()


def _control(
    action: str,
    config: Path | None,
    workflow_id: str | None,
    service: str | None,
    reason: str,
    instance: str | None = None,
) -> None:
    from mediator.ops.control import control_signer, send_control
    from topics.events import ControlAction

    settings = load(config)
    quiet_libraries()
    kafka = settings.kafka
    try:
        signer = control_signer(settings.signing)
    except MediatorError as exc:
        raise fail(str(exc)) from None
    sent = run_coroutine(
        send_control(
            kafka,
            kafka.topics,
            ControlAction(action),
            workflow_id=workflow_id,
            service=service,
            instance=instance,
            reason=reason or None,
            enable_idempotence=kafka.enable_idempotence,
            signer=signer,
        )
    )
    target = workflow_id or (f"{service} {instance}" if instance else service)
    typer.echo(f"{action} {target}: sent to {kafka.topics.control} as {sent.control_id}")


ReasonOption = Annotated[str, typer.Option("--reason", help="Why (kept in the run's error).")]


@app.command()
def cancel(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id.")],
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Cancel a running run: its completed steps are compensated, then it ends cancelled."""
    _control("cancel", config, workflow_id, None, reason)


@app.command()
def retry(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id.")],
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Run a failed or cancelled run again from its unfinished steps, keeping outputs."""
    _control("retry", config, workflow_id, None, reason)


@app.command()
def drain(
    service: Annotated[str, typer.Argument(help="The instance's service.")],
    instance: Annotated[str, typer.Argument(help="The instance id (see `mediator services`).")],
    undo: Annotated[
        bool, typer.Option("--undo", help="Route commands to it again instead.")
    ] = False,
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Route no new command to one instance while those in flight finish (or, with
    --undo, route to it again). It stays drained until it leaves or is marked down."""
    _control("undrain" if undo else "drain", config, None, service, reason, instance)


breaker_app = typer.Typer(help="Circuit breakers: list them, reset one.", no_args_is_help=True)
app.add_typer(breaker_app, name="breaker")


@breaker_app.command("reset")
def breaker_reset(
    service: Annotated[str, typer.Argument(help="The service whose breaker to close.")],
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Close a service's breaker now; its parked steps drain at the configured rate."""
    _control("reset_breaker", config, None, service, reason)


@breaker_app.command("list")
def breaker_list(
    json_output: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Every service's breaker state and parked backlog, from Redis."""
    settings = load(config)
    quiet_libraries()
    states = run_coroutine(_breakers(settings))
    if json_output:
        typer.echo(orjson.dumps(states, option=orjson.OPT_INDENT_2).decode())
        return
    if not states:
        typer.echo("no breaker has recorded anything yet")
    for name, row in states.items():
        typer.echo(
            f"{name:<20} {row['state']:<10} failures {row['failures']:<4} "
            f"parked {row.get('parked', 0)}"
        )


async def _breakers(settings: Any) -> dict[str, Any]:
    from mediator.ops.control import breaker_states
    from mediator.ops.status import stored_keys
    from mediator.storage.connection import connect_to
    from mediator.storage.parked import parked_counts

    redis = connect_to(settings.redis)
    try:
        keys = await stored_keys(redis, settings.redis.key_prefix, settings.redis.shards)
        states = await breaker_states(redis, keys)
        for service, count in (await parked_counts(redis, keys, states)).items():
            states[service]["parked"] = count
        return states
    finally:
        await redis.aclose()


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    payload: Annotated[str, typer.Argument(help="JSON object, or @file.json.")] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key (default: new).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 30.0,
    config: ConfigOption = None,
) -> None:
    """Publish a request; with --wait, print the result as JSON (exit 1 if it failed)."""
    text = payload
    if payload.startswith("@"):
        try:
            text = Path(payload[1:]).read_text()
        except OSError as exc:
            msg = f"cannot read payload file {payload[1:]!r}: {exc.strerror}"
            raise fail(msg) from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        msg = f"payload is not valid JSON: {exc}"
        raise fail(msg) from None
    if not isinstance(data, dict):
        msg = "payload must be a JSON object"
        raise fail(msg)
    settings = load(config)
    quiet_libraries()
    rid = request_id or uuid.uuid4().hex
    output, failed = run_coroutine(_submit(settings, workflow, data, rid, wait, timeout))
    typer.echo(output)
    if failed:
        raise typer.Exit(code=1)


async def _submit(
    settings: Any, workflow: str, data: dict[str, Any], rid: str, wait: bool, wait_s: float
) -> tuple[str, bool]:
    from mediator.sdk.client import MediatorClient

    kafka = settings.kafka
    async with MediatorClient(
        kafka,
        keys=settings.signing.request_signer(),
        topics=kafka.topics,
        enable_idempotence=kafka.enable_idempotence,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    ) as client:
        if not wait:
            await client.publish(workflow, data, request_id=rid)
            return rid, False
        result = await client.submit(workflow, data, request_id=rid, timeout=wait_s)
        return result.model_dump_json(indent=2, exclude_none=True), result.status == "failed"


@app.command()
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
    from mediator.ops.status import collect_status, stored_keys
    from mediator.storage.connection import connect_to

    redis = connect_to(settings.redis)
    try:
        # The layout the prefix was written with, which `mediator dev` may have chosen.
        keys = await stored_keys(redis, settings.redis.key_prefix, settings.redis.shards)
        return await collect_status(redis, keys, limit=limit)
    finally:
        await redis.aclose()


@app.command()
def services(json_output: JsonOption = False, config: ConfigOption = None) -> None:
    """Service instances from the registry: health, last heartbeat, load, breaker, parked."""
    from mediator.ops.services import format_services

    settings = load(config)
    quiet_libraries()
    found = run_coroutine(_services_view(settings))
    if json_output:
        typer.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(format_services(found))


async def _services_view(settings: Any) -> dict[str, Any]:
    from mediator.ops.services import collect_services
    from mediator.ops.status import stored_keys
    from mediator.storage.connection import connect_to

    redis = connect_to(settings.redis)
    try:
        keys = await stored_keys(redis, settings.redis.key_prefix, settings.redis.shards)
        return await collect_services(redis, keys)
    finally:
        await redis.aclose()


@app.command()
def recover(
    since: Annotated[
        str,
        typer.Option(
            help="Start of the window: ISO-8601 (UTC unless it has an offset, e.g. "
            "2026-11-22T14:00:00Z) or a duration ago (90s, 15m, 2h, 1d)."
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(help="End of the window, same forms (default: the topic's end now)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what is missing; publish nothing.")
    ] = False,
    json_output: JsonOption = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds any one wait on Kafka may take.", min=0.1)
    ] = 30.0,
    workflows: Annotated[
        list[Path] | None,
        typer.Option(
            "--workflows",
            "-w",
            help="Workflow files or folders (default: the workflows setting); requests for "
            "other workflows are counted, not re-published.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Re-publish the requests since a time whose runs Redis lost, and the replies since
    then that runs Redis rolled back still wait for; leave everything else."""
    from mediator import clock
    from mediator.errors import BadTime
    from mediator.ops.window import parse_time

    settings = load(config, **({"workflows": workflows} if workflows else {}))
    quiet_libraries()
    now = clock.now_ms()
    window: list[int | None] = []
    for option, text in (("--since", since), ("--until", until)):
        try:
            window.append(None if text is None else parse_time(text, now_ms=now))
        except BadTime as exc:
            msg = f"{option}: {exc}"
            raise fail(msg) from None
    since_ms, until_ms = window
    assert since_ms is not None
    report = run_coroutine(_recover(settings, since_ms, until_ms, dry_run, timeout))
    if json_output:
        typer.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
        return
    outcome = (
        f"missing {report.missing} (dry run: nothing published)"
        if dry_run
        else f"re-published {report.republished}"
    )
    others = (("repeated", report.repeated), ("unknown workflow", report.unknown_workflow))
    extra = "".join(f"  {label} {n}" for label, n in others if n)
    typer.echo(
        f"{report.topic} ({report.partitions} partitions with records in the window): "
        f"scanned {report.scanned}  already present {report.present}  {outcome}  "
        f"undecodable {report.undecodable}{extra}"
    )
    replies = (
        f"awaited {report.replies_awaited} (dry run: nothing published)"
        if dry_run
        else f"re-published {report.replies_republished}"
    )
    typer.echo(
        f"{settings.kafka.topics.replies}: scanned {report.replies_scanned}  waited for by a "
        f"live run and {replies}"
    )


async def _recover(
    settings: Any, since_ms: int, until_ms: int | None, dry_run: bool, timeout_s: float
) -> Any:
    from mediator.definitions import load_paths
    from mediator.ops.recover import recover

    names = load_paths(settings.workflows).names() if settings.workflows else None
    return await recover(
        settings,
        since_ms=since_ms,
        until_ms=until_ms,
        dry_run=dry_run,
        workflows=names,
        timeout_s=timeout_s,
    )


@app.command()
def validate(
    paths: Annotated[list[Path], typer.Argument(help="Workflow YAML files or folders.")],
) -> None:
    """Check workflow definitions; exit 2 with the first error, naming file, workflow, step."""
    from mediator.definitions import Definitions, load_file, workflow_files

    definitions = Definitions()  # also catches one name and version defined twice
    for file in (f for path in paths for f in workflow_files(path)):
        try:
            for wf in load_file(file):
                definitions.add(wf, source=str(file))
                typer.echo(f"ok: {file}: {wf.key} ({len(wf.steps)} steps)")
        except MediatorError as exc:
            raise fail(str(exc)) from None


@app.command()
def schemas() -> None:
    """Print the JSON Schema of every event on the wire."""
    from topics import json_schemas

    typer.echo(orjson.dumps(json_schemas(), option=orjson.OPT_INDENT_2).decode())


def _add_groups() -> None:
    from mediator.cli.dlq import dlq_app
    from mediator.cli.workflows import dashboard_command, workflows_app

    app.add_typer(dlq_app, name="dlq")
    app.add_typer(workflows_app, name="workflows")
    app.command("dashboard")(dashboard_command)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"mediator {version('kafka-mediator')}")
        except PackageNotFoundError:
            typer.echo("mediator (not installed)")
        raise typer.Exit


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Event-driven service orchestrator over Kafka, with its state in Redis."""


_add_groups()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
