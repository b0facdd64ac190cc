"""The simulated world and its seeded scheduler.

A `World` holds two replicas of the real mediator (`SimReplica`), the services their
workflows call (`services`), a model of Kafka (`kafka`) and one fakeredis server, all on
one simulated clock (`timebase`). Everything that happens is an action the scheduler picks
with the seed's random generator: a client's request or an operator's control, a
replica's subscriber taking a batch, its timer poller, outbox sweeper or upkeeps running a
round, a replica resuming at one of its gates, a service instance answering a command,
a reply arriving (in any order, or twice), time passing (long enough, at times, for
leases and heartbeats to run out), and faults: a consumer rewound or rebalanced (records
delivered again), a replica killed and restarted, an instance killed, leaving or joining.

A run of the world has two phases. In the first, `steps` actions are picked at random. In
the second, faults stop, and every part works in turn while time passes, until every run
has ended and nothing is left to send; then the invariants are checked
(`tests.simulation.invariants`). The same seed gives the same history, action for action.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from fakeredis import FakeServer

from mediator.codec import encode
from mediator.core.state import WorkflowState
from mediator.core.workflow import WorkflowSpec, compile_workflow
from mediator.definitions import Definitions
from mediator.ops.recover import RecoverReport, RequestScan
from mediator.ops.redrive import Redrive
from mediator.settings import (
    AuditSettings,
    BackoffSettings,
    BreakerSettings,
    DiscoverySettings,
    FlowControlSettings,
    KafkaSettings,
    MonitoringSettings,
    OutboxSettings,
    RedisSettings,
    ServiceLimit,
    Settings,
    SigningSettings,
    TimerSettings,
)
from mediator.storage.connection import text
from mediator.storage.keys import Keys, workflow_id_for
from tests.simulation.kafka import Group, Log, SimProducer
from tests.simulation.replica import PauseWatch, SimReplica
from tests.simulation.services import Effect, Instance, Life, Service, decode_command
from tests.simulation.timebase import SimClock
from topics.events import ControlAction, ControlEvent, HealthStatus, RequestEvent

__all__ = ["WORKFLOWS", "World", "sim_settings"]

#: The workflows the simulated clients ask for: a saga whose first two steps are undone
#: wherever they were attempted (the first can fall back to another service) and whose
#: last waits for an approval (a signal), a one-step run with
#: no step timeout (only its deadline) of which one runs at a time (a concurrency key:
#: the others queue), and a run whose first step is a child run (of
#: `parcel`, compensated when the delivery after it fails).
WORKFLOWS: list[dict[str, Any]] = [
    {
        "name": "order",
        "timeout": "12s",
        "steps": [
            {"id": "charge", "service": "payment", "action": "charge",
             "timeout": "2s", "retry": {"max_attempts": 3, "backoff": "300ms"},
             "compensate": {"action": "refund", "timeout": "2s", "after": "attempted",
                            "retry": {"max_attempts": 8, "backoff": "200ms"}},
             "fallback": {"service": "backup"}},
            {"id": "reserve", "service": "inventory", "action": "reserve",
             "timeout": "2s", "retry": {"max_attempts": 2, "backoff": "200ms"},
             "compensate": {"action": "release", "timeout": "2s", "after": "attempted",
                            "retry": {"max_attempts": 8, "backoff": "200ms"}}},
            {"id": "approve", "depends_on": ["charge", "reserve"],
             "wait": {"event": "approval"}, "timeout": "3s",
             "retry": {"max_attempts": 2, "backoff": "200ms"}},
            {"id": "ship", "service": "shipping", "action": "ship",
             "depends_on": ["approve"],
             "timeout": "2s", "retry": {"max_attempts": 2, "backoff": "200ms"}},
        ],
    },
    {
        "name": "audit",
        "timeout": "4s",
        "concurrency": {"key": "workflow.name", "limit": 1},
        "steps": [{"id": "record", "service": "inventory", "action": "record"}],
    },
    {
        "name": "parcel",
        "timeout": "6s",
        "steps": [
            {"id": "pack", "service": "inventory", "action": "reserve",
             "timeout": "2s", "retry": {"max_attempts": 2, "backoff": "200ms"},
             "concurrency": {"key": "workflow.name", "limit": 1},
             "compensate": {"action": "release", "timeout": "2s",
                            "retry": {"max_attempts": 8, "backoff": "200ms"}}},
        ],
    },
    {
        "name": "gift",
        "timeout": "16s",
        "steps": [
            {"id": "wrap", "workflow": "parcel", "timeout": "8s",
             "retry": {"max_attempts": 2, "backoff": "200ms"}},
            {"id": "deliver", "service": "shipping", "action": "ship",
             "depends_on": ["wrap"],
             "timeout": "2s", "retry": {"max_attempts": 2, "backoff": "200ms"}},
        ],
    },
]  # fmt: skip

#: Services: keyed (deduplicates on idempotency keys) and heartbeating or not.
SERVICES = {
    "payment": (True, True),
    "backup": (True, False),
    "inventory": (True, True),
    "shipping": (False, True),
}
PARTITIONS = 2
REPLICAS = 2
MAX_REQUESTS = 6


def sim_settings() -> Settings:
    """Small numbers, so that leases, heartbeats, breakers and timeouts all come into
    play within a few simulated seconds."""
    return Settings(
        kafka=KafkaSettings(group_id="sim"),
        redis=RedisSettings(key_prefix="sim", shards=2),
        outbox=OutboxSettings(lease_ms=3_000, sweep_batch=50),
        timers=TimerSettings(lease_ms=1_000, batch=50),
        backoff=BackoffSettings(initial_ms=1, max_ms=1),
        circuit_breaker=BreakerSettings(
            failure_threshold=3, recovery_timeout="2s", refresh_ms=200, drain_rate=20
        ),
        discovery=DiscoverySettings(sweep_ms=200, startup_grace="2s"),
        signing=SigningSettings(enabled=False),
        flow_control=FlowControlSettings(
            services={
                "shipping": ServiceLimit(max_in_flight=2, rate=4, burst=2),
                "backup": ServiceLimit(max_in_flight=1),
            },
            release_ms=100,
            lease_ms=3_000,
        ),
        service_monitoring=MonitoringSettings(enabled=False),
        audit=AuditSettings(enabled=False),
    )


@dataclass
class Paused:
    """A replica's task waiting at a gate for the scheduler."""

    owner: str
    point: str
    future: asyncio.Future[None]


@dataclass
class Issued:
    """What the simulated clients and operators asked for."""

    requests: dict[str, bytes] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    controls: int = 0
    #: The runs an operator asked to pause (resumed, every one, when healing begins).
    paused_runs: set[str] = field(default_factory=set)
    #: The payloads of the approvals signalled to each run.
    signals: dict[str, list[Any]] = field(default_factory=dict)


def _skipping(loop: asyncio.AbstractEventLoop) -> Callable[[float], None]:
    """A function that moves `loop`'s clock forward by so many seconds (installed once per
    loop: its `time` becomes the real one plus what was skipped)."""
    skip: Callable[[float], None] | None = getattr(loop, "_sim_skip", None)
    if skip is None:
        real, skipped = loop.time, [0.0]
        loop.time = lambda: real() + skipped[0]  # type: ignore[method-assign]

        def skip(seconds: float) -> None:
            skipped[0] += max(0.0, seconds)

        loop._sim_skip = skip  # type: ignore[attr-defined]
    return skip


class World:
    """Everything one seed runs."""

    def __init__(self, seed: int, steps: int = 150) -> None:
        self.seed = seed
        self.steps = steps
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.server = FakeServer()
        self.settings = sim_settings()
        self.topics = self.settings.kafka.topics
        self.keys = Keys(self.settings.redis.key_prefix, self.settings.redis.shards)
        self.log = Log(lambda topic: PARTITIONS, self.clock.now_ms)
        self.definitions = Definitions(
            compile_workflow(WorkflowSpec.model_validate(spec)) for spec in WORKFLOWS
        )
        topics = self.topics
        self.groups = {
            "inbound": Group(self.log, (topics.requests, topics.replies)),
            "control": Group(self.log, (topics.control,)),
            "health": Group(self.log, (topics.health,)),
        }
        self.services = {
            name: Service(name, keyed, beats) for name, (keyed, beats) in SERVICES.items()
        }
        self.service_groups = {
            name: Group(self.log, (topics.service(name),)) for name in self.services
        }
        self.instances: list[Instance] = []
        self.replicas: dict[str, SimReplica] = {}
        #: Runs a killed replica's batches committed and did not finish with (a queue
        #: place a failover lost is put back after the commit), with the reads it had not
        #: committed: its input is read again, and the batch that reads it finishes them.
        self.orphaned: list[tuple[set[str], list[tuple[Group, tuple[str, int], int]]]] = []
        #: Runs whose slot or queue place a batch freed after a lossy failover rolled back
        #: the commit that gave it up (the batch was between the two): Redis holds the run
        #: as it was, without it, until the run is committed again. What ended it comes
        #: again (a timer the failover restored, a reply `recover` publishes again).
        self.rolled_back: set[str] = set()
        #: Every replica that ran, killed ones too (for `coverage`).
        self.every_replica: list[SimReplica] = []
        self.incarnations = 0
        self.history: list[str] = []
        self.pending_replies: list[tuple[bytes, bytes]] = []
        self.delivered_replies: list[tuple[bytes, bytes]] = []
        self.issued = Issued()
        self.revisions: list[tuple[str, int]] = []
        #: What paused runs did, commit by commit.
        limits = {w.name: w.concurrency.limit for w in self.definitions if w.concurrency}
        for workflow in self.definitions:
            for sid in workflow.keyed_steps:
                limit = workflow.steps[sid].concurrency
                assert limit is not None
                limits[f"{workflow.name}.{sid}"] = limit.limit
        self.pauses = PauseWatch(limits)
        self.hand_ons: list[tuple[str, str, str, int]] = []
        self.deaths: list[tuple[str, str, int]] = []
        self.effects: list[Effect] = []
        self.errors: list[str] = []
        self.violations: list[str] = []
        self.paused: dict[asyncio.Task[Any], Paused] = {}
        self.abandoned: list[asyncio.Task[Any]] = []
        self.ops: dict[tuple[str, str], asyncio.Task[Any]] = {}
        #: In the second phase gates open at once: every round runs to its end.
        self.free = False
        #: What an asynchronous Redis replica holds (taken when it starts lagging), and how
        #: many failovers promoted it, losing every write since.
        self.lagging: list[tuple[dict[bytes, Any], list[Any]]] | None = None
        #: One seed in four runs with a Redis whose failover loses writes; the others
        #: keep every commit (as with `redis.wait_replicas`), and are held to more.
        self.lossy = random.Random(seed * 7919 + 1).random() < 0.25
        self.failovers = 0
        #: Replies `recover` published again after a failover.
        self.redriven = 0

    # -- gates and ops ---------------------------------------------------------------------

    async def gate(self, owner: str, point: str) -> None:
        if self.free:
            return
        task = asyncio.current_task()
        assert task is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused[task] = Paused(owner, point, future)
        try:
            await future
        finally:
            self.paused.pop(task, None)

    def spawn(self, owner: str, kind: str, work: Coroutine[Any, Any, None]) -> None:
        async def op() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a round that raised: the product logs it and retries
                self.errors.append(f"{owner} {kind}: {type(exc).__name__}: {exc}")

        self.ops[(owner, kind)] = asyncio.get_running_loop().create_task(op())

    def busy(self, owner: str, kind: str) -> bool:
        task = self.ops.get((owner, kind))
        return task is not None and not task.done()

    async def settle(self) -> None:
        """Let every runnable task run until each has finished or waits at a gate. When
        nothing can run but a pause of the product's (a backoff, the outbox's clearing
        delay) is pending, the loop's clock jumps to the soonest one rather than waiting
        for it: the same order, none of the wall time."""
        loop = asyncio.get_running_loop()
        skip = _skipping(loop)
        while True:
            for _ in range(1000):
                await asyncio.sleep(0)
                if not loop._ready:  # type: ignore[attr-defined]
                    break
            timers = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            if not timers:
                return
            skip(min(h.when() for h in timers) - loop.time())
            await asyncio.sleep(0)

    def note(self, what: str) -> None:
        self.history.append(f"{self.clock.ms - 1_800_000_000_000:>7} {what}")

    # -- the world's parts -----------------------------------------------------------------

    async def start(self) -> None:
        for _ in range(REPLICAS):
            await self.add_replica()
        for name, service in self.services.items():
            for _ in range(2 if name == "payment" else 1):
                self.add_instance(service)
        for group in self.service_groups.values():
            self.rebalance_service(group)
        self.beat(force=True)

    async def add_replica(self) -> SimReplica:
        self.incarnations += 1
        name = f"r{self.incarnations}"
        replica = SimReplica(
            name, self.server, self.log, self.settings, self.definitions, self.gate,
            self.revisions, self.hand_ons, self.pauses,
        )  # fmt: skip
        replica.store.on_settled = self._settled
        replica.store.on_commit = self.rolled_back.discard
        replica.on_stale_release = self._stale_release
        sweep = replica.registry.sweep

        async def recorded_sweep(services: Any = None) -> Any:
            deaths = await sweep(services)
            self.deaths += [(d.service, d.instance, d.at_ms) for d in deaths]
            return deaths

        replica.registry.sweep = recorded_sweep  # type: ignore[method-assign]
        self.free, was = True, self.free
        await replica.start()
        self.free = was
        self.replicas[name] = replica
        self.every_replica.append(replica)
        for group in self.groups.values():
            group.assign(sorted(self.replicas))
        return replica

    def add_instance(self, service: Service) -> Instance:
        index = sum(1 for i in self.instances if i.service is service) + 1
        instance = Instance(service, f"{service.name}-{index}", next_beat_ms=self.clock.ms)
        self.instances.append(instance)
        return instance

    def alive(self, service: str | None = None) -> list[Instance]:
        return [
            i for i in self.instances
            if i.life is Life.ALIVE and (service is None or i.service.name == service)
        ]  # fmt: skip

    def rebalance_service(self, group: Group) -> None:
        service = group.topics[0].removeprefix(self.topics.service_prefix)
        group.assign([i.id for i in self.alive(service)])

    def owned(self, instance: Instance) -> list[int]:
        group = self.service_groups[instance.service.name]
        return sorted(p for _, p in group.owned(instance.id))

    def beat(self, force: bool = False) -> None:
        """Every live instance that heartbeats says so when its interval has passed."""
        for instance in self.alive():
            if not instance.service.heartbeats:
                continue
            if force or instance.next_beat_ms <= self.clock.ms:
                value = instance.heartbeat(self.owned(instance), self.clock.ms, HealthStatus.UP)
                self.log.append(self.topics.health, value, instance.id.encode())
                instance.next_beat_ms = self.clock.ms + instance.interval_ms

    def advance(self, delta_ms: int) -> None:
        """Time passes; live instances heartbeat on time all the while."""
        target = self.clock.ms + delta_ms
        while True:
            due = [i.next_beat_ms for i in self.alive() if i.service.heartbeats]
            step_to = min([d for d in due if d <= target], default=None)
            if step_to is None:
                break
            self.clock.ms = max(self.clock.ms, step_to)
            self.beat()
        self.clock.ms = target

    # -- actions ---------------------------------------------------------------------------

    def request(self) -> None:
        n = len(self.issued.requests) + 1
        roll = self.rng.random()
        workflow = "order" if roll < 0.5 else "audit" if roll < 0.8 else "gift"
        request = RequestEvent(request_id=f"req-{n}", workflow=workflow,
                               payload={"amount": n}, created_ms=self.clock.ms)  # fmt: skip
        value = encode(request)
        self.issued.requests[request.request_id] = value
        self.log.append(self.topics.requests, value, request.request_id.encode())
        self.note(f"request {request.request_id} ({workflow})")

    def duplicate_request(self) -> None:
        request_id = self.rng.choice(sorted(self.issued.requests))
        self.log.append(self.topics.requests, self.issued.requests[request_id], request_id.encode())
        self.note(f"request {request_id} published again")

    def control(self) -> None:
        """An operator's control: mostly a retry of a run that has ended (the clients
        saw its result), a pause or resume, or a cancel of any run; at times a breaker
        reset or a drain."""
        self.issued.controls += 1
        control_id = f"ctl-{self.issued.controls}"
        roll = self.rng.random()
        ended = sorted(self.ended())
        if roll < 0.75 and self.issued.requests:
            pick, stop_deadline = self.rng.random(), False
            if ended and pick < 0.45:
                action, wid = ControlAction.RETRY, self.rng.choice(ended)
                self.issued.retries[wid] += 1
            elif self.issued.paused_runs and pick < 0.6:
                action, wid = ControlAction.RESUME, self.rng.choice(sorted(self.issued.paused_runs))
            elif pick < 0.68:
                action, wid = ControlAction.SIGNAL, self._signal_target()
            elif pick < 0.75:
                action = ControlAction.PAUSE
                wid = workflow_id_for(self.rng.choice(sorted(self.issued.requests)))
                self.issued.paused_runs.add(wid)
                stop_deadline = self.rng.random() < 0.5
            else:
                action = ControlAction.CANCEL
                wid = workflow_id_for(self.rng.choice(sorted(self.issued.requests)))
            payload = {"approval": control_id} if action is ControlAction.SIGNAL else None
            if payload is not None:
                self.issued.signals.setdefault(wid, []).append(payload)
            event = ControlEvent(control_id=control_id, action=action, workflow_id=wid,
                                 issued_ms=self.clock.ms, pause_deadline=stop_deadline,
                                 signal="approval" if payload else None,
                                 payload=payload)  # fmt: skip
            key = wid
        elif roll < 0.85:
            service = self.rng.choice(sorted(self.services))
            event = ControlEvent(control_id=control_id, action=ControlAction.RESET_BREAKER,
                                 service=service, issued_ms=self.clock.ms)  # fmt: skip
            key = service
        else:
            instance = self.rng.choice(self.instances)
            action = ControlAction.DRAIN if self.rng.random() < 0.6 else ControlAction.UNDRAIN
            event = ControlEvent(control_id=control_id, action=action,
                                 service=instance.service.name, instance=instance.id,
                                 issued_ms=self.clock.ms)  # fmt: skip
            key = instance.service.name
        self.log.append(self.topics.control, encode(event), key.encode())
        self.note(f"control {control_id}: {event.action.value} "
                  f"{event.workflow_id or event.instance or event.service}")  # fmt: skip

    def _signal_target(self) -> str:
        """An order's run to approve: mostly one that has not ended (it may not wait yet)."""
        ended = self.ended()
        live = [r for r in sorted(self.issued.requests) if workflow_id_for(r) not in ended]
        return workflow_id_for(self.rng.choice(live or sorted(self.issued.requests)))

    def resume_paused_runs(self) -> None:
        """The operator resumes every run they paused (a resume of a run that is not
        paused, or has ended, is refused)."""
        for wid in sorted(self.issued.paused_runs):
            self.issued.controls += 1
            event = ControlEvent(control_id=f"ctl-{self.issued.controls}",
                                 action=ControlAction.RESUME, workflow_id=wid,
                                 issued_ms=self.clock.ms)  # fmt: skip
            self.log.append(self.topics.control, encode(event), wid.encode())
        self.note(f"resume every paused run: {len(self.issued.paused_runs)}")

    def ended(self) -> set[str]:
        """The runs whose result the clients have seen."""
        return {
            orjson.loads(r.value or b"{}").get("workflow_id") or ""
            for r in self.log.records(self.topics.results)
        } - {""}

    def consume(self, name: str, kind: str) -> None:
        replica = self.replicas[name]
        group = self.groups[kind]
        records = group.fetch(name, self.rng.randint(1, 8))
        self.note(f"{name} {kind} takes {len(records)}: "
                  + " ".join(f"{r.topic.split('.')[-1]}[{r.partition}]@{r.offset}"
                             for r in records))  # fmt: skip

        async def work() -> None:
            if await replica.consume(kind, records) and name in self.replicas:
                group.advance(records)

        self.spawn(name, kind, work())

    def serve(self, instance: Instance) -> None:
        group = self.service_groups[instance.service.name]
        record = group.fetch(instance.id, 1)[0]
        group.advance([record])
        group.commit(instance.id)
        command = decode_command(record.value)
        reply, effect = instance.take(command, self.seed, self.clock.ms)
        if effect is not None:
            self.effects.append(effect)
        if reply is not None:
            self.pending_replies.append((command.workflow_id.encode(), reply))
        self.note(f"{instance.id} takes {command.command_id} ({command.action})"
                  f"{' and does it' if effect else ''}{'' if reply else ', hangs'}")  # fmt: skip

    def deliver(self) -> None:
        index = self.rng.randrange(len(self.pending_replies))
        key, value = self.pending_replies.pop(index)
        self.delivered_replies.append((key, value))
        self.log.append(self.topics.replies, value, key)
        self.note(f"reply delivered for {key.decode()}")

    def duplicate_reply(self) -> None:
        key, value = self.rng.choice(self.delivered_replies)
        self.log.append(self.topics.replies, value, key)
        self.note(f"reply for {key.decode()} delivered again")

    def resume(self) -> None:
        tasks = list(self.paused)
        task = tasks[self.rng.randrange(len(tasks))]
        paused = self.paused.pop(task)
        paused.future.set_result(None)
        self.note(f"{paused.owner} goes on from {paused.point}")

    def rewind(self, name: str, kind: str) -> None:
        group = self.groups[kind]
        owned = [tp for tp in group.owned(name) if group.position.get(tp, 0) > 0]
        if not owned:
            return
        tp = self.rng.choice(owned)
        position = group.position[tp]
        low = 0 if kind == "control" else max(0, position - 6)
        to = self.rng.randint(low, position - 1)
        group.rewind(tp, to)
        self.note(f"{name} {kind} rewound {tp[0].split('.')[-1]}[{tp[1]}] {position} -> {to}")

    def orphans(self) -> set[str]:
        """The runs of `orphaned` whose input is not read again yet, nor committed since."""
        return {
            wid
            for runs, unread in self.orphaned
            if any(group.committed.get(tp, 0) < position for group, tp, position in unread)
            for wid in runs
        }

    def _stale_release(self, workflow_id: str, member: str) -> None:
        self.rolled_back.add(workflow_id)
        self.note(f"{member} freed: the commit that gave it up was rolled back")

    def _settled(self, runs: set[str]) -> None:
        for orphans, _ in self.orphaned:
            orphans -= runs

    def crash(self, name: str) -> None:
        # What its batches in progress committed waits for their input to be read again.
        runs = {w for done in self.replicas[name].store.unsettled.values() for w in done}
        if runs:
            unread = [
                (group, tp, group.position[tp])
                for group in self.groups.values()
                for tp in group.owned(name)
                if group.position.get(tp, 0) > group.committed.get(tp, 0)
            ]
            self.orphaned.append((runs, unread))
        del self.replicas[name]
        for task, paused in list(self.paused.items()):
            if paused.owner == name:
                del self.paused[task]
                self.abandoned.append(task)
        for (owner, kind), task in list(self.ops.items()):
            if owner == name:
                del self.ops[(owner, kind)]
                self.abandoned.append(task)
        self.note(f"{name} killed")

    def replica_lags(self) -> None:
        """Redis's replica stops receiving writes from now on (asynchronous replication
        falling behind): what it holds is what Redis holds now."""
        self.lagging = [
            (copy.deepcopy(db._dict), list(db._expiry_heap)) for db in self.server.dbs.values()
        ]
        self.note("redis replica falls behind")

    def failover(self) -> None:
        """The lagging replica is promoted: every write since it fell behind is lost."""
        assert self.lagging is not None
        for db, (keys, expiries) in zip(self.server.dbs.values(), self.lagging, strict=True):
            db._dict, db._expiry_heap = copy.deepcopy(keys), list(expiries)
        self.lagging = None
        self.failovers += 1
        self.revisions.append(("-- failover --", 0))
        self.note("redis failover: writes since the replica fell behind are lost")

    async def recover(self) -> None:
        """`mediator recover` over everything: requests of runs Redis lost, replies that
        runs it rolled back still wait for."""
        replica = next(iter(self.replicas.values()))
        producer = SimProducer(self.log, lambda point: self.gate("recover", point))
        report = RecoverReport(self.topics.requests, 0, None, 0, False)
        scan = RequestScan(report, replica.redis, self.keys, producer, None, 10)  # type: ignore[arg-type]
        await scan.handle(self.log.records(self.topics.requests))  # type: ignore[arg-type]
        redrive = Redrive(replica.redis, self.keys, producer, self.topics.replies, 10)  # type: ignore[arg-type]
        await redrive.handle(self.log.records(self.topics.replies))  # type: ignore[arg-type]
        self.redriven += redrive.republished
        self.note(f"recover: {report.republished} requests, {redrive.republished} replies again")

    def instance_event(self) -> None:
        candidates = self.alive()
        roll = self.rng.random()
        if roll < 0.35 and candidates:
            instance = self.rng.choice(candidates)
            instance.life = Life.CRASHED
            self.note(f"{instance.id} killed")
        elif roll < 0.6 and candidates:
            instance = self.rng.choice(candidates)
            if instance.service.heartbeats:
                value = instance.heartbeat([], self.clock.ms, HealthStatus.DOWN)
                self.log.append(self.topics.health, value, instance.id.encode())
            instance.life = Life.LEFT
            self.rebalance_service(self.service_groups[instance.service.name])
            self.note(f"{instance.id} leaves")
        else:
            service = self.services[self.rng.choice(sorted(self.services))]
            if len(self.alive(service.name)) >= 3:
                return
            instance = self.add_instance(service)
            self.rebalance_service(self.service_groups[service.name])
            self.beat()
            self.note(f"{instance.id} joins")

    def round(self, name: str, kind: str, work: Callable[[], Awaitable[None]]) -> None:
        self.note(f"{name} {kind}")
        self.spawn(name, kind, work())

    def commit(self, name: str) -> None:
        for group in self.groups.values():
            group.commit(name)
        self.note(f"{name} commits offsets")

    def rebalance(self, kind: str) -> None:
        self.groups[kind].assign(sorted(self.replicas))
        self.note(f"{kind} group rebalanced")

    async def restart(self) -> None:
        replica = await self.add_replica()
        self.note(f"{replica.name} started")

    def tick(self, low: int, high: int) -> None:
        delta = self.rng.randint(low, high)
        self.advance(delta)
        self.note(f"time +{delta} ms")

    async def stop_faults(self) -> None:
        """The second phase begins: gates open, every paused round goes on, the groups
        settle on the replicas and instances alive, and each service has one."""
        self.note("-- faults stop --")
        self.free = True
        for paused in list(self.paused.values()):
            paused.future.set_result(None)
        await self.settle()
        for group in self.groups.values():
            group.assign(sorted(self.replicas))
        for name, service in self.services.items():
            if not self.alive(name):
                self.add_instance(service)
            self.rebalance_service(self.service_groups[name])

    async def drain_consumers(self, name: str) -> None:
        """Replica `name` reads everything its subscribers own, and commits."""
        replica = self.replicas[name]
        for kind, group in self.groups.items():
            while group.backlog(name):
                records = group.fetch(name, 50)
                if await replica.consume(kind, records):
                    group.advance(records)
            group.commit(name)

    def deliver_all(self) -> None:
        while self.pending_replies:
            key, value = self.pending_replies.pop(0)
            self.delivered_replies.append((key, value))
            self.log.append(self.topics.replies, value, key)

    async def idle_ms(self) -> int:
        """How long nothing happens from now (up to a second): until the next timer or
        outbox lease falls due, when nothing else waits."""
        busy = self.pending_replies or any(
            group.backlog(member)
            for group in [*self.groups.values(), *self.service_groups.values()]
            for member in set(group.owner.values())
        )
        if busy:
            return 50
        redis = next(iter(self.replicas.values())).redis
        due = []
        for shard in range(self.keys.shards):
            for key in (self.keys.timers(shard), self.keys.outbox_due(shard)):
                first = await redis.zrange(key, 0, 0, withscores=True)
                if first:
                    due.append(int(first[0][1]))
        return max(50, min([1_000, *(d - self.clock.ms for d in due)]))

    async def quiet(self) -> bool:
        """Every run ended, every outbox entry sent, every record read."""
        states = await self.states()
        if any(s is None or not s.terminal for s in states.values()):
            return False
        redis = next(iter(self.replicas.values())).redis
        for shard in range(self.keys.shards):
            if await redis.zcard(self.keys.outbox_due(shard)):
                return False
        for service in self.settings.flow_control.services:
            if await redis.zcard(self.keys.limit(service)[0]):
                return False  # a lost permit, not freed yet
        for digest in await redis.hkeys(self.keys.concurrency_keys):
            if await redis.exists(*self.keys.concurrency(text(digest))):
                return False  # a concurrency slot not freed yet
        return not any(
            group.backlog(name) for name in self.replicas for group in self.groups.values()
        )

    async def states(self) -> dict[str, WorkflowState | None]:
        """Every run the clients asked for, and every child run their runs started."""
        replica = next(iter(self.replicas.values()))
        wids = [workflow_id_for(r) for r in sorted(self.issued.requests)]
        wids += sorted(self.children())
        return await replica.store.load_many(wids)

    def children(self) -> dict[str, dict[str, Any]]:
        """The child runs requested so far (by run id), with the parent each names."""
        found = {}
        for record in self.log.records(self.topics.requests):
            request = orjson.loads(record.value or b"{}")
            if request.get("parent"):
                found[workflow_id_for(request["request_id"])] = request["parent"]
        return found

    def coverage(self) -> Counter[str]:
        """How often the paths the invariants guard were taken in this history."""
        seen: Counter[str] = Counter()
        for replica in self.every_replica:
            runtime = replica.runtime.stats.as_dict()
            outbox = replica.dispatcher.stats.as_dict()
            for name in ("conflicts", "redelivered", "duplicates", "ignored_replies",
                         "ignored_controls", "stale_timers", "parked", "rerouted",
                         "instances_down", "rerouted_on_death"):  # fmt: skip
                seen[name] += runtime[name]
            seen["fenced"] += outbox["fenced"]
            seen["breaker_probes"] += replica.breakers.stats.probes
            seen["breakers_opened"] += replica.breakers.stats.opened
            seen["resent_by_sweeper"] += replica.dispatcher.swept
        seen["real_deaths_handed_on"] = sum(1 for *_, moved in self.hand_ons if moved)
        seen["undone"] = sum(1 for e in self.effects if e.undo)
        seen["retries_asked"] = sum(self.issued.retries.values())
        seen["failovers"] = self.failovers
        seen["redriven"] = self.redriven
        seen.update(self.pauses.seen)
        seen["child_runs"] = len(self.children())
        return seen

    async def close(self) -> None:
        for task in [*self.abandoned, *self.ops.values()]:
            task.cancel()
        await asyncio.gather(*self.abandoned, *self.ops.values(), return_exceptions=True)
        for replica in self.replicas.values():
            await replica.redis.aclose()
