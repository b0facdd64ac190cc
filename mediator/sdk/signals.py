"""SIGTERM for every worker of a process at once: one handler per event loop, which asks
each running worker to drain. (Each worker installing its own would replace the others':
a process with two workers would need two signals to stop.)"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

__all__ = ["on_sigterm"]

_waiting: dict[asyncio.AbstractEventLoop, set[Callable[[], object]]] = {}


def on_sigterm(callback: Callable[[], object]) -> Callable[[], None] | None:
    """Call `callback` on SIGTERM, with every other one registered in this loop; the
    function that unregisters it, or None where signals cannot be handled (not the main
    thread, or a platform without them)."""
    loop = asyncio.get_running_loop()
    callbacks = _waiting.get(loop)
    if callbacks is None:
        try:
            loop.add_signal_handler(signal.SIGTERM, _deliver, loop)
        except (NotImplementedError, RuntimeError, ValueError):
            return None
        callbacks = _waiting[loop] = set()
    callbacks.add(callback)

    def remove() -> None:
        callbacks.discard(callback)
        if not callbacks and _waiting.get(loop) is callbacks:
            del _waiting[loop]
            loop.remove_signal_handler(signal.SIGTERM)

    return remove


def _deliver(loop: asyncio.AbstractEventLoop) -> None:
    for callback in list(_waiting.get(loop, ())):
        callback()
