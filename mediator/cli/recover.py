"""`mediator recover`: what Redis lost, sent again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries
from mediator.cli.common import run as run_coroutine


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
