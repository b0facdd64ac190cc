"""The `mediator` command line: the application, its commands (one module per purpose:
`serve`, `control`, `views`, `recover`, `dlq`, `workflows`) in the order `--help` lists
them, and the entry point."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mediator.cli import control, recover, serve, views
from mediator.cli.common import set_verbose

__all__ = ["app", "main"]

app = typer.Typer(
    name="mediator",
    help="Event-driven service orchestrator over Kafka, with its state in Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


app.command()(serve.dev)
app.command()(serve.run)
app.command("demo-services")(serve.demo_services_command)
app.command()(control.cancel)
app.command()(control.retry)
app.command()(control.pause)
app.command()(control.resume)
app.command()(control.signal)
app.command()(control.drain)
app.add_typer(control.breaker_app, name="breaker")
app.command()(serve.submit)
app.command()(views.status)
app.command()(views.services)
app.command("keys")(views.concurrency_keys)
app.command()(recover.recover)
app.command()(views.validate)
app.command()(views.schemas)


def _add_groups() -> None:
    from mediator.cli.dlq import dlq_app
    from mediator.cli.schedules import schedules_app
    from mediator.cli.workflows import dashboard_command, workflows_app

    app.add_typer(dlq_app, name="dlq")
    app.add_typer(workflows_app, name="workflows")
    app.add_typer(schedules_app, name="schedules")
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
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Say which broker and Redis each command uses."),
    ] = False,
) -> None:
    """Event-driven service orchestrator over Kafka, with its state in Redis."""
    set_verbose(verbose)


_add_groups()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
