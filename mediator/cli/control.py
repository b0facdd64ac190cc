"""Operators' controls from the command line: `cancel`, `retry`, `drain`, `breaker`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries
from mediator.cli.common import run as run_coroutine
from mediator.errors import MediatorError


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


def cancel(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id.")],
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Cancel a running run: its completed steps are compensated, then it ends cancelled."""
    _control("cancel", config, workflow_id, None, reason)


def retry(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id.")],
    reason: ReasonOption = "",
    config: ConfigOption = None,
) -> None:
    """Run a failed or cancelled run again from its unfinished steps, keeping outputs."""
    _control("retry", config, workflow_id, None, reason)


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
