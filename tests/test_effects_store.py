"""Every effect runs as the workflow intends, through the runtime and the real Redis:
timers (a poison one set aside alone; a stale one never taking a re-armed one with it),
parked queues that hold exactly the parked steps, drained even for services no loaded
definition names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from mediator import clock
from mediator.cli.infra import EmbeddedRedis
from mediator.core.signing import Keyring, Signatures
from mediator.core.state import StepStatus
from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.errors import StateUnavailable
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.parking import BreakerUpkeep
from mediator.runtime.registry import Registry
from mediator.runtime.timers import TimerPoller
from mediator.settings import (
    BackoffSettings,
    BreakerSettings,
    DiscoverySettings,
    FlowControlSettings,
    LoadBalancingSettings,
    TimerSettings,
)
from mediator.storage.catalog import DefinitionStore
from mediator.storage.connection import text
from mediator.storage.keys import Keys, concurrency_digest, workflow_id_for
from mediator.storage.metrics import MetricsStore
from mediator.storage.parked import ParkedQueues
from mediator.storage.slots import Slots
from mediator.storage.store import Store
from tests.helpers import TEST_KEYS, TOPICS, Record, RecordingDispatcher, wait_for
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    DeadLetter,
    ErrorInfo,
    HealthEvent,
    HealthStatus,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    WorkflowStatus,
)


def _workflows(*specs: dict[str, Any]) -> Definitions:
    return Definitions(wf for spec in specs for wf in parse_workflows(spec))


class _Harness:
    """One runtime on the real Redis, its records numbered as a consumer would see them."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        definitions: Definitions,
        store: Store | None = None,
        breakers: Breakers | None = None,
        registry: Registry | None = None,
        signatures: Signatures | None = None,
        flow: FlowControlSettings | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store or Store(redis, keys, retention_ms=60_000)
        self.dispatcher = RecordingDispatcher()
        self.breakers = breakers
        self.runtime = Runtime(
            definitions=DefinitionStore(redis, keys, definitions),
            store=self.store,
            dispatcher=self.dispatcher,
            topics=TOPICS,
            breakers=breakers,
            registry=registry,
            balancing=LoadBalancingSettings() if registry is not None else None,
            signatures=signatures,
            flow=flow,
        )
        self.offset = 0

    def record(self, topic: str, event: Any) -> Record:
        self.offset += 1
        return Record(topic, 0, self.offset, event.model_dump_json().encode())

    async def request(self, request_id: str, workflow: str) -> str:
        request = RequestEvent(request_id=request_id, workflow=workflow)
        await self.runtime.handle_requests([self.record(TOPICS.requests, request)])
        return workflow_id_for(request_id)

    def commands(self) -> list[CommandEvent]:
        return [CommandEvent.model_validate_json(m.value) for m in self.dispatcher.sent
                if m.kind == "command"]  # fmt: skip

    async def fail(self, command: CommandEvent) -> None:
        reply = ReplyEvent(
            command_id=command.command_id, workflow_id=command.workflow_id, step=command.step,
            attempt=command.attempt, status=ReplyStatus.ERROR,
            error=ErrorInfo(message="declined", code="declined"),
        )  # fmt: skip
        await self.runtime.handle_replies([self.record(TOPICS.replies, reply)])

    async def control(self, action: ControlAction, wid: str, control_id: str) -> None:
        event = ControlEvent(control_id=control_id, action=action, workflow_id=wid, issued_ms=0)
        await self.runtime.handle_controls([self.record(TOPICS.control, event)])

    async def timers(self, shard: int) -> list[str]:
        return [text(m) for m in await self.redis.zrange(self.keys.timers(shard), 0, -1)]


class _ClaimHook(Store):
    """The real store; `hooks` run at the claim of timers and before stale ones are
    removed, where another replica's work can land in a real deployment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_claim: list[Any] = []
        self.before_removal: list[Any] = []

    async def claim_timers(self, limit: int, lease_ms: int, shards: Any = None) -> Any:
        claimed = await super().claim_timers(limit, lease_ms, shards)
        while claimed and self.after_claim:
            await self.after_claim.pop(0)()
        return claimed

    async def timers_done(self, done: Sequence[Any]) -> None:
        while self.before_removal:
            await self.before_removal.pop(0)()
        await super().timers_done(done)


async def test_a_stale_timer_never_removes_the_one_a_retry_set_again(
    redis_client: Redis, key_prefix: str
) -> None:
    """The deadline of a run is claimed; before it is applied the run fails (so it is
    stale); before it is removed an operator retries the run, which sets its deadline
    again. The re-armed deadline must survive the removal of the stale one."""
    keys = Keys(key_prefix, 1)
    store = _ClaimHook(redis_client, keys, retention_ms=60_000)
    spec = {"name": "w", "timeout": "150ms", "steps": [{"id": "a", "service": "s", "action": "x"}]}
    harness = _Harness(redis_client, keys, _workflows(spec), store=store)
    wid = await harness.request("r-1", "w")
    [command] = harness.commands()

    async def fail_the_run() -> None:
        await harness.fail(command)

    async def retry_the_run() -> None:
        await harness.control(ControlAction.RETRY, wid, "c-1")

    store.after_claim.append(fail_the_run)
    store.before_removal.append(retry_the_run)
    poller = TimerPoller(store, harness.runtime, TimerSettings(lease_ms=5_000))
    await _when_due(poller)

    state = await store.load(wid)
    assert state is not None and state.status.value == "running"
    deadlines = [t for t in await harness.timers(0) if t.startswith(f"deadline|{wid}|")]
    assert deadlines, "the retried run has no deadline timer left"


async def _when_due(poller: TimerPoller) -> None:
    """Poll until a timer was claimed (the deadline falls due within 150 ms)."""
    await wait_for(poller.poll_once, timeout=2.0, interval=0.02, what="a timer to fall due")


async def test_a_timer_that_cannot_be_applied_is_set_aside_alone(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 1)
    spec = {"name": "w", "steps": [{"id": "a", "service": "s", "action": "x", "timeout": "50ms"}]}
    harness = _Harness(redis_client, keys, _workflows(spec))
    good = await harness.request("good", "w")
    bad = await harness.request("bad", "w")
    # One run's state no longer decodes (a bad write, a tool gone wrong); another
    # replica (nothing cached) fires the timers.
    await redis_client.hset(keys.workflow(bad), "state", b"{not json")
    other = _Harness(redis_client, keys, _workflows(spec), store=harness.store)
    poller = TimerPoller(harness.store, other.runtime, TimerSettings(lease_ms=5_000))
    await _when_due(poller)

    state = await harness.store.load(good)
    assert state is not None and state.steps["a"].status.value == "failed"  # it timed out
    dead = await redis_client.hgetall(keys.dead_timers(0))
    assert [text(k) for k in dead] == [f"timeout|{bad}|a|1"]
    assert "CorruptState" in orjson.loads(next(iter(dead.values())))["reason"]
    assert (await redis_client.hgetall(keys.stats))[b"timers:poisoned"] == b"1"
    assert not [t for t in await harness.timers(0) if bad in t]  # not claimed again


async def _timed_out(harness: _Harness, wid: str, within: float) -> float:
    """Seconds until run `wid`'s step ``a`` failed (its timeout fired), at most `within`."""
    started = time.monotonic()

    async def failed() -> bool:
        state = await harness.store.load(wid)
        return state is not None and state.steps["a"].status.value == "failed"

    await wait_for(failed, timeout=within, interval=0.01, what="the step's timeout to fire")
    return time.monotonic() - started


async def test_a_timer_this_replica_sets_fires_when_due_not_a_poll_interval_later(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 2)
    spec = {"name": "w", "steps": [{"id": "a", "service": "s", "action": "x", "timeout": "150ms"}]}
    harness = _Harness(redis_client, keys, _workflows(spec))
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(poll_interval_ms=10_000))
    harness.runtime.on_timer_set = poller.nudge  # as `Mediator` wires them
    poller.start()
    try:
        await asyncio.sleep(0.1)  # the first poll found nothing: it sleeps the interval
        wid = await harness.request("r-1", "w")
        # Due after 150 ms: the commit that set it woke the poller for it.
        assert await _timed_out(harness, wid, within=5.0) < 5.0
    finally:
        await poller.stop()


async def test_a_poll_sleeps_only_until_the_earliest_timer_falls_due(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 2)
    spec = {"name": "w", "steps": [{"id": "a", "service": "s", "action": "x", "timeout": "400ms"}]}
    setter = _Harness(redis_client, keys, _workflows(spec))
    wid = await setter.request("r-1", "w")  # set by another replica: nothing nudges
    firing = _Harness(
        redis_client, keys, _workflows(spec), store=Store(redis_client, keys, retention_ms=60_000)
    )
    poller = TimerPoller(firing.store, firing.runtime, TimerSettings(poll_interval_ms=10_000))
    poller.start()
    try:
        # The first poll finds it due in ~400 ms and sleeps that long, not 10 s.
        assert await _timed_out(setter, wid, within=5.0) < 5.0
    finally:
        await poller.stop()


class _ShardsPolled(Store):
    """The real store, noting which shards each timer claim polled (None: every one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polled: list[list[int] | None] = []

    async def claim_timers(self, limit: int, lease_ms: int, shards: Any = None) -> Any:
        self.polled.append(None if shards is None else list(shards))
        return await super().claim_timers(limit, lease_ms, shards)


async def test_a_poll_between_full_ones_claims_only_the_shards_with_a_timer_due(
    redis_client: Redis, key_prefix: str
) -> None:
    """Timers falling due one after another cost a script call on their own shard, not
    one on every shard: 16 shards, one run's timeout set by this replica (nudged) and one
    set by another (seen by the first poll), each claimed by a poll of its shard alone."""
    keys = Keys(key_prefix, 16)
    spec = {"name": "w", "steps": [{"id": "a", "service": "s", "action": "x", "timeout": "300ms"}]}
    setter = _Harness(redis_client, keys, _workflows(spec))
    theirs = await setter.request("r-theirs", "w")
    store = _ShardsPolled(redis_client, keys, retention_ms=60_000)
    harness = _Harness(redis_client, keys, _workflows(spec), store=store)
    poller = TimerPoller(store, harness.runtime, TimerSettings(poll_interval_ms=10_000))
    harness.runtime.on_timer_set = poller.nudge
    poller.start()
    try:
        await asyncio.sleep(0.1)  # the first poll: every shard, it learns of theirs
        ours = await harness.request("r-ours", "w")
        await _timed_out(harness, theirs, within=5.0)
        await _timed_out(harness, ours, within=5.0)
    finally:
        await poller.stop()
    assert poller.failures == 0
    assert store.polled[0] is None
    assert store.polled[1:], "no poll after the first"
    expected = {keys.shard_of(theirs), keys.shard_of(ours)}
    assert len(expected) == 2
    assert all(p is not None and set(p) <= expected for p in store.polled[1:]), store.polled


async def test_a_poller_with_no_timers_known_polls_every_interval_without_failing(
    redis_client: Redis, key_prefix: str
) -> None:
    """No timer anywhere: every round polls every shard once an interval, and none fails
    (a failed round would wait out a backoff, firing timers set meanwhile that late)."""
    keys = Keys(key_prefix, 4)
    store = _ShardsPolled(redis_client, keys, retention_ms=60_000)
    harness = _Harness(redis_client, keys, _workflows(), store=store)
    poller = TimerPoller(store, harness.runtime, TimerSettings(poll_interval_ms=20))
    poller.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await poller.stop()
    assert poller.failures == 0
    assert len(store.polled) >= 5, store.polled  # every 20 ms for 0.5 s: ~25
    assert set(map(str, store.polled)) == {"None"}  # only full polls: nothing else is due


async def test_a_shard_whose_claim_fails_holds_up_no_other_shards_timers(
    redis_client: Redis, key_prefix: str
) -> None:
    """One shard's claim fails on its own (its timers key holds a string, so Redis answers
    WRONGTYPE for that shard alone, as a cluster node away fails only its slots): the
    timers of the other shards fire on time, and the failing shard is left out of the
    polls for its backoff rather than polled again every interval."""
    keys = Keys(key_prefix, 4)
    spec = {"name": "w", "steps": [{"id": "a", "service": "s", "action": "x", "timeout": "200ms"}]}
    setter = _Harness(redis_client, keys, _workflows(spec))
    wid = await setter.request("r-1", "w")
    bad = (keys.shard_of(wid) + 1) % keys.shards
    await redis_client.set(keys.timers(bad), "not a sorted set")
    store = _ShardsPolled(redis_client, keys, retention_ms=60_000)
    harness = _Harness(redis_client, keys, _workflows(spec), store=store)
    backoff = BackoffSettings(initial_ms=5_000, max_ms=5_000)
    poller = TimerPoller(store, harness.runtime, TimerSettings(poll_interval_ms=50), backoff)
    poller.start()
    try:
        assert await _timed_out(setter, wid, within=3.0) < 3.0
        await asyncio.sleep(0.2)  # a few more full polls
    finally:
        await poller.stop()
    assert poller.failures == 0  # no round failed: the others' timers were applied
    assert (poller.failing_shards, poller.shard_failures) == (1, 1)
    assert store.polled[0] is None
    assert len(store.polled) >= 3, store.polled
    assert all(p is not None and bad not in p for p in store.polled[1:]), store.polled
    # A timer this replica sets there is not polled for before the backoff ends either.
    retry_at = poller._due[bad]  # the end of its backoff
    poller.nudge({bad: 0})
    assert poller._due[bad] == retry_at
    # Once the shard answers again it is polled as any other.
    await redis_client.delete(keys.timers(bad))
    await poller.poll_once([bad])
    assert poller.failing_shards == 0


async def test_a_timer_a_freed_slot_makes_due_is_polled_for_at_once(
    redis_client: Redis, key_prefix: str
) -> None:
    """A slot handed on (or a parked step released) makes a timer due now without a
    commit: the replica that did it polls that timer's shard at once, not a whole
    interval later."""
    keys = Keys(key_prefix, 4)
    store = _ShardsPolled(redis_client, keys, retention_ms=60_000)
    harness = _Harness(redis_client, keys, _workflows(), store=store)
    poller = TimerPoller(store, harness.runtime, TimerSettings(poll_interval_ms=10_000))
    slots = Slots(redis_client, keys)
    slots.on_due = poller.nudge  # as `Mediator` wires them
    poller.start()
    try:
        await asyncio.sleep(0.1)  # the first poll found nothing: the next full one is 10 s off
        await slots.admit(["run-9|0"])
        shard = keys.shard_of("run-9")
        await wait_for(lambda: [shard] in store.polled, timeout=2.0, what="a poll of its shard")
    finally:
        await poller.stop()


async def test_releasing_parked_steps_tells_which_shards_have_timers_due_now(
    redis_client: Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix, 4)
    queues = ParkedQueues(redis_client, keys)
    heard: list[dict[int, int]] = []
    queues.on_due = lambda due: heard.append(dict(due))
    await redis_client.zadd(keys.parked(2, "pay"), {"unpark|run-1|a|1": 5})
    assert await queues.release("pay", 10) == 1
    assert heard == [{2: 0}]
    assert await queues.release("pay", 10) == 0  # nothing moved: nothing to tell
    assert heard == [{2: 0}]


_OPEN = {"version": 1, "state": "open", "counter": 3, "success": 0, "opened_ms": 10**13}


def _open_breaker(redis: Redis, keys: Keys, service: str) -> Any:
    """Open `service`'s breaker until long after the test (its recovery far ahead)."""
    return redis.hset(keys.breaker(service), mapping={**_OPEN, "probe_until_ms": 0})


async def test_a_finished_run_leaves_nothing_parked(redis_client: Redis, key_prefix: str) -> None:
    keys = Keys(key_prefix, 1)
    spec = {"name": "w", "steps": [{"id": "a", "service": "pay", "action": "x", "timeout": "5s"}]}
    breakers = Breakers(redis_client, keys, BreakerSettings(), "r1")
    await _open_breaker(redis_client, keys, "pay")
    await breakers.refresh(["pay"])
    harness = _Harness(redis_client, keys, _workflows(spec), breakers=breakers)
    wid = await harness.request("r-1", "w")
    assert harness.commands() == []  # parked
    assert await redis_client.zcard(keys.parked(0, "pay")) == 1
    await harness.control(ControlAction.CANCEL, wid, "k-1")
    state = await harness.store.load(wid)
    assert state is not None and state.terminal
    assert await redis_client.zcard(keys.parked(0, "pay")) == 0
    assert not [t for t in await harness.timers(0) if wid in t]


async def test_parked_steps_of_a_service_no_loaded_definition_names_are_drained(
    redis_client: Redis, key_prefix: str
) -> None:
    """A run on an older plan parks its step for `legacy`; the replicas now load a
    definition that no longer names it. Once the breaker closes, the step goes."""
    keys = Keys(key_prefix, 1)
    old = {"name": "w", "steps": [{"id": "a", "service": "legacy", "action": "x"}]}
    breakers = Breakers(redis_client, keys, BreakerSettings(drain_rate=100), "r1")
    await _open_breaker(redis_client, keys, "legacy")
    await breakers.refresh(["legacy"])
    harness = _Harness(redis_client, keys, _workflows(old), breakers=breakers)
    wid = await harness.request("r-1", "w")
    assert await redis_client.zcard(keys.parked(0, "legacy")) == 1

    # A replica of the new deployment: its definitions name other services only.
    upkeep = BreakerUpkeep(
        redis_client, keys, Breakers(redis_client, keys, BreakerSettings(drain_rate=100), "r2"),
        lambda: {"payments"}, "r2",
    )  # fmt: skip
    await upkeep.breakers.reset("legacy")
    await upkeep.tick()
    await upkeep.tick()
    assert await redis_client.zcard(keys.parked(0, "legacy")) == 0
    assert f"unpark|{wid}|a|1" in await harness.timers(0)


async def test_an_instance_that_left_cleanly_has_nothing_handed_on(
    redis_client: Redis, key_prefix: str
) -> None:
    """Work routed to an instance that then leaves cleanly (it answered what it took and
    said `down`; its replies may still be on their way) is not sent again; the work of
    one that died is."""
    keys = Keys(key_prefix, 1)
    settings = DiscoverySettings(missed_heartbeats=2, grace_ms=0)
    registry = Registry(redis_client, keys, settings)
    spec = {"name": "w", "steps": [{"id": "a", "service": "inventory", "action": "x"}]}
    harness = _Harness(redis_client, keys, _workflows(spec), registry=registry)
    router = harness.runtime.router
    assert router is not None

    async def routed_to(instance: str) -> str:
        beat = HealthEvent(service="inventory", instance=instance, ts_ms=0, partitions=[0],
                           interval_ms=100)  # fmt: skip
        await registry.apply([beat])
        await registry.refresh()
        wid = await harness.request(f"r-{instance}", "w")
        assert harness.commands()[-1].instance == instance
        return wid

    await routed_to("left-1")
    left = HealthEvent(service="inventory", instance="left-1", ts_ms=0, status=HealthStatus.DOWN)
    await registry.apply([left])
    await registry.refresh()
    assert await router.sweep_down() == 0
    await routed_to("dead-1")
    await asyncio.sleep(0.3)  # dead-1's deadline passes; the topic is read past it
    seconds, micros = await redis_client.time()
    await redis_client.hset(keys.health_watermark, "partitions", 1)
    await registry.apply([], {0: seconds * 1000 + micros // 1000})
    assert [c.instance for c in await registry.sweep()] == ["dead-1"]
    await registry.refresh()
    assert await router.sweep_down() == 1
    reroutes = [t for t in await harness.timers(0) if t.startswith("reroute|")]
    assert reroutes == [f"reroute|{workflow_id_for('r-dead-1')}|a|1"]


async def test_redis_refusing_writes_during_a_probe_is_transient(
    own_redis: EmbeddedRedis,
) -> None:
    """Redis out of memory (or read-only after a failover, or refusing writes after a
    failed save) while a breaker probe is taken: the batch is redelivered later, not
    dead-lettered, and goes through once Redis takes writes again."""
    redis = Redis.from_url(own_redis.url)
    keys = Keys("oom", 1)
    spec = {"name": "w", "steps": [{"id": "a", "service": "pay", "action": "x"}]}
    breakers = Breakers(redis, keys, BreakerSettings(recovery_timeout="1s"), "r1")
    await redis.hset(keys.breaker("pay"), mapping={**_OPEN, "opened_ms": 1})  # probe due
    await breakers.refresh(["pay"])
    harness = _Harness(redis, keys, _workflows(spec), breakers=breakers)
    boundary = Boundary("inbound", harness.runtime.reject, BackoffSettings(initial_ms=1))
    request = RequestEvent(request_id="r-1", workflow="w")
    record = harness.record(TOPICS.requests, request)
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1")
        assert await boundary.run([record], harness.runtime.handle_inbound) is False
        assert harness.dispatcher.direct == [] and boundary.isolated == 0
        await redis.config_set("maxmemory", "0")
        assert await boundary.run([record], harness.runtime.handle_inbound) is True
        [probe] = harness.commands()
        assert probe.service == "pay" and breakers.stats.probes == 1
    finally:
        await redis.config_set("maxmemory", "0")
        await redis.aclose()


async def test_series_names_and_instance_reports_do_not_grow_for_ever(
    redis_client: Redis, key_prefix: str
) -> None:
    """Metrics series names of instances long gone leave the list once their buckets
    expired; the router forgets the reports of instances the registry forgot."""
    keys = Keys(key_prefix, 1)
    store = MetricsStore(redis_client, keys, bucket_s=1, window_ms=1_000)  # kept 2 s
    old = clock.now_ms() // 1000
    await store.write({("inst", "inventory/gone-1", old): {"ok": 1}})
    await redis_client.zadd(keys.metric_names("inst"), {"inventory/gone-1": old - 60})
    await store.write({("inst", "inventory/live-1", old): {"ok": 1}})
    assert await store.names("inst") == ["inventory/live-1"]

    registry = Registry(redis_client, keys, DiscoverySettings(forget_after="1ms"))
    spec = {"name": "w", "steps": [{"id": "a", "service": "inventory", "action": "x"}]}
    harness = _Harness(redis_client, keys, _workflows(spec), registry=registry)
    router = harness.runtime.router
    assert router is not None
    beat = HealthEvent(service="inventory", instance="gone-1", ts_ms=0, partitions=[0])
    await registry.apply([beat])
    await registry.refresh()
    await harness.request("r-1", "w")  # routes: the instance's report is noted
    assert set(router._reported["inventory"]) == {"gone-1"}
    # It leaves and is forgotten by the registry; the router's next look forgets it too.
    await registry.apply([beat.model_copy(update={"status": HealthStatus.DOWN})])
    await asyncio.sleep(0.01)
    await registry.sweep()  # forgets instances down for longer than forget_after
    await registry.refresh()
    await harness.request("r-2", "w")
    assert router._reported["inventory"] == {}


async def test_a_step_released_and_parked_again_is_queued_again(
    redis_client: Redis, key_prefix: str
) -> None:
    """The breaker closed and the parked step was released; the replica that fires its
    release still sees the breaker open (its mirror not refreshed yet, or it opened again)
    and parks it again under the same name: it must be back in the queue, or nothing would
    ever release it."""
    keys = Keys(key_prefix, 1)
    spec = {"name": "w", "steps": [{"id": "a", "service": "pay", "action": "x"}]}
    stale = Breakers(redis_client, keys, BreakerSettings(drain_rate=100), "r1")
    await _open_breaker(redis_client, keys, "pay")
    await stale.refresh(["pay"])
    harness = _Harness(redis_client, keys, _workflows(spec), breakers=stale)
    wid = await harness.request("r-1", "w")
    member = f"unpark|{wid}|a|1"
    assert [text(m) for m in await redis_client.zrange(keys.parked(0, "pay"), 0, -1)] == [member]
    upkeep = BreakerUpkeep(
        redis_client, keys, Breakers(redis_client, keys, BreakerSettings(drain_rate=100), "r2"),
        lambda: {"pay"}, "r2",
    )  # fmt: skip
    await upkeep.breakers.reset("pay")
    await upkeep.tick()
    await upkeep.tick()
    assert member in await harness.timers(0)  # released
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 1
    assert harness.commands() == []  # parked again
    assert [text(m) for m in await redis_client.zrange(keys.parked(0, "pay"), 0, -1)] == [member]
    assert member not in await harness.timers(0)


async def _parked_queue(redis: Redis, keys: Keys, service: str) -> list[tuple[str, float]]:
    """The members of `service`'s parked queue in every shard, with their scores, in
    queue order."""
    found = []
    for shard in range(keys.shards):
        found += await redis.zrange(keys.parked(shard, service), 0, -1, withscores=True)
    return sorted(((text(m), s) for m, s in found), key=lambda pair: pair[1])


async def test_a_step_released_and_queued_again_keeps_its_place_in_the_queue(
    redis_client: Redis, key_prefix: str
) -> None:
    """The oldest parked step is released, and the replica that fires its release parks
    it again (the breaker open again, or flow control refusing it a permit): it goes back
    at the score it had, ahead of the steps parked after it, not behind them (under
    sustained overload a step sent to the back again and again would wait for ever)."""
    keys = Keys(key_prefix, 2)
    spec = {"name": "w", "steps": [{"id": "a", "service": "pay", "action": "x"}]}
    await _open_breaker(redis_client, keys, "pay")
    stale = Breakers(redis_client, keys, BreakerSettings(), "r1")
    await stale.refresh(["pay"])
    harness = _Harness(redis_client, keys, _workflows(spec), breakers=stale)
    first = await harness.request("r-1", "w")
    await asyncio.sleep(0.01)
    second = await harness.request("r-2", "w")

    def queue() -> Awaitable[list[tuple[str, float]]]:
        return _parked_queue(redis_client, keys, "pay")

    before = await queue()
    assert [m for m, _ in before] == [f"unpark|{first}|a|1", f"unpark|{second}|a|1"]
    assert await ParkedQueues(redis_client, keys).release("pay", 1) == 1
    shard = keys.shard_of(first)
    released = keys.released(shard, "pay")
    assert await redis_client.hgetall(released) == {
        f"unpark|{first}|a|1".encode(): str(int(before[0][1])).encode()
    }
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 1
    assert harness.commands() == []  # parked again: the breaker is still open here
    assert await queue() == before  # in its place, at its first score
    assert await redis_client.exists(released) == 0


async def test_a_step_released_and_refused_a_permit_keeps_its_place_in_the_queue(
    redis_client: Redis, key_prefix: str
) -> None:
    """The same with flow control: the oldest queued step is released while the one
    command in flight still holds the only permit, so the replica that fires its release
    is refused a permit and queues it again, in its place ahead of the younger step."""
    keys = Keys(key_prefix, 2)
    spec = {"name": "w", "steps": [{"id": "a", "service": "pay", "action": "x"}]}
    flow = FlowControlSettings.model_validate({"services": {"pay": {"max_in_flight": 1}}})
    harness = _Harness(redis_client, keys, _workflows(spec), flow=flow)
    await harness.request("r-0", "w")
    assert len(harness.commands()) == 1  # holds the only permit
    first = await harness.request("r-1", "w")
    await asyncio.sleep(0.01)
    second = await harness.request("r-2", "w")
    assert len(harness.commands()) == 1

    def queue() -> Awaitable[list[tuple[str, float]]]:
        return _parked_queue(redis_client, keys, "pay")

    before = await queue()
    assert [m for m, _ in before] == [f"unpark|{first}|a|1", f"unpark|{second}|a|1"]
    assert await ParkedQueues(redis_client, keys).release("pay", 1) == 1
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 1
    assert len(harness.commands()) == 1  # refused a permit: queued again
    assert await queue() == before  # in its place, at its first score
    assert await redis_client.exists(keys.released(keys.shard_of(first), "pay")) == 0


async def test_a_retry_that_falls_due_with_the_deadline_takes_no_slot_it_cannot_have(
    redis_client: Redis, key_prefix: str
) -> None:
    """A keyed step's retry and its run's deadline fall due in one batch: the retry's
    attempt is sent, then the deadline starts the compensation, which awaits it. That
    attempt must hold its key's slot like any other: here another run holds the only
    one, so it is withdrawn (never sent: nothing to await or undo) and the run ends,
    rather than going out beside the other run's attempt."""
    keys = Keys(key_prefix, 1)
    spec = {"name": "w", "timeout": "1s", "steps": [
        {"id": "pack", "service": "inv", "action": "reserve", "timeout": "5s",
         "retry": {"max_attempts": 3, "backoff": "10s"},
         "concurrency": {"key": "workflow.name", "limit": 1},
         "compensate": {"action": "release"}},
    ]}  # fmt: skip
    harness = _Harness(redis_client, keys, _workflows(spec))
    first = await harness.request("r-1", "w")
    [attempt] = harness.commands()
    busy = ReplyEvent(
        command_id=attempt.command_id, workflow_id=first, step="pack", attempt=1,
        status=ReplyStatus.ERROR, error=ErrorInfo(message="busy", code="busy", retryable=True),
    )  # fmt: skip
    await harness.runtime.handle_replies([harness.record(TOPICS.replies, busy)])
    await asyncio.sleep(1.1)  # past the first run's deadline
    second = await harness.request("r-2", "w")  # takes the slot the retrying step let go
    assert [c.workflow_id for c in harness.commands()] == [first, second]
    # The retry and then the deadline are due now.
    await redis_client.zadd(keys.timers(0), {f"retry|{first}|pack|1": 0, f"deadline|{first}||0": 1})
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 2
    assert [c.workflow_id for c in harness.commands()] == [first, second]  # nothing more
    state = await harness.store.load(first)
    assert state is not None and state.status is WorkflowStatus.FAILED
    assert state.error is not None and state.error["code"] == "deadline_exceeded"
    pack = state.steps["pack"]
    assert (pack.status, pack.attempt) == (StepStatus.FAILED, 2)
    assert pack.error is not None and pack.error["code"] == "abandoned"


class _LosingStore(Store):
    """The real store; before each commit, Redis loses the writes `lose` names, as a
    failover that promotes a replica without the latest writes loses them while the
    commit that follows lands on the promoted replica."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose: list[Any] = []

    async def commit_many(self, commits: Any, now_ms: int) -> Any:
        while self.lose:
            await self.lose.pop(0)()
        return await super().commit_many(commits, now_ms)


class _FailingSlots(Slots):
    """The real slots; the calls of `acquire_many` numbered in `fail` find Redis
    unavailable."""

    def __init__(self, *args: Any, fail: set[int]) -> None:
        super().__init__(*args)
        self.fail, self.calls = fail, 0

    async def acquire_many(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            msg = "redis: connection refused (injected)"
            raise StateUnavailable(msg)
        return await super().acquire_many(*args, **kwargs)


@pytest.mark.parametrize("check_fails", [False, True], ids=["answered", "check-fails-twice"])
async def test_a_queue_place_lost_before_the_commit_is_taken_again(
    redis_client: Redis, key_prefix: str, check_fails: bool
) -> None:
    """A run queued for its concurrency key's slot whose place in the key's queue Redis
    lost before the run's commit (a lossy failover): nothing else would ever hand it the
    slot, and a run with no deadline would wait for ever. The batch takes the place again
    after the commit, and the run is admitted when the slot frees. When Redis does not
    answer that check either (`check_fails`: the failover still under way), the check is
    made again in the background, with backoff, until it is answered."""
    keys = Keys(key_prefix, 2)
    spec = {"name": "w", "concurrency": {"key": "workflow.name", "limit": 1},
            "steps": [{"id": "a", "service": "pay", "action": "x"}]}  # fmt: skip
    store = _LosingStore(redis_client, keys, retention_ms=60_000)
    harness = _Harness(redis_client, keys, _workflows(spec), store=store)
    first = await harness.request("r-1", "w")
    [command] = harness.commands()
    slots = harness.runtime.slots = _FailingSlots(
        redis_client, keys, fail={2, 3} if check_fails else set()
    )
    held, queue = keys.concurrency(concurrency_digest("w", "w"))
    second = workflow_id_for("r-2")
    store.lose.append(lambda: redis_client.zrem(queue, f"{second}|0"))
    await harness.request("r-2", "w")  # call 1 queues it, call 2 checks its place
    state = await harness.store.load(second)
    assert state is not None and state.queued_ms is not None
    if check_fails:
        assert await redis_client.zscore(queue, f"{second}|0") is None
        await wait_for(lambda: slots.calls >= 3, timeout=5)  # the first retry fails too
        assert await redis_client.zscore(queue, f"{second}|0") is None
        await asyncio.gather(*harness.runtime._place_checks)  # the second is answered
        assert slots.calls == 4
    assert await redis_client.zscore(queue, f"{second}|0") is not None
    done = ReplyEvent(command_id=command.command_id, workflow_id=first, step="a", attempt=1,
                      status=ReplyStatus.OK)  # fmt: skip
    await harness.runtime.handle_replies([harness.record(TOPICS.replies, done)])
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 1  # its admit timer
    assert [c.workflow_id for c in harness.commands()] == [first, second]
    assert [text(m) for m in await redis_client.zrange(held, 0, -1)] == [f"{second}|0"]


async def test_a_forged_reply_stays_refused_when_its_run_is_looked_at_again(
    redis_client: Redis, key_prefix: str
) -> None:
    """A reply signed with the shared key, naming no service, for a step of a service with
    keys of its own is forged. When the same batch must be applied again to its run (another
    of its events was stale against the cached state), it must stay refused."""
    keys = Keys(key_prefix, 1)
    shared = Keyring.parse(TEST_KEYS)
    own = Keyring.parse("inv-1=inventory-secret-0123456789", "inventory")
    spec = {"name": "w", "steps": [{"id": "a", "service": "inventory", "action": "x"},
                                   {"id": "b", "service": "inventory", "action": "y",
                                    "depends_on": ["a"]}]}  # fmt: skip
    harness = _Harness(redis_client, keys, _workflows(spec),
                       signatures=Signatures(shared, {"inventory": own}))  # fmt: skip
    wid = await harness.request("r-1", "w")
    [a] = harness.commands()

    def signed(reply: ReplyEvent, ring: Keyring) -> Record:
        record = harness.record(TOPICS.replies, reply)
        return Record(record.topic, 0, record.offset, record.value, None,
                      ring.headers(record.value or b"", record.topic, None))  # fmt: skip

    done_a = ReplyEvent(command_id=a.command_id, workflow_id=wid, step="a", attempt=1,
                        status=ReplyStatus.OK, service="inventory")  # fmt: skip
    await harness.runtime.handle_replies([signed(done_a, own)])
    [_, b] = harness.commands()
    forged = ReplyEvent(command_id=b.command_id, workflow_id=wid, step="b", attempt=1,
                        status=ReplyStatus.OK, output={"forged": True})  # fmt: skip
    # The forged reply, and `a`'s reply delivered again (stale: the run is looked at anew).
    await harness.runtime.handle_replies([signed(forged, shared), signed(done_a, own)])
    state = await harness.store.load(wid)
    assert state is not None and state.steps["b"].status.value == "running"
    letters = [DeadLetter.model_validate_json(m.value) for m in harness.dispatcher.direct]
    assert [d.code for d in letters] == ["bad_signature"]


def _hold_then_pay(service: str) -> dict[str, Any]:
    """A run with a one-second deadline: `hold` (undone by `release`), then `pay` on
    `service`, with an hour's timeout and retries ten seconds apart."""
    return {"name": "w", "timeout": "1s", "steps": [
        {"id": "hold", "service": "stock", "action": "reserve",
         "compensate": {"action": "release"}},
        {"id": "pay", "service": service, "action": "charge", "timeout": "1h",
         "depends_on": ["hold"], "retry": {"max_attempts": 3, "backoff": "10s"}},
    ]}  # fmt: skip


async def test_a_retry_due_with_the_deadline_behind_an_open_breaker_is_withdrawn(
    redis_client: Redis, key_prefix: str
) -> None:
    """A step's retry and its run's deadline fall due in one batch while the step's
    service has its breaker open: the compensation awaits the retry's attempt (the step
    has a timeout), which the breaker holds back. A run being compensated cannot wait in
    the breaker's queue (its release is only for running runs), so the attempt is
    withdrawn, never sent, and the compensation goes on at once instead of waiting out
    the step's timeout: the undo of the completed step goes out in the same commit."""
    keys = Keys(key_prefix, 1)
    spec = _hold_then_pay("pay")
    breakers = Breakers(redis_client, keys, BreakerSettings(), "r1")
    harness = _Harness(redis_client, keys, _workflows(spec), breakers=breakers)
    wid = await harness.request("r-1", "w")
    [hold] = harness.commands()
    done = ReplyEvent(command_id=hold.command_id, workflow_id=wid, step="hold", attempt=1,
                      status=ReplyStatus.OK, output={})  # fmt: skip
    await harness.runtime.handle_replies([harness.record(TOPICS.replies, done)])
    [_, pay] = harness.commands()
    busy = ReplyEvent(
        command_id=pay.command_id, workflow_id=wid, step="pay", attempt=1,
        status=ReplyStatus.ERROR, error=ErrorInfo(message="busy", code="busy", retryable=True),
    )  # fmt: skip
    await harness.runtime.handle_replies([harness.record(TOPICS.replies, busy)])
    await _open_breaker(redis_client, keys, "pay")
    await breakers.refresh(["pay"])
    await asyncio.sleep(1.1)  # past the run's deadline
    await redis_client.zadd(keys.timers(0), {f"retry|{wid}|pay|1": 0, f"deadline|{wid}||0": 1})
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 2
    assert [(c.step, c.action) for c in harness.commands()[2:]] == [("hold", "release")]
    state = await harness.store.load(wid)
    assert state is not None and state.status is WorkflowStatus.COMPENSATING
    pay_state = state.steps["pay"]
    assert (pay_state.status, pay_state.attempt) == (StepStatus.FAILED, 2)
    assert pay_state.error is not None and pay_state.error["code"] == "abandoned"
    assert await redis_client.zcard(keys.parked(0, "pay")) == 0
    assert not [t for t in await harness.timers(0) if f"|{wid}|pay|" in t]


async def test_a_retry_due_with_the_deadline_takes_no_instance_permit_it_cannot_have(
    redis_client: Redis, key_prefix: str
) -> None:
    """The batch shape above under a per-instance limit: the retry's attempt, awaited by
    the compensation its run's deadline begins, is routed to the only instance, whose
    one permit another run's attempt holds. It is withdrawn (never sent beside the other
    run's) and the compensation goes on: the undo of the completed step goes out."""
    keys = Keys(key_prefix, 1)
    spec = _hold_then_pay("inventory")
    registry = Registry(redis_client, keys, DiscoverySettings())
    beat = HealthEvent(service="inventory", instance="inv-1", ts_ms=0, partitions=[0],
                       interval_ms=60_000)  # fmt: skip
    await registry.apply([beat])
    await registry.refresh()
    flow = FlowControlSettings.model_validate({"services": {"inventory": {"per_instance": 1}}})
    harness = _Harness(redis_client, keys, _workflows(spec), registry=registry, flow=flow)

    async def reply(wid: str, step: str, status: ReplyStatus) -> None:
        [command] = [c for c in harness.commands() if (c.workflow_id, c.step) == (wid, step)][-1:]
        error = ErrorInfo(message="busy", code="busy", retryable=True)
        event = ReplyEvent(command_id=command.command_id, workflow_id=wid, step=step,
                           attempt=command.attempt, status=status,
                           error=error if status is ReplyStatus.ERROR else None)  # fmt: skip
        await harness.runtime.handle_replies([harness.record(TOPICS.replies, event)])

    first = await harness.request("r-1", "w")
    await reply(first, "hold", ReplyStatus.OK)
    await reply(first, "pay", ReplyStatus.ERROR)  # retrying: its permit is given back
    await asyncio.sleep(1.1)  # past the first run's deadline
    second = await harness.request("r-2", "w")
    await reply(second, "hold", ReplyStatus.OK)  # its `pay` takes inv-1's only permit
    assert [(c.workflow_id, c.step, c.instance) for c in harness.commands()][-1] == (
        second,
        "pay",
        "inv-1",
    )
    sent = len(harness.commands())
    await redis_client.zadd(keys.timers(0), {f"retry|{first}|pay|1": 0, f"deadline|{first}||0": 1})
    poller = TimerPoller(harness.store, harness.runtime, TimerSettings(lease_ms=5_000))
    assert await poller.poll_once() == 2
    assert [(c.workflow_id, c.step, c.action) for c in harness.commands()[sent:]] == [
        (first, "hold", "release")
    ]
    state = await harness.store.load(first)
    assert state is not None and state.status is WorkflowStatus.COMPENSATING
    pay = state.steps["pay"]
    assert (pay.status, pay.attempt) == (StepStatus.FAILED, 2)
    assert pay.error is not None and pay.error["code"] == "abandoned"
