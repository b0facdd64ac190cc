"""Operators' controls from the command line: `cancel`, `retry`, `pause`, `resume`,
`drain`, `breaker`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import (
    ConfigOption,
    JsonOption,
    fail,
    load,
    quiet_libraries,
    redis_session,
)
from mediator.cli.common import run as run_coroutine
from mediator.core.ids import RUN_ID
from mediator.errors import MediatorError

#: Said when no replica recorded what became of a control in time.
NO_ANSWER = (
    "no replica answered within {wait:g}s (is a mediator running? a control it refused as "
    "unsigned or not allowed is only dead-lettered: see `mediator dlq list`)"
)


def _control(
    action: str,
    config: Path | None,
    service: str,
    reason: str,
    instance: str | None = None,
    wait: float | None = 15.0,
) -> None:
    """Send one control to a service (or one of its instances); unless `wait` is None,
    wait that long for what became of it and exit 1 when it was refused or no replica
    answered. (Controls of runs: `_runs_control`.)"""
    settings, signer = _operator_settings(config)
    target = f"{service} {instance}" if instance else service
    sent, outcome = run_coroutine(
        _send_and_wait(settings, signer, action, service, instance, reason, wait)
    )
    if wait is None:
        typer.echo(f"{action} {target}: sent as {sent.control_id}")
        return
    if outcome is None:
        said = NO_ANSWER.format(wait=wait)
        typer.echo(f"{action} {target}: sent as {sent.control_id}, but {said}", err=True)
        raise typer.Exit(code=1)
    if not outcome["applied"]:
        typer.echo(f"{action} {target}: refused: {outcome['detail']}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{action} {target}: applied ({outcome['detail']})")


async def _send_and_wait(
    settings: Any,
    signer: Any,
    action: str,
    service: str,
    instance: str | None,
    reason: str,
    wait: float | None,
) -> tuple[Any, dict[str, Any] | None]:
    from mediator.ops.control import control_outcome, send_control
    from topics.events import ControlAction

    kafka = settings.kafka
    sent = await send_control(
        kafka,
        kafka.topics,
        ControlAction(action),
        service=service,
        instance=instance,
        reason=reason or None,
        enable_idempotence=kafka.enable_idempotence,
        signer=signer,
    )
    if wait is None:
        return sent, None
    async with redis_session(settings) as (redis, keys):
        return sent, await control_outcome(redis, keys, sent.control_id, wait)


#: A bulk control reports progress every this many runs.
PROGRESS_EVERY = 100

ReasonOption = Annotated[str, typer.Option("--reason", help="Why (kept in the run's error).")]
WaitOption = Annotated[
    bool,
    typer.Option("--wait/--no-wait", help="Wait for what became of it (exit 1 if refused)."),
]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the outcome.")]


RunsArgument = Annotated[
    list[str] | None, typer.Argument(help="Run ids or request ids (or use --workflow).")
]
WorkflowFilter = Annotated[
    str | None,
    typer.Option("--workflow", "-W", help="Every run of this workflow the action applies to."),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print how many runs it would act on, and stop.")
]
VersionFilter = Annotated[
    int | None, typer.Option("--version", help="Only runs of this version of the workflow.")
]
StatusFilter = Annotated[
    str | None,
    typer.Option("--status", help="Only runs in this status (of those the action applies to)."),
]
SinceFilter = Annotated[
    str | None,
    typer.Option("--since", help="Only runs updated within this long ago (e.g. 2h, 30m)."),
]
UntilFilter = Annotated[
    str | None,
    typer.Option("--until", help="Only runs last updated at least this long ago (e.g. 10m)."),
]
ErrorFilter = Annotated[
    str | None, typer.Option("--error-code", help="Only runs that ended with this error code.")
]
StepFilter = Annotated[
    str | None, typer.Option("--step", help="Only runs whose error names this step.")
]


@dataclass(frozen=True, slots=True)
class Choose:
    """Which runs a bulk control goes to, besides those named."""

    workflow: str | None = None
    version: int | None = None
    status: str | None = None
    since: str | None = None
    until: str | None = None
    error_code: str | None = None
    step: str | None = None

    def given(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__slots__)


def cancel(
    runs: RunsArgument = None,
    workflow: WorkflowFilter = None,
    version: VersionFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    error_code: ErrorFilter = None,
    step: StepFilter = None,
    dry_run: DryRunOption = False,
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Cancel running runs: their completed steps are compensated, then they end cancelled."""
    choose = Choose(workflow, version, status, since, until, error_code, step)
    _runs_control("cancel", config, runs, choose, dry_run, reason, timeout if wait else None)


def retry(
    runs: RunsArgument = None,
    workflow: WorkflowFilter = None,
    version: VersionFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    error_code: ErrorFilter = None,
    step: StepFilter = None,
    dry_run: DryRunOption = False,
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Run failed or cancelled runs again from their unfinished steps, keeping outputs."""
    choose = Choose(workflow, version, status, since, until, error_code, step)
    _runs_control("retry", config, runs, choose, dry_run, reason, timeout if wait else None)


def pause(
    runs: RunsArgument = None,
    workflow: WorkflowFilter = None,
    version: VersionFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    error_code: ErrorFilter = None,
    step: StepFilter = None,
    deadline: Annotated[
        bool, typer.Option("--deadline", help="Stop the runs' deadlines until resumed, too.")
    ] = False,
    dry_run: DryRunOption = False,
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Pause runs: no command, retry or compensation goes out until they are resumed;
    replies to commands in flight are still applied and step timeouts keep running."""
    choose = Choose(workflow, version, status, since, until, error_code, step)
    _runs_control(
        "pause", config, runs, choose, dry_run, reason, timeout if wait else None, deadline
    )


def resume(
    runs: RunsArgument = None,
    workflow: WorkflowFilter = None,
    version: VersionFilter = None,
    status: StatusFilter = None,
    since: SinceFilter = None,
    until: UntilFilter = None,
    error_code: ErrorFilter = None,
    step: StepFilter = None,
    dry_run: DryRunOption = False,
    reason: ReasonOption = "",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Resume paused runs: what fell due or became ready while paused is sent now."""
    choose = Choose(workflow, version, status, since, until, error_code, step)
    _runs_control("resume", config, runs, choose, dry_run, reason, timeout if wait else None)


def signal(
    run: Annotated[
        str,
        typer.Argument(
            help="The run's workflow id, or its request id; or `key:<correlation key>` for "
            "the run whose `wait` step waits on that key."
        ),
    ],
    event: Annotated[str, typer.Argument(help="The signal's name (what a `wait` waits for).")],
    payload: Annotated[
        str, typer.Argument(help="A JSON object: the output of the step it completes.")
    ] = "{}",
    wait: WaitOption = True,
    timeout: TimeoutOption = 15.0,
    config: ConfigOption = None,
) -> None:
    """Send a signal to a run: the step waiting on it completes with the payload (if none
    waits yet, the run keeps it for the first that will). Sent by correlation key
    (`key:<key>`), it goes to the run waiting on that key, or is kept for the first that
    will."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        msg = f"payload is not JSON: {exc}"
        raise fail(msg) from None
    if not isinstance(body, dict):
        msg = f"payload must be a JSON object, not {type(body).__name__}"
        raise fail(msg)
    if run.startswith("key:"):
        _signal_by_key(config, event, run.removeprefix("key:"), body, timeout if wait else None)
        return
    _runs_control(
        "signal",
        config,
        [run],
        Choose(),
        False,
        "",
        timeout if wait else None,
        signal=(event, body),
    )


def _operator_settings(config: Path | None) -> tuple[Any, Any]:
    """The settings, and who this process signs controls as (None: unsigned)."""
    from mediator.ops.control import control_signer

    settings = load(config)
    quiet_libraries()
    try:
        return settings, control_signer(settings.signing)
    except MediatorError as exc:
        raise fail(str(exc)) from None


def _signal_by_key(
    config: Path | None, event: str, key: str, payload: dict[str, Any], wait: float | None
) -> None:
    """Send the signal `event` for the correlation key `key`; report what became of it."""
    from mediator.ops.control import ControlSender, control_event
    from topics.events import ControlAction

    if not key:
        msg = "key: needs a correlation key after it (key:<key>)"
        raise fail(msg)
    settings, signer = _operator_settings(config)

    async def send() -> tuple[Any, dict[str, Any] | None]:
        from mediator.ops.control import control_outcomes

        kafka = settings.kafka
        sender = ControlSender(
            kafka, kafka.topics, enable_idempotence=kafka.enable_idempotence, signer=signer
        )
        await sender.start()
        try:
            control = control_event(ControlAction.SIGNAL, signal=event, payload=payload, key=key)
            sent = await sender.send(control)
        finally:
            await sender.stop()
        if wait is None:
            return sent, None
        async with redis_session(settings) as (redis, keys):
            outcomes = await control_outcomes(redis, keys, [sent.control_id], wait)
        return sent, outcomes.get(sent.control_id)

    sent, outcome = run_coroutine(send())
    if not _report("signal", [f"key:{key}"], [(sent, outcome)], set(), wait):
        raise typer.Exit(code=1)


def _runs_control(
    action: str,
    config: Path | None,
    runs: list[str] | None,
    choose: Choose,
    dry_run: bool,
    reason: str,
    wait: float | None,
    pause_deadline: bool = False,
    signal: tuple[str, dict[str, Any]] | None = None,
) -> None:
    """Send `action` to each run named and each run `choose` picks that it applies to (one
    control per run, through one producer); unless `wait` is None, report what became of
    each and exit 1 if any was refused or not answered."""
    from mediator.storage.keys import workflow_id_for

    if not runs and not choose.given():
        msg = (
            f"{action} needs run ids or a filter (--workflow, --version, --status, --since, "
            "--until, --error-code, --step)"
        )
        raise fail(msg)
    settings, signer = _operator_settings(config)
    named = [r if RUN_ID.fullmatch(r) else workflow_id_for(r) for r in runs or ()]
    # Runs chosen by the filter may end before their control arrives: refused then, they
    # are reported as skipped, not as failures.
    chosen: list[str] = []
    if choose.given():
        chosen = run_coroutine(_runs_of(settings, choose, action))
    ids = list(dict.fromkeys([*named, *chosen]))
    optional = set(chosen) - set(named)
    if dry_run:
        typer.echo(f"{action} would be sent to {len(ids)} run{'' if len(ids) == 1 else 's'}")
        return
    outcomes = run_coroutine(
        _send_all(settings, signer, action, ids, reason, wait, pause_deadline, signal)
    )
    if not _report(action, ids, outcomes, optional, wait):
        raise typer.Exit(code=1)


def _report(
    action: str,
    ids: list[str],
    outcomes: list[tuple[Any, dict[str, Any] | None]],
    optional: set[str],
    wait: float | None,
) -> bool:
    """One line per run, then a total; False if a named run was refused or any run was
    not answered (a run the filter chose that ended meanwhile is skipped)."""
    applied = skipped = 0
    for wid, (sent, outcome) in zip(ids, outcomes, strict=True):
        if wait is None:
            typer.echo(f"{action} {wid}: sent as {sent.control_id}")
        elif outcome is None:
            typer.echo(f"{action} {wid}: sent, but {NO_ANSWER.format(wait=wait)}", err=True)
        elif outcome["applied"]:
            applied += 1
            typer.echo(f"{action} {wid}: applied ({outcome['detail']})")
        elif wid in optional:
            skipped += 1
            typer.echo(f"{action} {wid}: skipped: {outcome['detail']}")
        else:
            typer.echo(f"{action} {wid}: refused: {outcome['detail']}", err=True)
    if wait is None:
        return True
    if len(ids) != 1:
        typer.echo(
            f"{action}: {applied} of {len(ids)} applied"
            + (f", {skipped} skipped (ended or changed meanwhile)" if skipped else "")
        )
    return applied + skipped == len(ids)


async def _runs_of(settings: Any, choose: Choose, action: str) -> list[str]:
    """The runs `choose` picks that `action` applies to, as Redis has them now."""
    from mediator.clock import now_ms
    from mediator.core.durations import parse_duration_ms
    from mediator.ops.runs import RunFilter, runs_for

    bounds = []
    for option, ago in (("--since", choose.since), ("--until", choose.until)):
        millis = parse_duration_ms(ago) if ago is not None else None
        if ago is not None and millis is None:
            msg = f"{option} {ago!r} is not a duration (e.g. 90s, 15m, 2h)"
            raise fail(msg)
        bounds.append(None if millis is None else now_ms() - millis)
    where = RunFilter(choose.version, choose.error_code, choose.step)
    async with redis_session(settings) as (redis, keys):
        try:
            return await runs_for(
                redis, keys, action, choose.workflow, choose.status, bounds[0], bounds[1], where
            )
        except ValueError as exc:
            raise fail(str(exc)) from None


async def _send_all(
    settings: Any,
    signer: Any,
    action: str,
    ids: list[str],
    reason: str,
    wait: float | None,
    pause_deadline: bool,
    signal: tuple[str, dict[str, Any]] | None = None,
) -> list[tuple[Any, dict[str, Any] | None]]:
    """One control per run, through one producer; what became of each (None: no answer
    within `wait` seconds of the last being sent, or not waited for)."""
    from mediator.ops.control import ControlSender, control_event, control_outcomes
    from topics.events import ControlAction

    kafka = settings.kafka
    sender = ControlSender(
        kafka, kafka.topics, enable_idempotence=kafka.enable_idempotence, signer=signer
    )
    await sender.start()
    sent = []
    try:
        for n, wid in enumerate(ids, start=1):
            control = control_event(
                ControlAction(action),
                workflow_id=wid,
                reason=reason or None,
                pause_deadline=pause_deadline,
                signal=signal[0] if signal else None,
                payload=signal[1] if signal else None,
            )
            sent.append(await sender.send(control))
            if n % PROGRESS_EVERY == 0 and n < len(ids):
                typer.echo(f"{action}: {n} of {len(ids)} sent", err=True)
    finally:
        await sender.stop()
    if wait is None:
        return [(s, None) for s in sent]
    async with redis_session(settings) as (redis, keys):
        outcomes = await control_outcomes(redis, keys, [s.control_id for s in sent], wait)
    return [(s, outcomes.get(s.control_id)) for s in sent]


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
    _control(action, config, service, reason, instance, wait=timeout if wait else None)


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
    _control("reset_breaker", config, service, reason, wait=timeout if wait else None)


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
    from mediator.storage.parked import parked_counts

    async with redis_session(settings) as (redis, keys):
        states = await breaker_states(redis, keys)
        for service, count in (await parked_counts(redis, keys, states)).items():
            states[service]["parked"] = count
        return states
