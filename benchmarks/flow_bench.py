"""What the flow-control machinery costs when its limit never binds, and what the
transition stream costs: chain3 throughput with each on and off, side by side in one run
and what a concurrency key that never binds costs (chain3 with a key per run against plain
chain3) (issue targets: limits ≤ 10 % and machinery on ≤ 15 %)."""

from __future__ import annotations

from benchmarks.common import Measure, Profile
from benchmarks.compare import chain3_side_by_side
from benchmarks.stage import ECHO, Stage

__all__ = ["run_flow"]

#: A limit on the echo service that never binds: every command takes and frees a permit.
LIMITS = {
    "flow_control": {
        "services": {ECHO: {"max_in_flight": 1_000_000, "rate": 10_000_000, "burst": 10_000_000}}
    }
}
EVENTS = {"events": {"enabled": True}}


async def run_flow(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await chain3_side_by_side(stage, profile, out, "flow.chain3", ("limits", LIMITS), ("off", {}))
    await chain3_side_by_side(stage, profile, out, "events.chain3", ("on", EVENTS), ("off", {}))
    await chain3_side_by_side(
        stage, profile, out, "keys.chain3", ("keyed", {}), ("off", {}), ("chain3_keyed", "chain3")
    )
