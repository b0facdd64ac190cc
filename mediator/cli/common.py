"""What every `mediator` command shares: loading settings, one-line errors (exit code 2,
never a traceback), running a coroutine, quieting libraries in one-shot commands."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from mediator import loops
from mediator.errors import MediatorError
from mediator.loops import EventLoop

__all__ = [
    "ConfigOption",
    "JsonOption",
    "fail",
    "load",
    "quiet_libraries",
    "redis_session",
    "run",
    "set_verbose",
]

T = TypeVar("T")

#: The settings the running command loaded (`load`), named in its error line.
_loaded: list[Any] = []

#: Set by `mediator --verbose`: every command says which broker and Redis it talks to.
_verbose: list[bool] = [False]

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (env MEDIATOR_* wins over it)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str) -> typer.Exit:
    """Print `message` as the one error line; the exit (code 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def run(coro: Coroutine[Any, Any, T], event_loop: EventLoop = "asyncio") -> T:
    """Run `coro` on the loop `event_loop` names (a command that runs once: asyncio's); turn
    expected failures into one line on stderr and exit code 2."""
    from mediator.errors import IdempotenceUnsupported
    from mediator.producers import idempotence_refused

    try:
        return loops.run(coro, event_loop)
    except MediatorError as exc:
        msg = f"{exc}{_where()}"
        raise fail(msg) from None
    except KafkaError as exc:
        if idempotence_refused(exc):
            # Raised by a producer this module does not build (a replica's, a worker's).
            raise fail(str(IdempotenceUnsupported(None, exc))) from None
        msg = f"Kafka: {exc}{_where()}"
        raise fail(msg) from None
    except OSError as exc:
        msg = f"{exc}{_where()}"
        raise fail(msg) from None


def set_verbose(value: bool) -> None:
    """Have `load` print which broker and Redis the command talks to (`--verbose`)."""
    _verbose[0] = value


def _endpoints(settings: Any) -> str:
    from mediator.storage.connection import describe

    return f"kafka {settings.kafka.bootstrap_servers}, redis {describe(settings.redis)}"


def _where() -> str:
    """Which broker and Redis the command talked to (so a wrong one is seen at once)."""
    return f" ({_endpoints(_loaded[-1])})" if _loaded else ""


@asynccontextmanager
async def redis_session(settings: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A Redis client for `settings` and the key layout Redis holds (its shard count as
    stored), closed on exit."""
    from mediator.ops.status import stored_keys
    from mediator.storage.connection import check_mode, connect_to

    redis = connect_to(settings.redis)
    try:
        await check_mode(redis)
        yield redis, await stored_keys(redis, settings.redis.key_prefix, settings.redis.shards)
    finally:
        await redis.aclose()


def quiet_libraries() -> None:
    """Keep the libraries' logs off stderr in a command that runs once.

    Such a command reports a failure as its one error line; without a handler, Python's
    last-resort one would print the libraries' error logs (aiokafka's about a refused
    request, say) above it.
    """
    logging.getLogger().addHandler(logging.NullHandler())


def load(config: Path | None, **overrides: Any) -> Any:
    """The settings (`config` file, environment, `overrides`), or exit 2 saying why not."""
    from mediator.settings import DEV_SETTINGS, config_source, load_settings

    if not overrides and config_source(config) == DEV_SETTINGS:
        typer.echo(f"using the settings of `mediator dev` ({DEV_SETTINGS})", err=True)
    try:
        settings = load_settings(config, **overrides)
    except ValidationError as exc:
        msg = f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        raise fail(msg) from None
    except MediatorError as exc:
        raise fail(str(exc)) from None
    _loaded.append(settings)
    if _verbose[0]:
        typer.echo(f"talking to {_endpoints(settings)}", err=True)
    return settings
