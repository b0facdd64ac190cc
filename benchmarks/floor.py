"""The floors: chains of echo steps driven over raw Kafka request/reply, no mediator.

The client (`benchmarks.raw.RawClient`) sends each step's command to the echo service's
topic and waits for its reply before sending the next step: exactly the messages the
mediator would exchange, minus the mediator. Two floors, each repetition side by side on
fresh rigs:

- ``floor.raw``: the raw echo service (plain aiokafka and orjson): what this broker and
  Python's Kafka client can do on this machine. Every ratio's true floor.
- ``floor.sdk``: the same client against the echo service built with the service SDK
  (`Worker`, signing on): what the SDK costs a service, and the bound every mediator row
  shares, since the mediator's steps run on that same echo service.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from benchmarks.common import (
    Measure,
    Profile,
    latency_measures,
    one_at_a_time,
    open_loop,
    record_latency,
    run_count,
)
from benchmarks.cpu import cpu_measures, measure_saturated
from benchmarks.raw import RawClient
from benchmarks.stage import BENCH_KEY, BENCH_KEY_ID, ECHO, Rig, Rigs, Stage

__all__ = ["FLOORS", "floor_client", "run_floor", "run_floor_latency"]

#: Floor label -> the echo service it runs (`benchmarks.hosts` role).
FLOORS = {"raw": "raw", "sdk": "services"}
_LABELS = {"raw": "raw client, raw echo service", "sdk": "raw client, SDK echo service"}


def floor_client(rig: Rig) -> RawClient:
    """The raw client for ``rig``, signing its commands (the SDK worker checks them)."""
    topics = rig.topics
    return RawClient(
        rig.bootstrap,
        topics.service(ECHO),
        topics.replies,
        signing_key=(BENCH_KEY_ID, BENCH_KEY.encode()),
    )


def _chain(client: RawClient, steps: int) -> Callable[[int], Awaitable[bool]]:
    async def run(n: int) -> bool:
        return await client.run_chain(steps, {"n": n})

    return run


async def run_floor(
    stage: Stage,
    profile: Profile,
    chains: tuple[int, ...] = (1, 3),
    out: list[Measure] | None = None,
    floors: tuple[str, ...] = ("raw", "sdk"),
) -> list[Measure]:
    """Chains/s, steps/s and CPU per step of every process at saturation, for each chain
    length and floor; the floors alternate within each repetition.

    Measures are appended to ``out`` as they start (a section cut short keeps them).
    """
    measures: list[Measure] = [] if out is None else out
    rows = {}
    for steps in chains:
        for label in floors:
            name = f"floor.{label}.chain{steps}"
            note = f"{_LABELS[label]}, closed loop, {profile.floor_in_flight} in flight"
            runs = Measure(f"{name}.chains_per_s", "chains/s", note=note)
            step_rate = Measure(f"{name}.steps_per_s", "steps/s", note=note)
            cpu = cpu_measures(name, ("echo", "broker", "client"))
            measures += [runs, step_rate, *cpu.values()]
            rows[steps, label] = (runs, step_rate, cpu)
    async with contextlib.AsyncExitStack() as stack:
        rigs = {
            label: await stack.enter_async_context(
                Rigs(stage, f"floor{label}", fresh=profile.fresh_rigs, echo=FLOORS[label])
            )
            for label in floors
        }
        for _ in range(profile.repeat):
            for steps in chains:
                for label in floors:
                    await _saturate(rigs[label], profile, steps, *rows[steps, label])
    return measures


async def _saturate(
    rigs: Rigs, profile: Profile, steps: int, runs: Measure, step_rate: Measure,
    cpu: dict[str, Measure],
) -> None:  # fmt: skip
    """One repetition of one floor row."""
    async with rigs.use() as rig, floor_client(rig) as client:
        await run_count(_chain(client, steps), 100, in_flight=50, timeout_s=60)
        await measure_saturated(
            _chain(client, steps), rig, profile, profile.floor_in_flight, steps,
            runs, step_rate, cpu,
        )  # fmt: skip


async def run_floor_latency(
    stage: Stage, profile: Profile, rate: float, out: list[Measure] | None = None
) -> list[Measure]:
    """The raw floor's 3-step latency p50/p99 at a constant arrival ``rate`` (the
    mediator's half load) and at low load (one chain at a time)."""
    note = f"raw floor, open loop at {rate:.0f} chains/s for {profile.half_load_s:g}s"
    low_note = f"raw floor, one chain at a time for {profile.measure_s:g}s"
    half = latency_measures("floor.raw.chain3.half_load", note)
    low = latency_measures("floor.raw.chain3.low_load", low_note)
    if out is not None:
        out += [*half, *low]
    async with Rigs(stage, "floorlat", fresh=profile.fresh_rigs, echo="raw") as rigs:
        for _ in range(profile.repeat):
            async with rigs.use() as rig, floor_client(rig) as client:
                await run_count(_chain(client, 3), 100, in_flight=50, timeout_s=60)
                result = await open_loop(
                    _chain(client, 3),
                    rate=rate,
                    duration_s=profile.half_load_s,
                    drain_s=profile.drain_s,
                )
                result.check("raw floor chain3 half load")
                record_latency(half, result)
                await one_at_a_time(_chain(client, 3), profile, low)
    return [*half, *low]
