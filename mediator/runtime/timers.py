"""The timer poller: every replica claims the timers that fell due and applies them.

Timers live in Redis (`Keys.timers`, one sorted set per shard, due times on Redis's clock),
written by the same commit as the transition that set them. Each replica polls every
`timers.poll_interval_ms`: one round trip claims the due timers of every shard under a
lease (`timers.lease_ms`), and the runtime applies them like replies, through the same
commit path. A claimed timer is removed by the commit of the transition it causes, or as
stale; if the claiming replica dies first, the lease runs out and another replica fires it.
A transition happens once whatever fires it twice: the commit's revision check sees to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mediator.runtime.batches import Runtime
from mediator.runtime.failures import is_transient
from mediator.runtime.ports import StateStore
from mediator.settings import BackoffSettings, TimerSettings

__all__ = ["TimerPoller"]

log = logging.getLogger("mediator.timers")


class TimerPoller:
    """Claims due timers and hands them to the runtime, until stopped."""

    def __init__(
        self,
        store: StateStore,
        runtime: Runtime,
        settings: TimerSettings | None = None,
        backoff: BackoffSettings | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.settings = settings or TimerSettings()
        self.backoff = backoff or BackoffSettings()
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling."""
        self._task = asyncio.create_task(self._run(), name="timer-poller")

    async def stop(self) -> None:
        """Stop polling (timers claimed and not yet committed are fired again later)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> int:
        """Claim and apply the timers due now; how many were claimed."""
        settings = self.settings
        claimed = await self.store.claim_timers(settings.batch, settings.lease_ms)
        if claimed:
            await self.runtime.handle_timers(claimed)
        return sum(len(timers) for timers in claimed.values())

    async def _run(self) -> None:
        while True:
            try:
                count = await self.poll_once()
                self.failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever failed, the claimed timers stay in Redis: their lease runs out
                # and they fire again. Back off so a persistent failure does not hot-loop.
                self.failures += 1
                delay = self.backoff.delay_ms(self.failures)
                if is_transient(exc):
                    log.warning("timers: %s; retrying in %d ms", exc, delay)
                else:
                    log.exception("timers could not be applied; retrying in %d ms", delay)
                await asyncio.sleep(delay / 1000)
                continue
            if count < self.settings.batch:
                await asyncio.sleep(self.settings.poll_interval_ms / 1000)
