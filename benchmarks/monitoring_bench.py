"""What metrics, alerts and the audit log cost: chain3 throughput with them on (the
defaults) and off, side by side in one run."""

from __future__ import annotations

from benchmarks.common import Measure, Profile
from benchmarks.compare import chain3_side_by_side
from benchmarks.stage import Stage

__all__ = ["run_monitoring"]

OFF = {"service_monitoring": {"enabled": False}, "audit": {"enabled": False}}


async def run_monitoring(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await chain3_side_by_side(stage, profile, out, "monitoring.chain3", ("on", {}), ("off", OFF))
