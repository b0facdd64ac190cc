"""Two configurations side by side in one run: chain3 throughput at saturation on a fresh
rig each (one echo instance, one replica in its own process), alternating per repetition,
and the ratio of the first to the second per repetition."""

from __future__ import annotations

from typing import Any

from benchmarks.common import Measure, Profile, closed_loop
from benchmarks.mediator_bench import make_client, submitter, warm_up
from benchmarks.stage import Stage

__all__ = ["chain3_side_by_side"]


async def chain3_side_by_side(
    stage: Stage,
    profile: Profile,
    out: list[Measure],
    prefix: str,
    first: tuple[str, dict[str, Any]],
    second: tuple[str, dict[str, Any]],
    workflows: tuple[str, str] = ("chain3", "chain3"),
) -> None:
    """Measures ``<prefix>.<label>.workflows_per_s`` for each of (label, setting
    overrides), running `workflows` (first's, second's), and
    ``<prefix>.<first>_over_<second>``."""
    note = f"chain3, closed loop, {profile.mediator_in_flight} in flight, one echo instance"
    measures = [
        Measure(f"{prefix}.{label}.workflows_per_s", "workflows/s", note=note)
        for label, _ in (first, second)
    ]
    ratio = Measure(f"{prefix}.{first[0]}_over_{second[0]}", "ratio", note="per repetition")
    out += [*measures, ratio]
    for _ in range(profile.repeat):
        rates = []
        for (label, overrides), measure, workflow in zip(
            (first, second), measures, workflows, strict=True
        ):
            async with (
                stage.rig(prefix.replace(".", "-"), mediator=True, **overrides) as rig,
                make_client(rig.settings) as client,
            ):
                await warm_up(client, workflow)
                result = await closed_loop(
                    submitter(client, workflow),
                    in_flight=profile.mediator_in_flight,
                    warmup_s=profile.warmup_s,
                    measure_s=profile.measure_s,
                    drain_s=profile.drain_s,
                )
                result.check(f"{workflow} {prefix} {label}")
                measure.values.append(round(result.rate, 1))
                rates.append(result.rate)
        ratio.values.append(round(rates[0] / rates[1], 3))
