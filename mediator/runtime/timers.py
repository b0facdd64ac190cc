"""The timer poller: every replica claims the timers that fell due and applies them.

Timers live in Redis (`Keys.timers`, one sorted set per shard, due times on Redis's clock),
written by the same commit as the transition that set them. Each replica polls every
`timers.poll_interval_ms`: one round trip claims the due timers of every shard under a
lease (`timers.lease_ms`), and the runtime applies them like replies, through the same
commit path. A claimed timer is removed by the commit of the transition it causes, or as
stale; if the claiming replica dies first, the lease runs out and another replica fires it.
A transition happens once whatever fires it twice: the commit's revision check sees to it.

A poll learns when the earliest timer left falls due, and the poller sleeps no longer than
that (at least `MIN_GAP_MS`); a timer this replica commits that falls due before the next
poll wakes it sooner (`nudge`). So a timer fires within a few milliseconds of its due time
rather than up to a whole interval late, and no poll is spent when nothing falls due
(timers set by other replicas are seen within one interval at worst).

Timers have the error boundary records have: a round that fails for a reason that is not
transient is narrowed down to the timer that causes it (its run's state does not decode,
say); that one is set aside with the reason (`Store.park_timer`), logged and counted, and
the timers claimed with it fire. A transient failure leaves the whole round to its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mediator import clock
from mediator.clock import now_ms
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import isolate
from mediator.runtime.periodic import Periodic
from mediator.runtime.ports import StateStore
from mediator.settings import BackoffSettings, TimerSettings
from mediator.storage.store import Claimed

__all__ = ["TimerPoller"]

log = logging.getLogger("mediator.timers")

#: Polls are at least this far apart (ms), however close together timers fall due: each
#: poll is one script call per shard.
MIN_GAP_MS = 5


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
        #: While pausing: when the next poll is due (monotonic seconds), and what wakes
        #: the pause to look again. Between pauses: the soonest poll a nudge asked for.
        self._wake_at = 0.0
        self._woken = asyncio.Event()
        self._paused = False
        self._nudged: float | None = None

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
        """One poll; poll again at once when the batch was full, else when the earliest
        timer left falls due, or after the interval if that is sooner."""
        count = await self.poll_once()
        if count >= self.settings.batch:
            return 0
        pause_ms = self.settings.poll_interval_ms
        following = self.store.next_timer_in_ms
        if following is not None:
            pause_ms = min(pause_ms, max(following, MIN_GAP_MS))
        return pause_ms / 1000

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if `nudge` asked (or asks meanwhile) for a sooner poll."""
        wake_at = clock.monotonic() + seconds
        if self._nudged is not None:
            wake_at, self._nudged = min(wake_at, self._nudged), None
        self._wake_at = wake_at
        self._woken.clear()
        self._paused = True
        try:
            while (left := self._wake_at - clock.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._woken.wait(), left)
                except TimeoutError:
                    return
                self._woken.clear()
        finally:
            self._paused = False

    def nudge(self, delay_ms: int) -> None:
        """A timer this replica committed falls due in `delay_ms`: poll by then (never
        sooner than `MIN_GAP_MS` from now)."""
        wake_at = clock.monotonic() + max(delay_ms, MIN_GAP_MS) / 1000
        if self._paused:
            if wake_at < self._wake_at:
                self._wake_at = wake_at
                self._woken.set()
        elif self._nudged is None or wake_at < self._nudged:
            self._nudged = wake_at  # taken by the next pause
