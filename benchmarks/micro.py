"""Micro-benchmarks: balancer decision, planning a 1,000-step DAG, Redis commit per
transition, and Redis bytes kept per finished 3-step workflow."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from benchmarks.common import Measure, Profile, run_count, tag
from benchmarks.mediator_bench import make_client, submitter
from benchmarks.stage import ECHO, WORKFLOWS, Stage
from mediator import clock, codec
from mediator.core.engine import Engine, PublishResult, SendCommand, Transition
from mediator.core.stream import transition_fields, transitions
from mediator.core.workflow import Workflow, parse_workflows
from mediator.definitions import Definitions, load_file
from mediator.replica import Mediator
from mediator.runtime.messages import frame
from mediator.storage.keys import Keys, workflow_id_for
from mediator.storage.store import Commit, CommitOutcome, Store
from topics.events import ReplyEvent, ReplyStatus, RequestEvent

__all__ = [
    "balancer_decision",
    "commit_per_transition",
    "commit_with_wait",
    "dag_document",
    "plan_dag",
    "redis_bytes_per_workflow",
]

BALANCER_INSTANCES = 1000
DAG_STEPS = 1000
COMMIT_BATCH = 100


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls * 1e6


def balancer_decision(profile: Profile) -> list[Measure]:
    """Microseconds per `Balancer.choose` for each strategy (n/a without a balancer)."""
    from mediator.core.balancer import Balancer, Instance, Strategy

    instances = [
        Instance(id=f"i{i}", partitions=(i % 64,), up=i != 0, draining=i == 1,
                 load=float(i % 3), capacity=4, weight=1 + i % 3)
        for i in range(BALANCER_INSTANCES)
    ]  # fmt: skip
    open_breakers = {"i2"}
    note = (
        f"{BALANCER_INSTANCES} instances, one down, one draining, one open breaker; "
        "median of timed loops"
    )
    measures = []
    calls = 2000 * max(1, profile.micro_iterations // 5)
    for strategy in Strategy:
        balancer = Balancer(ECHO, strategy)
        keys = itertools.cycle([f"wf-{n}" for n in range(64)])

        def decide(b: Any = balancer, k: Iterator[str] = keys) -> object:
            return b.choose(instances, key=next(k), blocked=open_breakers.__contains__)

        measure = Measure(f"micro.balancer.{strategy.value}", "us", note=note)
        for _ in range(profile.repeat):
            runs = [_per_call_us(decide, calls) for _ in range(5)]
            measure.values.append(round(statistics.median(runs), 2))
        measures.append(measure)
    return measures


def dag_document(steps: int = DAG_STEPS, seed: int = 7) -> dict[str, Any]:
    """A workflow of ``steps`` steps, each depending on up to three earlier ones."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for i in range(steps):
        deps = sorted({f"s{rng.randrange(i)}" for _ in range(min(i, rng.randint(1, 3)))})
        item: dict[str, Any] = {"id": f"s{i}", "service": ECHO, "action": ECHO}
        if deps:
            item["depends_on"] = deps
        items.append(item)
    return {"name": f"dag{steps}", "steps": items}


def plan_dag(profile: Profile) -> list[Measure]:
    """Milliseconds to load, validate and plan a 1,000-step DAG: from a dict and from YAML."""
    document = dag_document()
    from_dict = Measure(
        "micro.dag1000.plan_from_dict", "ms", note="parse_workflows on an already-parsed dict"
    )
    from_yaml = Measure(
        "micro.dag1000.plan_from_yaml", "ms", note="load_file: YAML text in a file, then the same"
    )
    with tempfile.TemporaryDirectory(prefix="mediator-bench-dag-") as scratch:
        path = Path(scratch) / "dag.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        assert len(load_file(path)[0].order) == DAG_STEPS
        yaml_iterations = max(3, profile.micro_iterations // 5)
        for _ in range(profile.repeat):
            runs = [_per_call_us(lambda: parse_workflows(document), 1) / 1000
                    for _ in range(profile.micro_iterations)]  # fmt: skip
            from_dict.values.append(round(statistics.median(runs), 3))
            runs = [_per_call_us(lambda: load_file(path), 1) / 1000
                    for _ in range(yaml_iterations)]  # fmt: skip
            from_yaml.values.append(round(statistics.median(runs), 3))
    return [from_dict, from_yaml]


def _lifecycle(engine: Engine, workflow: Workflow, keys: Keys, n: int, now: int) -> list[Commit]:
    """The commits of one 3-step run, start to finish, as the runtime would make them."""
    request = RequestEvent(request_id=f"commit-{n}", workflow=workflow.name, payload={"n": n})
    transition = engine.start(workflow, request, workflow_id_for(request.request_id), now)
    commits: list[Commit] = []
    while True:
        rev = len(commits)
        state = replace(transition.state, rev=rev + 1)
        shard = keys.shard_of(state.workflow_id)
        outbox = []
        for effect in transition.effects:
            assert isinstance(effect, SendCommand | PublishResult)
            event = effect.command if isinstance(effect, SendCommand) else effect.result
            message_id = getattr(event, "command_id", f"result.{state.workflow_id}")
            outbox.append((message_id, frame(f"t{shard}", b"k", codec.encode(event), [])))
        commits.append(Commit(state, rev, outbox, transition.counters))
        commands = [e.command for e in transition.effects if isinstance(e, SendCommand)]
        if not commands:
            return commits
        step: Transition | None = None
        for command in commands:
            reply = ReplyEvent(
                command_id=command.command_id, workflow_id=command.workflow_id,
                step=command.step, attempt=command.attempt, status=ReplyStatus.OK,
                output=command.input, service=ECHO, instance="echo-1", replied_ms=now,
            )  # fmt: skip
            step = engine.apply_reply(workflow, state, reply, now)
            assert step is not None
            state = step.state
        assert step is not None
        transition = step


def transition_events(profile: Profile) -> list[Measure]:
    """Microseconds to write one 3-step run's transition events (``events.enabled``): as
    the contract's models (`transitions`, `codec.encode`, `codec.headers`), and as the
    commit path writes them (`transition_fields`, `codec.encode_plain`), side by side."""
    workflow = parse_workflows(WORKFLOWS["chain3"])[0]
    engine = Engine(replies_topic="bench.replies")
    keys = Keys(tag("events"), 16)
    pairs = []
    for n in range(50):
        states = [c.state for c in _lifecycle(engine, workflow, keys, n, clock.now_ms())]
        pairs += list(zip([None, *states[:-1]], states, strict=True))

    def as_models() -> None:
        for before, after in pairs:
            for event in transitions(before, after, 1):
                codec.encode(event), codec.headers(event)

    def plain() -> None:
        for before, after in pairs:
            for fields in transition_fields(before, after, 1):
                codec.encode_plain(fields)

    models_us = Measure("micro.events.models", "us/run", note="events of a 3-step run as models")
    plain_us = Measure("micro.events.plain", "us/run", note="the same events written plain")
    for _ in range(profile.repeat):
        for measure, fn in ((models_us, as_models), (plain_us, plain)):
            runs = [_per_call_us(fn, 1) / 50 for _ in range(max(5, profile.micro_iterations))]
            measure.values.append(round(statistics.median(runs), 2))
    return [models_us, plain_us]


async def commit_per_transition(stage: Stage, profile: Profile) -> list[Measure]:
    """Microseconds per committed transition: one commit at a time, and pipelined by 100."""
    workflow = parse_workflows(WORKFLOWS["chain3"])[0]
    engine = Engine(replies_topic="bench.replies")
    single = Measure("micro.commit.single", "us/transition", note="one commit per round trip")
    batched = Measure(
        "micro.commit.pipelined100", "us/transition", note=f"{COMMIT_BATCH} commits pipelined"
    )
    runs = 2 * COMMIT_BATCH if profile.name == "quick" else 10 * COMMIT_BATCH
    redis = Redis.from_url(stage.redis_url)
    try:
        for _ in range(profile.repeat):
            keys = Keys(tag("commit"), 16)
            store = Store(redis, keys, retention_ms=3_600_000)
            await store.check_layout()
            now = clock.now_ms()
            lives = [_lifecycle(engine, workflow, keys, n, now) for n in range(runs)]
            half = runs // 2
            began = time.perf_counter()
            count = 0
            for life in lives[:half]:
                for commit in life:
                    [result] = await store.commit_many([commit], now)
                    assert result.outcome is CommitOutcome.COMMITTED, result
                    count += 1
            single.values.append(round((time.perf_counter() - began) / count * 1e6, 1))
            began, count = time.perf_counter(), 0
            for start in range(half, runs, COMMIT_BATCH):
                group = lives[start : start + COMMIT_BATCH]
                for k in range(len(group[0])):
                    results = await store.commit_many([life[k] for life in group], now)
                    assert all(r.outcome is CommitOutcome.COMMITTED for r in results)
                    count += len(results)
            batched.values.append(round((time.perf_counter() - began) / count * 1e6, 1))
            await _delete_prefix(redis, keys.prefix)
    finally:
        await redis.aclose()
    return [single, batched]


async def commit_with_wait(profile: Profile) -> list[Measure]:
    """What `redis.wait_replicas: 1` costs: pipelined commits on a primary with one replica,
    without and with WAIT, side by side on the same pair of fresh servers."""
    from mediator.cli.infra import HOST, EmbeddedRedis, wait_for_replica

    workflow = parse_workflows(WORKFLOWS["chain3"])[0]
    engine = Engine(replies_topic="bench.replies")
    plain = Measure("micro.commit.pipelined100.replica", "us/transition", note="no WAIT")
    waited = Measure(
        "micro.commit.pipelined100.wait1", "us/transition", note="WAIT for 1 replica per batch"
    )
    runs = 2 * COMMIT_BATCH if profile.name == "quick" else 10 * COMMIT_BATCH
    async with EmbeddedRedis() as primary:
        async with EmbeddedRedis(args=["--replicaof", HOST, str(primary.port)]) as replica:
            redis = Redis.from_url(primary.url)
            try:
                await wait_for_replica(replica.url)
                for _ in range(profile.repeat):
                    for measure, replicas in ((plain, 0), (waited, 1)):
                        keys = Keys(tag("wait"), 16)
                        store = Store(redis, keys, retention_ms=3_600_000, wait_replicas=replicas)
                        now = clock.now_ms()
                        lives = [_lifecycle(engine, workflow, keys, n, now) for n in range(runs)]
                        began, count = time.perf_counter(), 0
                        for start in range(0, runs, COMMIT_BATCH):
                            group = lives[start : start + COMMIT_BATCH]
                            for k in range(len(group[0])):
                                results = await store.commit_many([life[k] for life in group], now)
                                count += len(results)
                        elapsed = time.perf_counter() - began
                        measure.values.append(round(elapsed / count * 1e6, 1))
                        await _delete_prefix(redis, keys.prefix)
            finally:
                await redis.aclose()
    return [plain, waited]


async def _prefix_keys(redis: Redis, prefix: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]


async def _delete_prefix(redis: Redis, prefix: str) -> None:
    found = await _prefix_keys(redis, prefix)
    for start in range(0, len(found), 500):
        async with redis.pipeline(transaction=False) as pipe:  # a key a command: any layout
            for key in found[start : start + 500]:
                pipe.unlink(key)
            await pipe.execute()


async def redis_bytes_per_workflow(stage: Stage, profile: Profile) -> list[Measure]:
    """``MEMORY USAGE`` summed over a fresh prefix after N finished 3-step runs, over N."""
    n = profile.memory_workflows
    note = f"all keys of a fresh prefix after {n} finished runs, outbox drained"
    measure = Measure("micro.redis.bytes_per_chain3", "bytes", note=note)
    definitions = Definitions(parse_workflows(WORKFLOWS["chain3"]))
    for _ in range(profile.repeat):
        async with (
            stage.rig("mem") as rig,
            Mediator(rig.settings, definitions) as replica,
            make_client(rig.settings) as client,
        ):
            completed = await run_count(
                submitter(client, "chain3"), n, in_flight=min(200, n), timeout_s=120
            )
            async with asyncio.timeout(30):
                # Polling Redis: the outbox drains in another task and signals nothing.
                while await replica.store.outbox_size():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            finished = await _count_finished(replica.redis, replica.store.keys)
            if finished != n:
                msg = f"{finished} of {n} workflows finished ({completed} results)"
                raise RuntimeError(msg)
            prefix = rig.settings.redis.key_prefix
            total = 0
            for key in await _prefix_keys(replica.redis, prefix):
                with contextlib.suppress(TypeError):
                    total += int(await replica.redis.memory_usage(key, samples=0) or 0)
            measure.values.append(round(total / n, 1))
            await _delete_prefix(replica.redis, prefix)
    return [measure]


async def _count_finished(redis: Redis, keys: Keys) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.shards):
            pipe.zcard(keys.status_index(shard, "completed"))
        counts = await pipe.execute()
    return sum(int(c) for c in counts)
