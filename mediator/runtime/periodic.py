"""A background task that does one round of work again and again until stopped, and
sorts its failures: a round that raises is logged (a warning when transient, with the
traceback otherwise) and retried after a capped exponential backoff, never hot-looping."""

from __future__ import annotations

import asyncio
import logging

from mediator.core.tasks import cancel_and_wait
from mediator.runtime.failures import is_transient
from mediator.settings import BackoffSettings

__all__ = ["Periodic"]


class Periodic:
    """Subclasses implement `round`, which returns how long to pause before the next."""

    #: The task's name.
    name = "periodic"
    #: How its log lines start: ``"<label>: <error>; retrying in <n> ms"``.
    label = "periodic"
    #: What is logged, with the traceback, when a round fails unexpectedly.
    failed = "a periodic task failed"

    def __init__(self, backoff: BackoffSettings | None, log: logging.Logger) -> None:
        self.backoff = backoff or BackoffSettings()
        self.log = log
        #: Rounds that failed in a row.
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def round(self) -> float:
        """Do one round of work; the pause (seconds) before the next."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the rounds."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop, cancelling a round in progress."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                pause = await self.round()
                self.failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                delay = self.backoff.delay_ms(self.failures)
                if is_transient(exc):
                    self.log.warning("%s: %s; retrying in %d ms", self.label, exc, delay)
                else:
                    self.log.exception("%s; retrying in %d ms", self.failed, delay)
                await asyncio.sleep(delay / 1000)
                continue
            if pause > 0:
                await self.pause(pause)

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` before the next round (subclasses may wake sooner)."""
        await asyncio.sleep(seconds)
