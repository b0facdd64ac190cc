"""Operators' controls from the command line: `cancel`, `retry`, `drain`, `breaker`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries
from mediator.cli.common import run as run_coroutine
from mediator.errors import MediatorError

#: What a run id looks like (`mediator.storage.keys.workflow_id_for`); anything else given
#: where a run is expected is taken for a request id.
RUN_ID = re.compile(r"wf-[0-9a-f]{20}")


def _control(
    action: str,
    config: Path | None,
    workflow_id: str | None,
    service: str | None,
    reason: str,
    instance: str | None = None,
    wait: float | None = 15.0,
) -> None:
    """Send one control; unless `wait` is None, wait that long for what became of it and
    exit 1 when it was refused or no replica answered."""
    from mediator.ops.control import control_signer
    from mediator.storage.keys import workflow_id_for

    settings = load(config)
    quiet_libraries()
    try:
        signer = control_signer(settings.signing)
    except MediatorError as exc:
        raise fail(str(exc)) from None
    if workflow_id is not None and not RUN_ID.fullmatch(workflow_id):
        workflow_id = workflow_id_for(workflow_id)  # a request id names its run
    target = workflow_id or (f"{service} {instance}" if instance else service)
    sent, outcome = run_coroutine(
        _send_and_wait(settings, signer, action, workflow_id, service, instance, reason, wait)
    )
    if wait is None:
        typer.echo(f"{action} {target}: sent as {sent.control_id}")
        return
    if outcome is None:
        typer.echo(
            f"{action} {target}: sent as {sent.control_id}, but no replica answered within "
            f"{wait:g}s (is a mediator running? a control it refused as unsigned or not "
            "allowed is only dead-lettered: see `mediator dlq list`)",
            err=True,
        )
        raise typer.Exit(code=1)
    if not outcome["applied"]:
        typer.echo(f"{action} {target}: refused: {outcome['detail']}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{action} {target}: applied ({outcome['detail']})")


async def _send_and_wait(
    settings: Any,
    signer: Any,
    action: str,
    workflow_id: str | None,
    service: str | None,
    instance: str | None,
    reason: str,
    wait: float | None,
) -> tuple[Any, dict[str, Any] | None]:
    from mediator.ops.control import control_outcome, send_control
    from mediator.storage.connection import connect_to
    from mediator.storage.keys import Keys
    from topics.events import ControlAction

    kafka = settings.kafka
    sent = await send_control(
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
    if wait is None:
        return sent, None
    redis = connect_to(settings.redis)
    try:
        keys = Keys(settings.redis.key_prefix, settings.redis.shards)
        return sent, await control_outcome(redis, keys, sent.control_id, wait)
    finally:
        await redis.aclose()


ReasonOption = Annotated[str, typer.Option("--reason", help="Why (kept in the run's error).")]
WaitOption = Annotated[
    bool,
    typer.Option("--wait/--no-wait", help="Wait for what became of it (exit 1 if refused)."),
]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the outcome.")]


def cancel(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id, or its request id.")],
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Cancel a running run: its completed steps are compensated, then it ends cancelled."""
    _control("cancel", config, workflow_id, None, reason, wait=timeout if wait else None)


def retry(
    workflow_id: Annotated[str, typer.Argument(help="The run's workflow id, or its request id.")],
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Run a failed or cancelled run again from its unfinished steps, keeping outputs."""
    _control("retry", config, workflow_id, None, reason, wait=timeout if wait else None)


def drain(
    service: Annotated[str, typer.Argument(help="The instance's service.")],
    instance: Annotated[str, typer.Argument(help="The instance id (see `mediator services`).")],
    undo: Annotated[
        bool, typer.Option("--undo", help="Route commands to it again instead.")
    ] = False,
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Route no new command to one instance while those in flight finish (or, with
    --undo, route to it again). It stays drained until it leaves or is marked down."""
    action = "undrain" if undo else "drain"
    _control(action, config, None, service, reason, instance, wait=timeout if wait else None)


breaker_app = typer.Typer(help="Circuit breakers: list them, reset one.", no_args_is_help=True)


@breaker_app.command("reset")
def breaker_reset(
    service: Annotated[str, typer.Argument(help="The service whose breaker to close.")],
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Close a service's breaker now; its parked steps drain at the configured rate."""
    _control("reset_breaker", config, None, service, reason, wait=timeout if wait else None)


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
