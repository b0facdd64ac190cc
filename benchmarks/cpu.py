"""CPU per step of every process of a rig: replica, echo service, broker, the state Redis
and the client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import LoadResult, Measure, Operation, Profile, closed_loop
from benchmarks.stage import Rig

__all__ = ["ROLES", "cpu_measures", "cpu_probe", "cpu_seconds", "measure_saturated", "record_cpu"]

#: Who the processes are, in the order the table lists them.
ROLES = ("replica", "echo", "broker", "redis", "client")
_NOTES = {
    "replica": "the mediator replica's process",
    "echo": "the echo service's process",
    "broker": "the broker's process (Tansu)",
    "redis": "the state Redis's process (Valkey; not measured against a given Redis)",
    "client": "the load generator's process (the client)",
}


def cpu_seconds(pid: int) -> float:
    """CPU (user + system) a process has used so far, from /proc (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_probe(rig: Rig) -> Callable[[], dict[str, float]]:
    """A `closed_loop` probe: CPU seconds so far of each of the rig's processes and ours."""
    pids = rig.pids()

    def probe() -> dict[str, float]:
        used = {role: cpu_seconds(pid) for role, pid in pids.items()}
        used["client"] = time.process_time()
        return used

    return probe


def cpu_measures(prefix: str, roles: tuple[str, ...]) -> dict[str, Measure]:
    """``<prefix>.cpu_per_step.<role>`` for each role, in ms of CPU per step."""
    return {
        role: Measure(f"{prefix}.cpu_per_step.{role}", "ms CPU", note=_NOTES[role])
        for role in roles
    }


def record_cpu(measures: dict[str, Measure], result: LoadResult, steps: int) -> None:
    """Each role's CPU over the measured window, divided by the steps completed in it."""
    assert result.probes is not None
    opened, closed = result.probes
    done = max(1, result.completed * steps)
    for role, measure in measures.items():
        if role in opened:
            used_ms = (closed[role] - opened[role]) * 1000
            measure.values.append(round(used_ms / done, 4))


async def measure_saturated(
    op: Operation, rig: Rig, profile: Profile, in_flight: int, steps: int,
    runs: Measure, step_rate: Measure, cpu: dict[str, Measure],
) -> None:  # fmt: skip
    """One repetition at saturation: `op` in a closed loop of `in_flight` over the
    profile's window on `rig`; its rate (runs and `steps` per run) and every process's
    CPU per step appended to the measures. Raises if any run failed."""
    result = await closed_loop(
        op,
        in_flight=in_flight,
        warmup_s=profile.warmup_s,
        measure_s=profile.measure_s,
        drain_s=profile.drain_s,
        probe=cpu_probe(rig),
    )
    result.check(runs.name)
    runs.values.append(round(result.rate, 1))
    step_rate.values.append(round(result.rate * steps, 1))
    record_cpu(cpu, result, steps)
