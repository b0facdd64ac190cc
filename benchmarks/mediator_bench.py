"""The mediator: saturation throughput per workflow, and latency and overhead at half load.

One replica runs in a child process (`benchmarks.hosts mediator`), as it would in
production, so the load generator does not share its event loop; the echo services are the
same SDK workers the floor uses; requests go through the client SDK from this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from benchmarks.common import (
    Measure,
    Profile,
    latency_measures,
    one_at_a_time,
    open_loop,
    run_count,
)
from benchmarks.cpu import ROLES, cpu_measures, measure_saturated
from benchmarks.stage import Rig, Rigs, Stage, steps_of
from mediator.sdk.client import MediatorClient
from mediator.settings import Settings
from topics.events import WorkflowStatus

__all__ = ["SATURATION_WORKFLOWS", "run_mediator", "submitter", "warm_up"]

SATURATION_WORKFLOWS = ("chain1", "chain3", "chain3_timers", "chain10", "dag10")

#: Share of the half-load rate also offered as runs that time out (their timers fire).
TIMEOUT_SHARE = 0.1
SUBMIT_TIMEOUT_S = 60.0
WARM_UP_TIMEOUT_S = 90.0


def submitter(client: MediatorClient, workflow: str) -> Callable[[int], Awaitable[bool]]:
    """An operation for the load loops: submit one run of ``workflow``; True if it completed."""

    async def submit(n: int) -> bool:
        result = await client.submit(workflow, {"n": n}, timeout=SUBMIT_TIMEOUT_S)
        return result.status is WorkflowStatus.COMPLETED

    return submit


def timed_out(client: MediatorClient) -> Callable[[int], Awaitable[bool]]:
    """An operation: one run whose only step never gets a reply; True if it failed by
    its timeout, as it must."""

    async def submit(n: int) -> bool:
        result = await client.submit("timeout1", {"n": n}, timeout=SUBMIT_TIMEOUT_S)
        return result.error is not None and result.error.code == "timeout"

    return submit


def make_client(settings: Settings) -> MediatorClient:
    """The client SDK, set up for this deployment (short fetch waits, no idempotence)."""
    kafka = settings.kafka
    return MediatorClient(
        kafka.bootstrap_servers,
        topics=kafka.topics,
        enable_idempotence=kafka.enable_idempotence,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )


async def warm_up(client: MediatorClient, workflow: str, runs: int = 100) -> None:
    """A few runs first, so connections, group assignments and caches are settled."""
    completed = await run_count(
        submitter(client, workflow), runs, in_flight=50, timeout_s=WARM_UP_TIMEOUT_S
    )
    if completed != runs:
        msg = f"warm-up: {completed} of {runs} {workflow} runs completed"
        raise RuntimeError(msg)


async def _replica_stats(rig: Rig) -> dict[str, Any]:
    assert rig.replica is not None
    stats: dict[str, Any] = orjson.loads(await rig.replica.ask("stats"))
    return stats


async def saturate(
    rigs: Rigs, profile: Profile, workflow: str, out: list[Measure]
) -> list[Measure]:
    """Workflows/s, steps/s and every process's CPU per step, one value per repetition."""
    note = f"closed loop, {profile.mediator_in_flight} in flight"
    name = f"mediator.{workflow}"
    runs = Measure(f"{name}.workflows_per_s", "workflows/s", note=note)
    steps = Measure(f"{name}.steps_per_s", "steps/s", note=note)
    cpu = cpu_measures(name, ROLES)
    out += [runs, steps, *cpu.values()]
    for _ in range(profile.repeat):
        async with rigs.use() as rig, make_client(rig.settings) as client:
            await warm_up(client, workflow)
            await measure_saturated(
                submitter(client, workflow), rig, profile, profile.mediator_in_flight,
                steps_of(workflow), runs, steps, cpu,
            )  # fmt: skip
    return [runs, steps]


async def half_load(rigs: Rigs, profile: Profile, rate: float, out: list[Measure]) -> list[Measure]:
    """Open-loop 3-step chains at ``rate``: end-to-end latency and the replica's overhead."""
    note = f"open loop at {rate:.0f} workflows/s for {profile.half_load_s:g}s"
    measures = {
        name: Measure(f"mediator.chain3.half_load.{name}", "ms", note=note)
        for name in ("latency_p50", "latency_p99", "overhead_p50", "overhead_p99")
    }
    lag_note = f"step timeouts firing at {rate * TIMEOUT_SHARE:.0f}/s beside the chains"
    for name in ("timer_lag_p50", "timer_lag_p99"):
        measures[name] = Measure(f"mediator.chain3.half_load.{name}", "ms", note=lag_note)
    out += measures.values()
    for _ in range(profile.repeat):
        async with rigs.use() as rig, make_client(rig.settings) as client:
            assert rig.replica is not None
            await warm_up(client, "chain3")
            await rig.replica.ask("clear")
            result, timeouts = await asyncio.gather(
                open_loop(
                    submitter(client, "chain3"),
                    rate=rate,
                    duration_s=profile.half_load_s,
                    drain_s=profile.drain_s,
                ),
                open_loop(
                    timed_out(client),
                    rate=max(1.0, rate * TIMEOUT_SHARE),
                    duration_s=profile.half_load_s,
                    drain_s=profile.drain_s,
                ),
            )
            result.check("mediator chain3 half load")
            timeouts.check("timed-out runs at half load")
            stats = await _replica_stats(rig)
            overhead = stats["overhead_ms"]
            lag = stats["timer_lag_ms"]
            measures["timer_lag_p50"].values.append(round(lag["p50"] or 0.0, 2))
            measures["timer_lag_p99"].values.append(round(lag["p99"] or 0.0, 2))
            measures["latency_p50"].values.append(round(result.latency(50), 2))
            measures["latency_p99"].values.append(round(result.latency(99), 2))
            measures["overhead_p50"].values.append(round(overhead["p50"] or 0.0, 3))
            measures["overhead_p99"].values.append(round(overhead["p99"] or 0.0, 3))
    return list(measures.values())


async def run_mediator(
    stage: Stage,
    profile: Profile,
    workflows: tuple[str, ...] = SATURATION_WORKFLOWS,
    out: list[Measure] | None = None,
) -> list[Measure]:
    """Saturation for each workflow, then latency and overhead at half the chain3 peak.

    Measures are appended to ``out`` as they start, so a section cut short keeps what it
    measured.
    """
    measures: list[Measure] = [] if out is None else out
    peak: float | None = None
    async with Rigs(stage, "med", fresh=profile.fresh_rigs, mediator=True) as rigs:
        for workflow in workflows:
            found = await saturate(rigs, profile, workflow, measures)
            if workflow == "chain3":
                peak = found[0].median
        if peak:
            offered = Measure("mediator.chain3.half_load.offered", "workflows/s",
                              values=[round(peak / 2, 1)], note="half the 3-step peak")  # fmt: skip
            measures.append(offered)
            await half_load(rigs, profile, peak / 2, measures)
        await low_load(rigs, profile, measures)
    return measures


async def low_load(rigs: Rigs, profile: Profile, out: list[Measure]) -> list[Measure]:
    """3-step latency p50/p99 with one run at a time: what a quiet deployment answers in."""
    low = latency_measures(
        "mediator.chain3.low_load", f"one run at a time for {profile.measure_s:g}s"
    )
    out += low
    for _ in range(profile.repeat):
        async with rigs.use() as rig, make_client(rig.settings) as client:
            await warm_up(client, "chain3")
            await one_at_a_time(submitter(client, "chain3"), profile, low)
    return low
