"""What the transition stream costs the replica: its CPU per chain3 step with
``events.enabled`` off and on, side by side, without a sampler attached.

Each repetition takes a fresh rig (one SDK echo instance, one replica in its own process,
an embedded broker of its own) for each setting, warms it up, runs `RUNS` chain3 runs to
completion with 100 in flight, and reads the replica's CPU from /proc. The ratio of a
repetition is taken between its two rigs, a minute apart, so a slow hour of the host
moves both sides. The ``stages`` section splits the same figures by stage, under
``py-spy`` (which inflates them).

``python -m benchmarks.events_cost [--repeat R] [--runs N]`` prints one line per
repetition and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

from benchmarks.common import run_count
from benchmarks.cpu import cpu_seconds
from benchmarks.mediator_bench import make_client, submitter, warm_up
from benchmarks.stage import Stage, open_stage, steps_of

__all__ = ["main"]

RUNS = 3000
WORKFLOW = "chain3"


async def replica_cpu_per_step(stage: Stage, runs: int, **overrides: Any) -> float:
    """The replica's CPU per step (us) over `runs` chain3 runs, on a fresh rig."""
    async with stage.rig("events_cost", mediator=True, **overrides) as rig:
        assert rig.replica is not None and rig.replica.process is not None
        pid = rig.replica.process.pid
        async with make_client(rig.settings) as client:
            await warm_up(client, WORKFLOW)
            used = cpu_seconds(pid)
            done = await run_count(submitter(client, WORKFLOW), runs, in_flight=100, timeout_s=300)
            used = cpu_seconds(pid) - used
    if done != runs:
        msg = f"events_cost: {done} of {runs} {WORKFLOW} runs completed"
        raise RuntimeError(msg)
    return used * 1e6 / (runs * steps_of(WORKFLOW))


async def run(repeat: int, runs: int) -> None:
    off: list[float] = []
    on: list[float] = []
    async with open_stage(None, None) as stage:
        for n in range(repeat):
            off.append(await replica_cpu_per_step(stage, runs))
            on.append(await replica_cpu_per_step(stage, runs, events={"enabled": True}))
            print(
                f"{n + 1}: replica us CPU per {WORKFLOW} step, events off {off[-1]:.1f}, "
                f"on {on[-1]:.1f}: {on[-1] / off[-1]:.3f} x",
                flush=True,
            )
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    print(
        f"medians: off {statistics.median(off):.1f}, on {statistics.median(on):.1f}, "
        f"ratio {statistics.median(ratios):.3f} x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.events_cost")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    asyncio.run(run(args.repeat, args.runs))


if __name__ == "__main__":
    main()
