"""Flow control's release loop: on every replica, every ``flow_control.release_ms``, each
limited service's queue (its parked queue: the `queued` steps) is released oldest first,
as far as the limit has room (`Limits.room`), by one replica at a time (a short lease per
service). A released step's ``unpark`` timer falls due at once; the replica that fires it
sends the command, taking a permit first (`limit_acquire.lua` gives released commands
precedence over new ones); one refused a permit is queued again in its place (the queue
score it had, kept by the release in `Keys.released`), not at the end. A breaker that
is not closed holds the queue (the breaker upkeep's probe rules apply)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from mediator import clock
from mediator.clock import now_ms
from mediator.core.state import StepStatus
from mediator.runtime.breakers import Breakers
from mediator.runtime.periodic import Periodic
from mediator.runtime.ports import StateStore
from mediator.runtime.routing import Router
from mediator.settings import BackoffSettings, FlowControlSettings
from mediator.storage.errors import redis_errors
from mediator.storage.keys import Keys
from mediator.storage.leases import Leases
from mediator.storage.limits import Limits
from mediator.storage.parked import ParkedQueues

__all__ = ["FlowUpkeep"]

log = logging.getLogger("mediator.flow")


#: Room without a per-instance bound.
UNBOUNDED = 1 << 30


class FlowUpkeep(Periodic):
    """Releases queued commands of limited services as room frees."""

    name = "flow-upkeep"
    label = "flow-control upkeep"
    failed = "flow-control upkeep failed"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        limits: Limits,
        flow: FlowControlSettings,
        breakers: Breakers | None,
        replica: str,
        backoff: BackoffSettings | None = None,
        store: StateStore | None = None,
        router: Router | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.keys = keys
        self.limits = limits
        self.flow = flow
        self.breakers = breakers
        self.replica = replica
        self.queues = ParkedQueues(redis, keys)
        self.leases = Leases(redis)
        self.released = 0
        #: Permits freed because their command was no longer in flight.
        self.reaped = 0
        #: Where runs are looked up to free lost permits (None: they lapse).
        self.store: StateStore | None = store
        #: The router, told which instances have no room (per-instance limits; None:
        #: routing is off, and per-instance limits do not apply).
        self.router = router
        self.redis = redis
        #: Each limited service's queue as last seen (for the Prometheus gauges): its
        #: length, and how long its oldest step has waited (seconds; 0: none waits).
        self.queued: dict[str, int] = {}
        self.oldest_wait_s: dict[str, float] = {}
        self._measured = 0.0

    @property
    def interval_s(self) -> float:
        return self.flow.release_ms / 1000

    async def tick(self) -> int:
        """Record each limited service's queue length and release what fits; how many."""
        services = sorted(self.flow.services)
        queued = await self.queues.counts(services)
        self.queued = queued
        if clock.monotonic() - self._measured >= 1.0:
            await self._measure_waits(services)
        now = now_ms()
        released = 0
        for service in services:
            await self._reap(service, now)
            limit = self.flow.services[service]
            room = await self.limits.room(service, limit, queued[service], now)
            if limit.per_instance is not None and self.router is not None:
                room = min(room, await self._instance_room(service, limit.per_instance, now))
            if not room or not self._closed(service, now) or not await self._lead(service):
                continue
            moved = await self.queues.release(service, room)
            if moved:
                log.debug("queued commands of %s: %d released", service, moved)
            released += moved
        self.released += released
        return released

    async def _measure_waits(self, services: list[str]) -> None:
        """How long each queue's oldest step has waited (once a second; Redis clock)."""
        self._measured = clock.monotonic()
        with redis_errors("reading the flow-control queues' oldest entries"):
            seconds, micros = await self.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        oldest = await self.queues.oldest(services)
        self.oldest_wait_s = {
            s: max(0, now - oldest[s]) / 1000 if s in oldest else 0.0 for s in services
        }

    async def _instance_room(self, service: str, cap: int, now: int) -> int:
        """How many more commands the instances of `service` commands may go to can take
        between them; the router learns which have none. Lost instance permits are freed
        as a service's are."""
        assert self.router is not None
        instances = self.router.up_instances(service)
        if not instances:  # none registered (or up): commands go unrouted, unlimited
            self.router.full.pop(service, None)
            return UNBOUNDED
        scopes = [f"{service}@{instance}" for instance in instances]
        for scope in scopes:
            await self._reap(scope, now)
        counts = await self.limits.in_flight(scopes)
        free = {i: cap - counts[s] for i, s in zip(instances, scopes, strict=True)}
        self.router.full[service] = {i for i, n in free.items() if n <= 0}
        return sum(max(0, n) for n in free.values())

    async def _reap(self, service: str, now: int) -> None:
        """Free the permits of commands no run has in flight any more, whose release was
        lost (a replica died between committing a reply and releasing the permit, or a
        commit it was taken for lost to another replica's): looked up in their runs once
        a tenth of the lease has passed (a permit is taken before its commit)."""
        if self.store is None:
            return
        grace = self.flow.lease_ms // 10
        old = [cid for cid, granted in await self.limits.oldest(service, 100)
               if granted <= now - grace]  # fmt: skip
        if not old:
            return
        states = await self.store.load_many(sorted({cid.split(".", 1)[0] for cid in old}))
        stale = []
        for cid in old:
            wid, _, rest = cid.partition(".")
            state = states.get(wid)
            step = state.steps.get(rest.rsplit(".", 1)[0]) if state is not None else None
            if step is None or step.status is not StepStatus.RUNNING or step.command_id != cid:
                stale.append(cid)
        if stale:
            await self.limits.release(service, stale)
            self.reaped += len(stale)
            log.info("flow control: %d lost permits of %s freed", len(stale), service)

    def _closed(self, service: str, now: int) -> bool:
        breakers = self.breakers
        return breakers is None or not breakers.enabled or breakers.gate(service, now) == "send"

    async def _lead(self, service: str) -> bool:
        ttl = max(100, self.flow.release_ms * 5)
        with redis_errors(f"taking the flow-control lease of {service}"):
            return await self.leases.hold(self.keys.flow_lease(service), self.replica, ttl)

    async def round(self) -> float:
        """One tick; one that fails leaves the queues as they are for the next."""
        await self.tick()
        return self.interval_s
