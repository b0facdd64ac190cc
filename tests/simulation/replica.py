"""One mediator replica in a simulation: the real store, runtime, outbox, breakers,
registry, router and upkeeps, on the simulation's Redis and Kafka.

Nothing of the mediator is replaced: its Lua scripts run in fakeredis's Lua 5.1 (Redis's
version), its outbox publishes through a producer that appends to the simulated log, and
its consumers are the simulation's. Two points wait at a gate for the scheduler, so
replicas interleave where a real one can stall: before a commit (between reading state
and writing it: compare-and-set races) and before a publish (between committing and
publishing: leases running out).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fakeredis import FakeAsyncRedis, FakeServer

from mediator.core import concurrency
from mediator.core.state import StepState, StepStatus, WorkflowState
from mediator.definitions import Definitions
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.flow import FlowUpkeep
from mediator.runtime.keyed import KeyUpkeep
from mediator.runtime.liveness import Marker
from mediator.runtime.outbox import Dispatcher
from mediator.runtime.parking import BreakerUpkeep
from mediator.runtime.registry import Registry, RegistryUpkeep
from mediator.runtime.timers import TimerPoller
from mediator.settings import Settings
from mediator.storage.catalog import DefinitionStore
from mediator.storage.keys import Keys
from mediator.storage.slots import SlotKey, slot_timer
from mediator.storage.store import Commit, CommitOutcome, CommitResult, Store
from tests.simulation.kafka import Log, SimProducer

__all__ = ["SimReplica"]

Gate = Callable[[str, str], Awaitable[None]]

#: What became of child runs, counted for `coverage`: cancelled by a parent that stopped
#: waiting for them, undone after completing too late, compensated by their parent.
CHILD_EVENTS = frozenset({"children_cancelled", "children_undone", "compensate_requested"})


class PauseWatch:
    """Watches every committed state for what a paused run must not do: dispatch a step
    or a compensation (a new attempt in flight, a parked one released) while it stays
    paused. A commit that applied a control is not judged: a resume and a pause in one
    batch may rightly send between them."""

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self.last: dict[str, WorkflowState] = {}
        self.problems: list[str] = []
        self.seen: Counter[str] = Counter()
        #: Concurrency limits per workflow, and the runs in progress per key as committed.
        self.limits = limits or {}
        self.admitted: dict[tuple[str, str], set[str]] = {}

    def saw(self, state: WorkflowState) -> None:
        before = self.last.get(state.workflow_id)
        self.last[state.workflow_id] = state
        self._admission(before, state)
        self._queued_on_fallback(before, state)
        if before is None:
            return
        if state.paused_ms is not None and before.paused_ms is None:
            self.seen["paused"] += 1
        if len(state.inbox or ()) > len(before.inbox or ()):
            self.seen["signal_kept"] += 1
        was, now = before.steps.get("approve"), state.steps.get("approve")
        if was is not None and now is not None and now.status is StepStatus.COMPLETED:
            if was.status is StepStatus.WAITING:
                self.seen["signalled"] += 1
            elif was.status is not StepStatus.COMPLETED:
                self.seen["kept_signal_taken"] += 1
        if len(state.held or ()) > len(before.held or ()):
            self.seen["held"] += 1
        if before.paused_ms is None or state.paused_ms is None:
            return
        if (state.controls or []) != (before.controls or []):
            return
        sent = _dispatched(before.steps, state.steps)
        sent += [f"undo {s}" for s in _dispatched(before.compensations or {},
                                                  state.compensations or {})]  # fmt: skip
        if sent:
            self.problems.append(
                f"paused: {state.workflow_id} rev {state.rev} sent {sent} while paused"
            )

    def _queued_on_fallback(self, before: WorkflowState | None, state: WorkflowState) -> None:
        """Counts steps rerouted to their fallback and queued by its flow-control limit."""
        was = before.steps.get("charge") if before is not None else None
        now = state.steps.get("charge")
        if now is not None and now.status is StepStatus.QUEUED and now.via is not None:
            if was is None or was.status is not StepStatus.QUEUED:
                self.seen["queued_on_fallback"] += 1

    def _admission(self, before: WorkflowState | None, state: WorkflowState) -> None:
        """No more runs of a concurrency key in progress at once than its limit, and no
        more attempts of a keyed step in flight at once than its key's."""
        for sid, step in state.steps.items():
            scope = f"{state.workflow}.{sid}"
            if scope not in self.limits:
                continue
            was = before.steps.get(sid) if before is not None else None
            if step.status is StepStatus.QUEUED and (was is None or was.status is not step.status):
                self.seen["step_queued_by_key"] += 1
            self._hold(scope, step.key or "", f"{state.workflow_id}.{sid}",
                       step.status is StepStatus.RUNNING and not state.terminal)  # fmt: skip
        if state.concurrency_key is None or state.workflow not in self.limits:
            return
        key = (state.workflow, state.concurrency_key)
        running = self.admitted.setdefault(key, set())
        if state.queued_ms is not None and (before is None or before.queued_ms is None):
            self.seen["run_queued"] += 1
        if state.terminal or state.queued_ms is not None:
            running.discard(state.workflow_id)
            return
        running.add(state.workflow_id)
        if len(running) > self.limits[state.workflow]:
            self.problems.append(
                f"concurrency: {sorted(running)} in progress at once under key {key}, "
                f"limit {self.limits[state.workflow]}"
            )

    def _hold(self, scope: str, key: str, what: str, running: bool) -> None:
        if not running:  # a completed step keeps no key: drop it under whichever it held
            for (held_scope, _), holders in self.admitted.items():
                if held_scope == scope:
                    holders.discard(what)
            return
        holders = self.admitted.setdefault((scope, key), set())
        holders.add(what)
        if len(holders) > self.limits[scope]:
            self.problems.append(
                f"concurrency: {sorted(holders)} in flight at once under key {(scope, key)}, "
                f"limit {self.limits[scope]}"
            )


def _dispatched(before: dict[str, StepState], after: dict[str, StepState]) -> list[str]:
    """The steps whose attempt went out between two states."""
    out = []
    for sid, step in after.items():
        was = before.get(sid)
        if step.status is StepStatus.RUNNING and (
            was is None or was.status is not StepStatus.RUNNING or was.attempt != step.attempt
        ):
            out.append(sid)
    return out


class GatedStore(Store):
    """The real store, waiting at the scheduler's gate before each commit and after one
    that left messages to send, and noting every revision it committed."""

    def __init__(self, *args: Any, gate: Callable[[str], Awaitable[None]],
                 revisions: list[tuple[str, int]], watch: PauseWatch,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self._gate = gate
        self._revisions = revisions
        self._watch = watch
        #: The runs each batch still in progress has committed: what follows its commit
        #: (a queue place put back after a failover lost it) is not done yet.
        self.unsettled: dict[asyncio.Task[Any], set[str]] = {}
        #: Told the runs of each batch that finished (see `World.orphaned`).
        self.on_settled: Callable[[set[str]], None] = lambda runs: None
        #: Told each run committed (see `World.rolled_back`).
        self.on_commit: Callable[[str], None] = lambda workflow_id: None

    async def commit_many(self, commits: Sequence[Commit], now_ms: int) -> list[CommitResult]:
        if commits:
            await self._gate("commit")
        results = await super().commit_many(commits, now_ms)
        committed = False
        for commit, result in zip(commits, results, strict=True):
            if result.outcome is CommitOutcome.COMMITTED:
                self._settling(commit.state.workflow_id)
                self.on_commit(commit.state.workflow_id)
                self._revisions.append((commit.state.workflow_id, commit.state.rev))
                self._watch.saw(commit.state)
                for key, n in commit.counters.items():
                    if key.what in CHILD_EVENTS:
                        self._watch.seen[key.what] += n
                committed = True
        if committed and any(commit.outbox for commit in commits):
            await self._gate("committed")  # in the outbox, leased, not yet sent
        return results

    def _settling(self, workflow_id: str) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        if task not in self.unsettled:
            self.unsettled[task] = set()
            task.add_done_callback(lambda done: self.on_settled(self.unsettled.pop(done, set())))
        self.unsettled[task].add(workflow_id)

    async def claim_timers(
        self, limit: int, lease_ms: int, shards: Sequence[int] | None = None
    ) -> dict[int, list[tuple[str, int]]]:
        claimed = await super().claim_timers(limit, lease_ms, shards)
        if claimed:
            await self._gate("timers")  # claimed, not yet applied
        return claimed

    async def timers_done(self, done: Sequence[tuple[int, str]]) -> None:
        if done:
            await self._gate("stale")  # applied (as stale), not yet removed
        await super().timers_done(done)


class SimReplica:
    """A replica's real parts, and the rounds the scheduler can run on it."""

    def __init__(
        self,
        name: str,
        server: FakeServer,
        log: Log,
        settings: Settings,
        definitions: Definitions,
        gate: Gate,
        revisions: list[tuple[str, int]],
        hand_ons: list[tuple[str, str, str, int]],
        watch: PauseWatch,
    ) -> None:
        self.name = name
        self.redis = FakeAsyncRedis(server=server)
        keys = Keys(settings.redis.key_prefix, settings.redis.shards)
        redis_settings = settings.redis
        self.store = GatedStore(
            self.redis, keys, retention_ms=round(redis_settings.retention_s * 1000),
            lease_ms=settings.outbox.lease_ms,
            tombstone_ms=round(redis_settings.tombstone_s * 1000),
            gate=lambda point: gate(name, point), revisions=revisions, watch=watch,
        )  # fmt: skip
        self.catalog = DefinitionStore(self.redis, keys, definitions)
        topics = settings.kafka.topics
        self.producer = SimProducer(log, lambda point: gate(name, point))
        self.dispatcher = Dispatcher(
            self.store, self.producer, topics=topics, backoff=settings.backoff,
            sweep_interval_ms=settings.outbox.sweep_interval_ms,
            sweep_batch=settings.outbox.sweep_batch, clear_ms=settings.outbox.clear_ms,
        )  # fmt: skip
        self.breakers = Breakers(self.redis, keys, settings.circuit_breaker, name)
        self.registry = Registry(self.redis, keys, settings.discovery)
        self.runtime = Runtime(
            definitions=self.catalog, store=self.store, dispatcher=self.dispatcher,
            topics=topics, limits=settings.limits, breakers=self.breakers,
            registry=self.registry, balancing=settings.load_balancing, replica=name,
            flow=settings.flow_control, events=True,
        )  # fmt: skip
        assert self.runtime.limiter is not None
        self.flow = FlowUpkeep(
            self.redis, keys, self.runtime.limiter, settings.flow_control, self.breakers, name,
            settings.backoff, self.store,
        )  # fmt: skip
        assert self.runtime.slots is not None
        #: Told each run whose slot or queue place a batch frees while the run, as Redis
        #: holds it, still claims it (see `World.rolled_back`).
        self.on_stale_release: Callable[[str, str], None] = lambda workflow_id, member: None
        release_many = self.runtime.slots.release_many

        async def recorded_release(freed: Any, now_ms: int) -> list[str]:
            await self._stale_releases(freed)
            return await release_many(freed, now_ms)

        self.runtime.slots.release_many = recorded_release  # type: ignore[method-assign]
        self.keyed = KeyUpkeep(
            self.redis, keys, self.runtime.slots, self.store, name, settings.backoff,
            grace_ms=500, audit_ms=500, missing_ms=60_000,
        )  # fmt: skip
        self.upkeep = BreakerUpkeep(
            self.redis, keys, self.breakers, definitions.services, name, settings.backoff
        )
        self.upkeep.limited = frozenset(settings.flow_control.services)
        marker = Marker(self.redis, keys, self.producer, topics.health, settings.discovery, name)
        self.registry_upkeep = RegistryUpkeep(self.registry, self.runtime.stats, marker=marker)
        router = self.runtime.router
        assert router is not None
        hand_on = router.hand_on

        async def recorded_hand_on(service: str, instance: str) -> int:
            moved = await hand_on(service, instance)
            hand_ons.append((name, service, instance, moved))
            return moved

        router.hand_on = recorded_hand_on  # type: ignore[method-assign]
        self.registry_upkeep.on_deaths.append(router.on_deaths)
        self.registry_upkeep.catch_up = router.sweep_down
        self.timers = TimerPoller(self.store, self.runtime, settings.timers, settings.backoff)
        self.boundaries = {
            kind: Boundary(kind, self.runtime.reject, settings.backoff)
            for kind in ("inbound", "control", "health")
        }
        self.handlers: dict[str, Callable[[Sequence[Any]], Awaitable[None]]] = {
            "inbound": self.runtime.handle_inbound,
            "control": self.runtime.handle_controls,
            "health": self.runtime.handle_health,
        }

    async def _stale_releases(self, freed: dict[SlotKey, Sequence[str]]) -> None:
        """Tell `on_stale_release` of the members being freed that their run, as stored,
        still claims: the commit that gave them up was lost (a failover rolled it back
        while the batch that made it was between its commit and freeing them)."""
        members = [member for group in freed.values() for member in group]
        runs = sorted({slot_timer(member).workflow_id for member in members})
        stored = await Store.load_many(self.store, runs)
        for member in members:
            state = stored.get(slot_timer(member).workflow_id)
            if state is not None and member in concurrency.claims(state):
                self.on_stale_release(state.workflow_id, member)

    async def start(self) -> None:
        await self.store.check_layout()
        await self.catalog.publish()

    async def consume(self, kind: str, records: Sequence[Any]) -> bool:
        """One batch through the subscriber's error boundary: True when its offsets may
        move on."""
        return await self.boundaries[kind].run(records, self.handlers[kind])

    async def poll_timers(self) -> None:
        await self.timers.poll_once()

    async def sweep_outbox(self) -> None:
        await self.dispatcher.renew_inflight()
        await self.dispatcher.sweep_once()

    async def breaker_upkeep(self) -> None:
        await self.upkeep.tick()

    async def flow_round(self) -> None:
        await self.flow.tick()

    async def key_round(self) -> None:
        await self.keyed.tick()

    async def registry_round(self) -> None:
        await self.registry_upkeep.round()
