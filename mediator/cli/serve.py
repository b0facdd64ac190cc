"""Commands that run things: `dev`, `run`, `demo-services`, `submit`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator import logs
from mediator.cli.common import ConfigOption, fail, load, quiet_libraries
from mediator.cli.common import run as run_coroutine
from mediator.errors import MediatorError

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


def dev(
    requests: Annotated[
        int | None, typer.Option("--requests", "-n", help="Exit after this many orders.")
    ] = None,
    rate: Annotated[float, typer.Option(help="Orders submitted per second.")] = 10.0,
    workflows: Annotated[
        list[Path] | None, typer.Option("--workflows", "-w", help="Extra workflow files.")
    ] = None,
    redis: Annotated[
        str,
        typer.Option(
            "--redis",
            help="standalone: one embedded Redis; cluster: an embedded Redis Cluster "
            "(3 primaries, 3 replicas).",
        ),
    ] = "standalone",
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
    mode = redis.strip().lower()
    if mode not in ("standalone", "cluster"):
        msg = f"unknown --redis {redis!r}; use standalone or cluster"
        raise fail(msg)
    with contextlib.suppress(KeyboardInterrupt):
        run_coroutine(
            run_dev(
                requests=requests,
                rate=rate,
                workflows=workflows or [],
                echo=typer.echo,
                redis_mode=mode,
            ),
            "auto",
        )


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
    from mediator.replica import Mediator

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


def submit(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    payload: Annotated[str, typer.Argument(help="JSON object, or @file.json.")] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    request_id: Annotated[str | None, typer.Option(help="Idempotency key (default: new).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 30.0,
    config: ConfigOption = None,
) -> None:
    """Publish a request; with --wait, print the result as JSON (exit 1 unless it completed:
    failed, cancelled or compensation_failed)."""
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

    async with MediatorClient.from_settings(settings) as client:
        if not wait:
            await client.publish(workflow, data, request_id=rid)
            return rid, False
        result = await client.submit(workflow, data, request_id=rid, timeout=wait_s)
        from topics.events import WorkflowStatus

        ended = result.status is not WorkflowStatus.COMPLETED
        return result.model_dump_json(indent=2, exclude_none=True), ended
