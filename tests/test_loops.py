"""The event loop a process runs on: uvloop where installed, asyncio's on request, and a
clear error when uvloop is asked for but missing."""

from __future__ import annotations

import sys

import pytest

from mediator import loops
from mediator.errors import ConfigurationError
from mediator.settings import load_settings


async def kind() -> str:
    return loops.loop_name()


def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")  # a dependency on Linux and macOS
    assert loops.run(kind()) == "uvloop"
    assert loops.run(kind(), "uvloop") == "uvloop"


def test_asyncio_runs_on_asyncios_own_loop() -> None:
    assert loops.run(kind(), "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert loops.run(kind()) == "asyncio"
    coro = kind()
    with pytest.raises(ConfigurationError, match=r"uvloop is not installed \(pip install uvloop"):
        loops.run(coro, "uvloop")
    assert coro.cr_frame is None  # closed, not left to warn that it was never awaited


def test_the_setting_takes_only_known_loops() -> None:
    assert load_settings().event_loop == "auto"
    assert load_settings(event_loop="asyncio").event_loop == "asyncio"
    with pytest.raises(ConfigurationError, match="event_loop"):
        load_settings(event_loop="trio")
