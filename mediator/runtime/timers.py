"""The timer poller: every replica claims the timers that fell due and applies them.

Timers live in Redis (`Keys.timers`, one sorted set per shard, due times on Redis's clock),
written by the same commit as the transition that set them. Each replica polls every
`timers.poll_interval_ms`: one round trip claims the due timers of every shard under a
lease (`timers.lease_ms`), and the runtime applies them like replies, through the same
commit path. A claimed timer is removed by the commit of the transition it causes, or as
stale; if the claiming replica dies first, the lease runs out and another replica fires it.
A transition happens once whatever fires it twice: the commit's revision check sees to it.

Timers have the error boundary records have: a round that fails for a reason that is not
transient is narrowed down to the timer that causes it (its run's state does not decode,
say); that one is set aside with the reason (`Store.park_timer`), logged and counted, and
the timers claimed with it fire. A transient failure leaves the whole round to its lease.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mediator.clock import now_ms
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import isolate
from mediator.runtime.periodic import Periodic
from mediator.runtime.ports import StateStore
from mediator.settings import BackoffSettings, TimerSettings
from mediator.storage.store import Claimed

__all__ = ["TimerPoller"]

log = logging.getLogger("mediator.timers")


class TimerPoller(Periodic):
    """Claims due timers and hands them to the runtime, until stopped. A round that fails
    leaves its claimed timers in Redis: their lease runs out and they fire again."""

    name = "timer-poller"
    label = "timers"
    failed = "timers could not be applied"

    def __init__(
        self,
        store: StateStore,
        runtime: Runtime,
        settings: TimerSettings | None = None,
        backoff: BackoffSettings | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.store = store
        self.runtime = runtime
        self.settings = settings or TimerSettings()
        #: Timers set aside because they could not be applied.
        self.poisoned = 0

    async def poll_once(self) -> int:
        """Claim and apply the timers due now; how many were claimed."""
        settings = self.settings
        claimed = await self.store.claim_timers(settings.batch, settings.lease_ms)
        if claimed:
            timers = [(shard, timer) for shard, batch in claimed.items() for timer in batch]
            await isolate(timers, self._apply, self._poisoned)
        return sum(len(timers) for timers in claimed.values())

    async def _apply(self, timers: Sequence[tuple[int, Claimed]]) -> None:
        by_shard: dict[int, list[Claimed]] = {}
        for shard, timer in timers:
            by_shard.setdefault(shard, []).append(timer)
        await self.runtime.handle_timers(by_shard)

    async def _poisoned(self, item: tuple[int, Claimed], exc: Exception) -> None:
        shard, timer = item
        reason = f"{type(exc).__name__}: {exc}"
        log.error(
            "timer %s of shard %d cannot be applied and is set aside: %s",
            timer.name,
            shard,
            reason,
            exc_info=exc,
        )
        if await self.store.park_timer(shard, timer, reason, now_ms()):
            self.poisoned += 1
            await self.store.count({"timers:poisoned": 1})

    async def round(self) -> float:
        """One poll; poll again at once when the batch was full."""
        count = await self.poll_once()
        return 0 if count >= self.settings.batch else self.settings.poll_interval_ms / 1000
