"""`mediator dlq`: list the dead letters, and replay them once their cause is fixed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import orjson
import typer

from mediator.cli.common import ConfigOption, JsonOption, fail, load, quiet_libraries, run

if TYPE_CHECKING:
    from mediator.ops.dlq import Letter, ReplayReport
    from mediator.settings import Settings
    from topics.events import DeadLetter

__all__ = ["dlq_app"]

T = TypeVar("T")

dlq_app = typer.Typer(
    name="dlq",
    help="The dead-letter queue: list what the mediator rejected, replay it after a fix.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CodeOption = Annotated[
    str | None, typer.Option("--code", help="Only letters with this code (e.g. invalid).")
]
SourceOption = Annotated[
    str | None, typer.Option("--source", help="Only letters rejected from this topic.")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="Seconds any one wait on Kafka may take.", min=0.1)
]

_REASON_WIDTH = 60
_KEY_WIDTH = 24


def _shorten(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _source(letter: DeadLetter) -> str:
    if letter.partition is None:
        return str(letter.source_topic)
    where = f"{letter.source_topic}/{letter.partition}"
    return where if letter.offset is None else f"{where}/{letter.offset}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one is left as it is."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


async def _read(
    settings: Settings,
    *,
    limit: int | None,
    code: str | None,
    source: str | None,
    since_ms: int | None,
    timeout_s: float,
) -> tuple[list[Letter], list[tuple[int, int, str]]]:
    from mediator.ops.dlq import read_dead_letters

    kafka = settings.kafka
    unreadable: list[tuple[int, int, str]] = []
    letters = await read_dead_letters(
        kafka,
        kafka.topics,
        limit=limit,
        code=code,
        source=source,
        since_ms=since_ms,
        on_unreadable=lambda p, o, why: unreadable.append((p, o, why)),
        client_id=f"{kafka.client_id}-dlq",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        timeout_s=timeout_s,
    )
    return letters, unreadable


def _report_unreadable(unreadable: Sequence[tuple[int, int, str]]) -> None:
    for partition, offset, reason in unreadable[:5]:
        typer.echo(f"skipped {partition}:{offset}: {_shorten(reason, 100)}", err=True)
    if len(unreadable) > 5:
        typer.echo(
            f"skipped {len(unreadable) - 5} more records that are not dead letters", err=True
        )


@dlq_app.command("list")
def list_letters(
    code: CodeOption = None,
    source: SourceOption = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only letters rejected since: ISO-8601 or a duration ago (15m, 2h)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many, the newest.", min=1)] = 50,
    json_output: JsonOption = False,
    timeout: TimeoutOption = 30.0,
    config: ConfigOption = None,
) -> None:
    """List the dead letters, oldest first: where each is, when, why, and where it came from.

    The first column, PARTITION:OFFSET on the DLQ topic, names a letter for `dlq replay`.
    """
    from mediator import clock
    from mediator.errors import BadTime
    from mediator.ops.window import parse_time

    since_ms = None
    if since is not None:
        try:
            since_ms = parse_time(since, now_ms=clock.now_ms())
        except BadTime as exc:
            msg = f"--since: {exc}"
            raise fail(msg) from None
    settings = _settings(config)
    letters, unreadable = run(
        _read(settings, limit=limit, code=code, source=source, since_ms=since_ms, timeout_s=timeout)
    )
    topic = settings.kafka.topics.dlq
    if json_output:
        document = {
            "topic": topic,
            "letters": [
                {"dlq_partition": p, "dlq_offset": o, **letter.model_dump(mode="json")}
                for p, o, letter in letters
            ],
            "unreadable": [{"partition": p, "offset": o, "reason": r} for p, o, r in unreadable],
        }
        typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    _report_unreadable(unreadable)
    if not letters:
        typer.echo(f"no dead letters on {topic}" + (" match" if code or source or since else ""))
        return
    rows = [["DLQ", "REJECTED (UTC)", "CODE", "SOURCE", "KEY", "SIZE", "TRUNC", "REASON"]]
    for partition, offset, letter in letters:
        rows.append(
            [
                f"{partition}:{offset}",
                _when(letter.rejected_ms),
                letter.code or "-",
                _source(letter),
                _shorten(letter.key, _KEY_WIDTH) or "-",
                str(letter.size) if letter.size is not None else "-",
                "yes" if letter.truncated else "no",
                _shorten(letter.reason, _REASON_WIDTH),
            ]
        )
    for line in _table(rows):
        typer.echo(line.rstrip())
    more = f" (the newest {limit}; raise --limit for more)" if len(letters) == limit else ""
    typer.echo(f"{len(letters)} dead letters on {topic}{more}")


@dlq_app.command("replay")
def replay_letters(
    letters: Annotated[
        list[str] | None,
        typer.Argument(
            help="Letters to replay as PARTITION:OFFSET on the DLQ topic (see `dlq list`).",
            metavar="PARTITION:OFFSET",
            show_default=False,
        ),
    ] = None,
    code: CodeOption = None,
    source: SourceOption = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every letter on the DLQ topic.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be replayed; publish nothing.")
    ] = False,
    json_output: JsonOption = False,
    timeout: TimeoutOption = 30.0,
    config: ConfigOption = None,
) -> None:
    """Publish dead letters again to the topic they were rejected from, as they were.

    Choose them by PARTITION:OFFSET, by --code, by --source (these combine), or --all.
    A letter that holds only an excerpt of the original (truncated) is refused. Exits 1
    when any chosen letter was refused or failed to send, 2 on bad input.
    """
    from mediator.ops.dlq import DlqError, parse_coordinates

    if replay_all and (letters or code or source):
        msg = (
            "--all replays every letter: give it alone, "
            "or choose by PARTITION:OFFSET, --code, --source"
        )
        raise fail(msg)
    if not (replay_all or letters or code or source):
        msg = "choose what to replay: PARTITION:OFFSET arguments, --code, --source, or --all"
        raise fail(msg)
    try:
        coordinates = [parse_coordinates(text) for text in letters or ()]
    except DlqError as exc:
        raise fail(str(exc)) from None
    settings = _settings(config)
    report, unreadable = run(_replay(settings, coordinates, code, source, dry_run, timeout))
    if json_output:
        typer.echo(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        _report_unreadable(unreadable)
        _print_report(report)
    if not report.ok:
        raise typer.Exit(code=1)


async def _replay(
    settings: Settings,
    coordinates: list[tuple[int, int]],
    code: str | None,
    source: str | None,
    dry_run: bool,
    timeout_s: float,
) -> tuple[ReplayReport, list[tuple[int, int, str]]]:
    from mediator.ops.dlq import replay, replayable_topics, select

    kafka = settings.kafka
    found, unreadable = await _read(
        settings, limit=None, code=code, source=source, since_ms=None, timeout_s=timeout_s
    )
    chosen = select(found, coordinates)
    report = await replay(
        kafka,
        chosen,
        to=replayable_topics(kafka.topics),
        dry_run=dry_run,
        enable_idempotence=kafka.enable_idempotence,
        client_id=f"{kafka.client_id}-dlq",
        max_request_size=settings.limits.max_message_bytes,
        timeout_s=timeout_s,
    )
    return report, unreadable


def _print_report(report: ReplayReport) -> None:
    labels = {
        "replayed": "replayed",
        "would_replay": "would replay",
        "refused": "refused",
        "failed": "failed",
    }
    for outcome in report.outcomes:
        letter = outcome.letter
        where = f"{outcome.partition}:{outcome.offset}"
        if outcome.status == "replayed":
            to = f"{letter.source_topic}/{outcome.published_partition}/{outcome.published_offset}"
        else:
            to = letter.source_topic
        line = f"{labels[outcome.status]:<12} {where:<10} -> {to}  key {letter.key or '-'}"
        line += f"  ({letter.code or 'no code'})"
        if outcome.reason:
            line += f": {outcome.reason}"
        typer.echo(line)
    counts = report.as_dict()
    if not report.outcomes:
        typer.echo("no dead letters match; nothing to replay")
    elif report.dry_run:
        typer.echo(
            f"dry run: would replay {counts['would_replay']}, refused {counts['refused']}; "
            "nothing was published"
        )
    else:
        typer.echo(
            f"replayed {counts['replayed']}, refused {counts['refused']}, failed {counts['failed']}"
        )


def _settings(config: Path | None) -> Settings:
    settings: Settings = load(config)
    quiet_libraries()
    return settings
