"""Concurrency keys' upkeep: on every replica, one at a time (a lease), every second.
A run that ends frees its slot and hands it to its key's queue at once
(`mediator.runtime.admission`); this repairs what a crash or a lost Redis reply left half
done, key by key, so no key's queue is stranded:

- a key with free slots and runs waiting hands the slots on (the release a dead replica
  never made);
- every `AUDIT_MS`, the slots held for longer than `GRACE_MS` are checked against their
  runs: one whose run ended or moved to another round (or, a step's, whose attempt is no
  longer in flight) is freed; one whose run (or attempt) still waits (its ``admit`` or
  ``unpark`` timer was never set) gets the timer again. A slot whose run is
  not there, or is there at an earlier round (or its step at an earlier attempt) than
  the slot was taken for, is freed only after `MISSING_MS`: it is taken before the
  commit that makes the run claim it (the run's first, an operator's retry, a step's
  next attempt), which a stalled replica may make late, and a replica that died before
  making it leaves its input to be read again, by a replica that finds the slot its
  run's already. Freeing it sooner would let the stalled replica's commit run the run
  beside the one the slot went to;
- a key with nothing held or waiting leaves the index.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from mediator import clock
from mediator.clock import now_ms
from mediator.core import concurrency
from mediator.core.state import StepStatus, WorkflowState
from mediator.runtime.periodic import Periodic
from mediator.runtime.ports import StateStore
from mediator.settings import BackoffSettings
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from mediator.storage.leases import Leases
from mediator.storage.slots import KeyState, Slots, slot_timer

__all__ = ["AUDIT_MS", "GRACE_MS", "MISSING_MS", "KeyUpkeep"]

log = logging.getLogger("mediator.flow")

#: How often the upkeep runs (ms).
INTERVAL_MS = 1000
#: How often held slots are checked against their runs (ms).
AUDIT_MS = 5000
#: How long a slot may be held before the check looks at it (ms): a slot is taken
#: before the commit of the run it is for, which a slow Redis may delay for seconds.
GRACE_MS = 10_000
#: How long a slot whose run does not exist (yet) is kept (ms).
MISSING_MS = 600_000


class KeyUpkeep(Periodic):
    """Hands on concurrency keys' free slots a crash left behind; frees lost ones."""

    name = "key-upkeep"
    label = "concurrency-key upkeep"
    failed = "concurrency-key upkeep failed"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        slots: Slots,
        store: StateStore,
        replica: str,
        backoff: BackoffSettings | None = None,
        grace_ms: int = GRACE_MS,
        audit_ms: int = AUDIT_MS,
        missing_ms: int = MISSING_MS,
    ) -> None:
        super().__init__(backoff, log)
        self.missing_ms = missing_ms
        self.grace_ms = grace_ms
        self.audit_ms = audit_ms
        self.keys = keys
        self.slots = slots
        self.store = store
        self.replica = replica
        self.leases = Leases(redis)
        self._audited = 0.0
        #: Slots handed on by the upkeep (a release was lost), and lost ones freed.
        self.handed_on = 0
        self.freed = 0
        self.timers_reset = 0
        #: Per workflow, its concurrency keys as last seen (every replica reads them, for
        #: the Prometheus gauges): keys in use, runs in progress, runs queued, and how long
        #: the oldest queued run has waited (seconds).
        self.workflows: dict[str, dict[str, float]] = {}

    async def round(self) -> float:
        await self.tick()
        return INTERVAL_MS / 1000

    async def tick(self) -> None:
        """Read every key (for the gauges); then one pass over them, if this replica
        holds the upkeep's lease."""
        known = await self.slots.known()
        self._measure(known)
        with redis_errors("taking the concurrency-key upkeep lease"):
            lead = await self.leases.hold(
                self.keys.concurrency_lease, self.replica, 3 * INTERVAL_MS
            )
        if not lead:
            return
        audit = clock.monotonic() - self._audited >= self.audit_ms / 1000
        if audit:
            self._audited = clock.monotonic()
        for state in known:
            if state.queued and state.held < state.limit:
                moved = await self.slots.release_digest(state.digest, state.limit, [], now_ms())
                self.handed_on += len(moved)
            if audit and state.held:
                await self._audit(state)
            elif not state.held and not state.queued:
                await self.slots.forget(state.digest)

    def _measure(self, known: list[KeyState]) -> None:
        now = now_ms()
        workflows: dict[str, dict[str, float]] = {}
        for key in known:
            if not key.held and not key.queued:
                continue  # idle: dropped from the index at the next pass
            doc = workflows.setdefault(
                key.workflow, {"keys": 0, "running": 0, "queued": 0, "oldest_wait_s": 0.0}
            )
            doc["keys"] += 1
            doc["running"] += key.held
            doc["queued"] += key.queued
            if key.oldest_ms is not None:
                wait = max(0, now - key.oldest_ms) / 1000
                doc["oldest_wait_s"] = max(doc["oldest_wait_s"], wait)
        # A workflow whose keys all went idle reads zero rather than its last figures.
        for name in self.workflows.keys() - workflows.keys():
            workflows[name] = {"keys": 0, "running": 0, "queued": 0, "oldest_wait_s": 0.0}
        self.workflows = workflows

    async def _audit(self, key: KeyState) -> None:
        now = now_ms()
        old = [
            (m, at) for m, at in await self.slots.holders(key.digest) if at <= now - self.grace_ms
        ]
        if not old:
            return
        states = await self.store.load_many(sorted({slot_timer(m).workflow_id for m, _ in old}))
        lost, waiting = [], []
        for member, granted in old:
            state = states.get(slot_timer(member).workflow_id)
            standing = "missing" if state is None else _standing(member, state)
            if standing == "lost" or (
                standing in ("missing", "ahead") and granted <= now - self.missing_ms
            ):
                lost.append(member)
            elif standing == "waiting":
                waiting.append(member)
        if lost:
            await self.slots.release_digest(key.digest, key.limit, lost, now)
            self.freed += len(lost)
            log.info(
                "concurrency key %r of %s: %d lost slots freed", key.key, key.workflow, len(lost)
            )
        if waiting:
            await self.slots.admit(waiting)
            self.timers_reset += len(waiting)


def _standing(member: str, state: WorkflowState) -> str:
    """Whether the slot `member` holds is ``lost`` (the run no longer claims it: it
    ended or moved on), is ``ahead`` of the stored run (taken for a round or an attempt
    the run has not committed yet: a replica stalled between taking it and committing),
    is held by a run or attempt still ``waiting`` for the timer that lets it go, or is
    ``live``."""
    timer = slot_timer(member)
    if member not in concurrency.claims(state):
        if timer.kind == "admit":
            return "ahead" if timer.attempt > state.round else "lost"
        step = state.steps.get(timer.step)
        return "ahead" if step is not None and timer.attempt > step.attempt else "lost"
    if timer.kind == "admit":  # a run's slot
        return "waiting" if state.queued_ms is not None else "live"
    return "waiting" if state.steps[timer.step].status is StepStatus.QUEUED else "live"
