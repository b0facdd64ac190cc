"""The timer poller: every replica claims the timers that fell due and applies them.

Timers live in Redis (`Keys.timers`, one sorted set per shard, due times on Redis's clock),
written by the same commit as the transition that set them. Each replica polls every shard
every `timers.poll_interval_ms`: one round trip claims the due timers of every shard under
a lease (`timers.lease_ms`), and the runtime applies them like replies, through the same
commit path. A claimed timer is removed by the commit of the transition it causes, or as
stale; if the claiming replica dies first, the lease runs out and another replica fires it.
A transition happens once whatever fires it twice: the commit's revision check sees to it.

A poll learns when each shard's earliest timer left falls due. In between full polls the
poller wakes when one of those falls due, or one this replica sets itself (`nudge`: a
commit's timers, a slot handed on, parked steps released), and polls only the shards whose
timers fell due (polls at least `MIN_GAP_MS` apart). So a timer fires within a few
milliseconds of its due time rather than up to a whole interval late, at the cost of one
script call on its shard, and no poll is spent when nothing falls due (timers set by other
replicas after the last full poll are seen within one interval).

Timers have the error boundary records have: a round that fails for a reason that is not
transient is narrowed down to the timer that causes it (its run's state does not decode,
say); that one is set aside with the reason (`Store.park_timer`), logged and counted, and
the timers claimed with it fire. A transient failure leaves the whole round to its lease.
A shard whose claim fails on its own (its cluster primary out of memory, its key of the
wrong type) is left out of the polls for a capped, doubling backoff, logged each time; the
timers of every other shard fire meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

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
        #: When each shard's earliest known timer falls due (monotonic seconds), learnt
        #: from the last poll of the shard or from what this replica sets itself (`nudge`).
        self._due: dict[int, float] = {}
        #: What `nudge` learnt while a claim was under way: newer than what it returns.
        self._nudged: dict[int, float] = {}
        #: When every shard is polled next (monotonic seconds): timers another replica
        #: set since this one's last poll are found then.
        self._full_at = 0.0
        #: When the last round started, and when the pause under way ends (monotonic).
        self._started = 0.0
        self._wake_at = 0.0
        self._woken = asyncio.Event()
        self._paused = False
        #: Shards whose claim failed on its own, with their failures in a row; each is
        #: polled again at its `_due` time, the end of its backoff.
        self._failing: dict[int, int] = {}
        #: Claims of one shard that failed, since start.
        self.shard_failures = 0

    async def poll_once(self, shards: Sequence[int] | None = None) -> int:
        """Claim and apply the timers due now in `shards` (default: all); how many were
        claimed. Learns when each polled shard's earliest timer left falls due."""
        settings = self.settings
        self._nudged = {}
        claimed = await self.store.claim_timers(settings.batch, settings.lease_ms, shards)
        seen = clock.monotonic()
        for shard, exc in self.store.timer_failures.items():
            self._shard_failed(shard, exc, seen)
        for shard, wait in self.store.timer_waits.items():
            if self._failing.pop(shard, None) is not None:
                log.info("%s: shard %d answers again", self.label, shard)
            due = [seen + wait / 1000] if wait is not None else []
            if shard in self._nudged:
                due.append(self._nudged[shard])
            if due:
                self._due[shard] = min(due)
            else:
                self._due.pop(shard, None)
        if claimed:
            timers = [(shard, timer) for shard, batch in claimed.items() for timer in batch]
            await isolate(timers, self._apply, self._poisoned)
        return sum(len(timers) for timers in claimed.values())

    def _shard_failed(self, shard: int, exc: Exception, now: float) -> None:
        """Poll `shard` again after a backoff that doubles with each failure in a row."""
        failures = self._failing[shard] = self._failing.get(shard, 0) + 1
        delay_ms = self.backoff.delay_ms(failures)
        self._due[shard] = now + delay_ms / 1000
        self.shard_failures += 1
        log.warning("%s: %s; shard %d polled again in %d ms", self.label, exc, shard, delay_ms)

    @property
    def failing_shards(self) -> int:
        """How many shards' claims are failing now (their timers wait for them)."""
        return len(self._failing)

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
        """One poll: of every shard once `timers.poll_interval_ms` has passed since the
        last such poll, else only of the shards whose earliest known timer fell due. Then
        the pause until the next: none when a shard's batch was full, else until a known
        timer falls due or the next poll of every shard, whichever is sooner (and at
        least `MIN_GAP_MS` after this round started). A shard whose claim is failing is
        left out of both until its backoff ends."""
        self._started = started = clock.monotonic()
        full = started >= self._full_at
        shards: list[int] | None = None
        if not full:
            shards = sorted(shard for shard, at in self._due.items() if at <= started)
        elif held := {shard for shard in self._failing if self._due[shard] > started}:
            shards = [shard for shard in range(self.store.keys.shards) if shard not in held]
        count = await self.poll_once(shards) if shards != [] else 0
        if full:  # only once it is done: a full poll that raised is the next round too
            self._full_at = started + self.settings.poll_interval_ms / 1000
        if count >= self.settings.batch:
            return 0
        wake_at = max(min([self._full_at, *self._due.values()]), started + MIN_GAP_MS / 1000)
        return max(0.0, wake_at - clock.monotonic())

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if `nudge` asks meanwhile for a sooner poll."""
        self._wake_at = clock.monotonic() + seconds
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

    def nudge(self, soonest: Mapping[int, int]) -> None:
        """Timers this replica set (committed, or made due now) fall due in so many ms, by
        shard (the soonest of each): poll those shards by then (never sooner than
        `MIN_GAP_MS` after the last round started)."""
        now = clock.monotonic()
        for shard, delay_ms in soonest.items():
            at = now + delay_ms / 1000
            if shard in self._failing:  # not before its backoff ends
                at = max(at, self._due[shard])
            known = self._due.get(shard)
            if known is None or at < known:
                self._due[shard] = at
            self._nudged[shard] = min(at, self._nudged.get(shard, at))
            wake_at = max(at, self._started + MIN_GAP_MS / 1000)
            if self._paused and wake_at < self._wake_at:
                self._wake_at = wake_at
                self._woken.set()
