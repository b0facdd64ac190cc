"""How a run's cost grows with its length: the replica's CPU per step for a 3-step chain, a
100-step chain and a fan-out of 1,000 steps (a root, 1,000 steps side by side, a join).

Each repetition takes a fresh rig (one echo instance, one replica in its own process),
warms it up, then runs each workflow a fixed number of times (2,100 to 10,000 steps) to
completion and divides the replica's CPU over that stretch by the steps run. A run whose
state is rewritten whole on every transition pays for its length on every step: the
ratios to chain3 show how far that is from flat (issue target: chain100 within 1.3 x,
fanout1000 within 1.5 x).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from benchmarks.common import Measure, Profile, run_count
from benchmarks.cpu import cpu_seconds
from benchmarks.mediator_bench import make_client, submitter, warm_up
from benchmarks.stage import Rigs, Stage, steps_of

__all__ = ["GROWTH", "run_growth"]

#: (workflow, runs, runs in flight): at least 2,000 steps of each, with about 100 steps in
#: flight for the chains (a batch's fixed costs are shared by as many steps), a run at a
#: time for the fan-out (up to 1,000 steps in flight).
GROWTH = (("chain3", 700, 100), ("chain100", 100, 100), ("fanout1000", 3, 1))
RUN_TIMEOUT_S = 300.0


async def run_growth(stage: Stage, profile: Profile, out: list[Measure]) -> list[Measure]:
    """``growth.<workflow>.cpu_per_step.replica`` and ``.steps_per_s`` per workflow, and
    each one's CPU per step over chain3's, per repetition."""
    scale = 0.25 if profile.name == "quick" else 1.0
    cpu = {
        wf: Measure(f"growth.{wf}.cpu_per_step.replica", "ms CPU",
                    note=f"{max(1, int(runs * scale))} runs to completion, {flight} in flight")
        for wf, runs, flight in GROWTH
    }  # fmt: skip
    rate = {wf: Measure(f"growth.{wf}.steps_per_s", "steps/s") for wf, _, _ in GROWTH}
    redis_cpu = {
        wf: Measure(f"growth.{wf}.cpu_per_step.redis", "ms CPU", note="the Redis server's")
        for wf, _, _ in GROWTH
    }
    calls = {
        wf: Measure(f"growth.{wf}.redis_calls_per_step", "calls",
                    note="commands Redis ran, those inside scripts included")
        for wf, _, _ in GROWTH
    }  # fmt: skip
    ratios = {
        wf: Measure(f"growth.{wf}_over_chain3", "ratio", note="replica CPU per step")
        for wf, _, _ in GROWTH[1:]
    }
    out += [*cpu.values(), *redis_cpu.values(), *calls.values(), *rate.values(), *ratios.values()]
    redis = Redis.from_url(stage.redis_url)
    async with Rigs(stage, "growth", fresh=profile.fresh_rigs, mediator=True) as rigs:
        for _ in range(profile.repeat):
            async with rigs.use() as rig, make_client(rig.settings) as client:
                assert rig.replica is not None and rig.replica.process is not None
                pid = rig.replica.process.pid
                await warm_up(client, "chain3")
                per_step: dict[str, float] = {}
                for workflow, runs, in_flight in GROWTH:
                    runs = max(1, int(runs * scale))
                    began, used = time.perf_counter(), cpu_seconds(pid)
                    served = await _redis_work(redis)
                    done = await run_count(
                        submitter(client, workflow), runs, in_flight=in_flight,
                        timeout_s=RUN_TIMEOUT_S,
                    )  # fmt: skip
                    if done != runs:
                        msg = f"growth: {done} of {runs} {workflow} runs completed"
                        raise RuntimeError(msg)
                    steps = runs * steps_of(workflow)
                    per_step[workflow] = (cpu_seconds(pid) - used) * 1000 / steps
                    redis_s, commands = (
                        b - a for a, b in zip(served, await _redis_work(redis), strict=True)
                    )
                    redis_cpu[workflow].values.append(round(redis_s * 1000 / steps, 4))
                    calls[workflow].values.append(round(commands / steps, 2))
                    cpu[workflow].values.append(round(per_step[workflow], 4))
                    rate[workflow].values.append(round(steps / (time.perf_counter() - began), 1))
                for workflow, measure in ratios.items():
                    measure.values.append(round(per_step[workflow] / per_step["chain3"], 3))
    await redis.aclose()
    return out


async def _redis_work(redis: Redis) -> tuple[float, float]:
    """CPU seconds the Redis server has used, and commands it has processed, so far (the
    whole server: the suite's Redis serves nothing else while this runs)."""
    cpu, stats = await redis.info("cpu"), await redis.info("stats")
    used = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return used, float(stats["total_commands_processed"])
