"""The event loop a process runs on (`Settings.event_loop`).

``auto`` (the default) runs on uvloop where it is installed (a dependency on Linux and
macOS), else on asyncio's own loop; ``asyncio`` always on asyncio's; ``uvloop`` insists on
uvloop. A replica at saturation spends a fifth to a quarter of its CPU in the event loop
(ready-queue handles, selector, socket writes): uvloop's does the same work in C.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from mediator.errors import ConfigurationError

__all__ = ["EventLoop", "loop_factory", "loop_name", "run"]

T = TypeVar("T")

EventLoop = Literal["auto", "asyncio", "uvloop"]


def loop_factory(choice: EventLoop = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What `asyncio.Runner` builds its loop with for `choice` (None: asyncio's own)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            msg = (
                "event_loop is uvloop, but uvloop is not installed "
                "(pip install uvloop, or set event_loop: auto)"
            )
            raise ConfigurationError(msg) from None
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T], choice: EventLoop = "auto") -> T:
    """Run `coro` to completion on a new loop of the kind `choice` names."""
    try:
        factory = loop_factory(choice)
    except ConfigurationError:
        coro.close()  # never awaited: say so quietly, not with a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the kind of loop running now."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
