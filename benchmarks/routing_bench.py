"""Routing: throughput with commands routed to chosen instances against the shared topic,
side by side in one run, and how soon a killed instance's work moves on.

Throughput: the same rig (one echo instance that heartbeats, one replica in its own
process), 3-step chains at saturation, once with ``load_balancing.enabled`` and once
without, alternating per repetition.

Kill to reroute: three more echo instances (each answering after ``DELAY_S``, so commands
are in flight on them) beside the rig's own, round robin, 1-step runs at a steady rate. One
of the three is killed with SIGKILL; the sample is the time from the kill to the first of
its commands re-sent elsewhere (the ``instance_down`` entry in that step's history, written
by the commit that re-sends it). It is restarted under the same id, rejoins, and the next
kill takes another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

from benchmarks.common import Measure, Profile, open_loop
from benchmarks.compare import chain3_side_by_side
from benchmarks.mediator_bench import make_client
from benchmarks.procs import Child
from benchmarks.stage import ECHO, PARTITIONS, WORKFLOWS, Stage
from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.replica import Mediator
from mediator.sdk.client import MediatorClient
from mediator.storage.registry import read_registry
from topics.events import ResultEvent

__all__ = ["run_routing"]

DELAY_S = 0.5
RATE = 40.0
VICTIMS = 3
SUBMIT_TIMEOUT_S = 60.0


async def throughput(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    """chain3 workflows/s with routing on and off, one rig each, alternating."""
    await chain3_side_by_side(
        stage, profile, out, "routing.chain3",
        ("routed", {"load_balancing": {"enabled": True}}),
        ("shared_topic", {"load_balancing": {"enabled": False}}),
    )  # fmt: skip


async def kill_to_reroute(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    """Kill an instance under load, over and over: kill → first command re-sent, in ms."""
    kills = 2 if profile.name == "quick" else 6
    note = f"{kills} SIGKILLs under {RATE:.0f} runs/s, 1 s heartbeats, missed_heartbeats 2"
    p50 = Measure("routing.kill_to_reroute_p50", "ms", note=note)
    p99 = Measure("routing.kill_to_reroute_p99", "ms", note=note + " (p99 of few: the max)")
    out += [p50, p99]
    samples: list[float] = []
    definitions = Definitions(parse_workflows(WORKFLOWS["chain1"]))
    balancing = {"strategy": "round_robin"}
    async with contextlib.AsyncExitStack() as stack:
        rig = await stack.enter_async_context(stage.rig("kill", load_balancing=balancing))
        replica = await stack.enter_async_context(Mediator(rig.settings, definitions))
        client = await stack.enter_async_context(make_client(rig.settings))
        started = time.monotonic()
        names = [f"victim-{n}" for n in range(VICTIMS)]
        victims = {name: stage.echo_instance(rig.settings, name, DELAY_S) for name in names}
        for child in victims.values():
            stack.push_async_callback(child.stop)
        await asyncio.gather(*(child.start(ready_timeout_s=60) for child in victims.values()))
        for n in range(kills):
            await _settled(replica, names)
            # No sweep while a replica warms up (discovery.startup_grace_ms).
            await asyncio.sleep(max(0.0, started + 6.0 - time.monotonic()))
            name = names[n % VICTIMS]
            sample = await _one_kill(client, victims[name], name)
            if sample is not None:
                # Kept as they come: a section cut short by its time share keeps them.
                samples.append(sample)
                p50.values[:] = [round(statistics.median(samples), 1)]
                p99.values[:] = [round(_quantile(samples, 0.99), 1)]
            victims[name] = stage.echo_instance(rig.settings, name, DELAY_S)
            stack.push_async_callback(victims[name].stop)
            await victims[name].start(ready_timeout_s=60)


async def _one_kill(client: MediatorClient, victim: Child, name: str) -> float | None:
    """Load, kill `victim` a second in, keep the load on; kill → first re-send (ms)."""
    results: list[ResultEvent] = []

    async def one(n: int) -> bool:
        result = await client.submit("chain1", {"n": n}, timeout=SUBMIT_TIMEOUT_S)
        results.append(result)
        return True

    load = asyncio.create_task(open_loop(one, rate=RATE, duration_s=5.0, drain_s=30.0))
    await asyncio.sleep(1.0)
    killed_ms = time.time_ns() // 1_000_000
    await victim.kill()
    await load
    moved = [
        entry.finished_ms
        for result in results
        for step in result.steps.values()
        for entry in step.history
        if entry.instance == name and entry.error is not None
        and entry.error.code == "instance_down" and entry.finished_ms is not None
    ]  # fmt: skip
    return float(min(moved) - killed_ms) if moved else None


async def _settled(replica: Mediator, names: list[str], stable_s: float = 2.0) -> None:
    """Until every victim is up with partitions that cover the topic, the same for
    `stable_s` (the consumer group has settled)."""
    layout: Any = None
    since = time.monotonic()
    async with asyncio.timeout(90):
        while True:
            views = (await read_registry(replica.redis, replica.store.keys)).get(ECHO, [])
            live = {v.instance: v.beat.get("partitions") for v in views if v.status == "up"}
            owned = sorted(p for parts in live.values() for p in parts or ())
            now = (set(names) <= set(live)) and owned == list(range(PARTITIONS))
            current = sorted((i, tuple(p or ())) for i, p in live.items()) if now else None
            if current != layout:
                layout, since = current, time.monotonic()
            elif current is not None and time.monotonic() - since >= stable_s:
                return
            await asyncio.sleep(0.1)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_routing(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    """Both measurements, appended to `out` as they start."""
    await throughput(stage, profile, out)
    await kill_to_reroute(stage, profile, out)
