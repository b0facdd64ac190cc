"""Stopping a background task for certain."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger("mediator.tasks")


async def cancel_and_wait(task: asyncio.Task[None], patience: float = 5.0) -> bool:
    """Cancel `task` and wait for it to end; False if it would not within `patience` s.

    A single `cancel()` can be lost: code under the task may catch the `CancelledError`
    (a library cleaning up a connection, a timeout firing in the same loop iteration), and
    the task then runs on while its stopper waits for ever. So the cancellation is repeated
    until the task ends, and the wait is bounded: a task that still runs is logged and left,
    never a reason for a shutdown to hang.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task %s ignored cancellation for %.0f s; leaving it", task, patience)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(remaining, 0.5))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r while stopping", task.get_name(), task.exception())
    return True
