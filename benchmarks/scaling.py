"""Scaling: one to four mediator replicas as separate processes, same broker and Redis; and
one replica on a Redis Cluster against one Redis.

Each replica is ``python -m mediator run --config FILE``, exactly as deployed. One replica
is measured, then a second joins the same consumer groups and both are measured together.
On a 2-core machine already running the broker, Redis, the services and the load generator,
a second replica mostly adds contention: the point is to show that cost honestly. The
cluster (3 primaries, 3 replicas, all on this machine) measures what the cluster client
costs the replica, not what more Redis cores would give.
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient

from benchmarks.common import Measure, Profile, closed_loop
from benchmarks.compare import chain3_side_by_side
from benchmarks.mediator_bench import make_client, submitter, warm_up
from benchmarks.procs import Child
from benchmarks.stage import Rig, Stage, steps_of
from mediator.cli.infra import EmbeddedRedisCluster
from mediator.runtime.groups import inbound_group

__all__ = ["cluster_side_by_side", "run_scaling"]

WORKFLOW = "chain3"
JOIN_TIMEOUT_S = 60.0


async def _members(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        return sum(len(g[5]) for g in response.groups if g[0] == 0)
    finally:
        await admin.close()


async def _wait_members(bootstrap: str, groups: list[str], children: list[Child]) -> None:
    """Until every group has one member per child; fails at once if a child exits."""
    try:
        async with asyncio.timeout(JOIN_TIMEOUT_S):
            while True:
                for child in children:
                    if not child.running:
                        msg = f"{child.name} exited during start:\n{child.log_tail()}"
                        raise RuntimeError(msg)
                members = [await _members(bootstrap, g) for g in groups]
                if all(m == len(children) for m in members):
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        logs = "\n".join(c.log_tail() for c in children)
        msg = f"{len(children)} replicas did not all join within {JOIN_TIMEOUT_S}s:\n{logs}"
        raise RuntimeError(msg) from None


async def run_scaling(
    stage: Stage,
    profile: Profile,
    in_flight: int,
    max_replicas: int = 2,
    out: list[Measure] | None = None,
) -> list[Measure]:
    """Workflows/s and steps/s of the 3-step chain with 1 .. ``max_replicas`` replicas.

    With fresh rigs every repetition starts its replicas on a new broker; otherwise one
    broker serves all, and replicas are added one by one. Measures go to ``out`` as they
    start.
    """
    measures: list[Measure] = [] if out is None else out
    by_count: dict[int, tuple[Measure, Measure]] = {}
    for replicas in range(1, max_replicas + 1):
        note = f"python -m mediator run x{replicas}, closed loop, {in_flight} in flight"
        name = f"scaling.replicas{replicas}.{WORKFLOW}"
        pair = (
            Measure(f"{name}.workflows_per_s", "workflows/s", note=note),
            Measure(f"{name}.steps_per_s", "steps/s", note=note),
        )
        by_count[replicas] = pair
        measures += pair
    counts = list(by_count)
    if profile.fresh_rigs:
        for replicas in counts:
            for _ in range(profile.repeat):
                async with stage.rig("scale") as rig:
                    await _session(stage, rig, profile, [replicas], 1, in_flight, by_count)
    else:
        async with stage.rig("scale") as rig:
            await _session(stage, rig, profile, counts, profile.repeat, in_flight, by_count)
    return measures


async def _session(
    stage: Stage,
    rig: Rig,
    profile: Profile,
    counts: list[int],
    repeat: int,
    in_flight: int,
    by_count: dict[int, tuple[Measure, Measure]],
) -> None:
    config = stage.write_config(rig.settings)
    groups = [inbound_group(rig.settings.kafka)]
    children: list[Child] = []
    try:
        async with make_client(rig.settings) as client:
            for replicas in counts:
                while len(children) < replicas:
                    child = Child(f"{config.stem}-replica{len(children) + 1}",
                                  ["-m", "mediator", "run", "--config", str(config)],
                                  stage.workdir, protocol=False)  # fmt: skip
                    children.append(child)
                    await child.start()
                await _wait_members(rig.bootstrap, groups, children)
                await warm_up(client, WORKFLOW)
                runs, steps = by_count[replicas]
                for _ in range(repeat):
                    result = await closed_loop(
                        submitter(client, WORKFLOW),
                        in_flight=in_flight,
                        warmup_s=profile.warmup_s,
                        measure_s=profile.measure_s,
                        drain_s=profile.drain_s,
                    )
                    result.check(f"{replicas} replicas")
                    runs.values.append(round(result.rate, 1))
                    steps.values.append(round(result.rate * steps_of(WORKFLOW), 1))
    finally:
        for child in children:
            await child.stop()


async def cluster_side_by_side(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    """chain3 workflows/s with the state on a Redis Cluster and on one Redis, alternating."""
    async with EmbeddedRedisCluster() as cluster:
        on_cluster = {"redis": {"url": cluster.url, "mode": "cluster", "shards": 16}}
        await chain3_side_by_side(
            stage, profile, out, "scaling.redis", ("cluster", on_cluster), ("standalone", {})
        )
