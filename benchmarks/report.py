"""The report: targets, ratios, the printed table, the JSON file and the README section."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Measure

__all__ = ["TARGETS", "Target", "render_table", "to_json", "update_readme"]

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``measure`` (or a ratio) compared with ``bound``."""

    label: str
    measure: str
    bound: float
    compare: Callable[[float, float], bool]
    symbol: str

    def verdict(self, values: dict[str, float | None]) -> tuple[float | None, str]:
        """The value and ``met`` / ``not met`` / ``n/a``."""
        value = values.get(self.measure)
        if value is None:
            return None, "n/a"
        return value, "met" if self.compare(value, self.bound) else "not met"


TARGETS = [
    Target("mediator steps/s >= 0.35 x raw floor (3-step)",
           "ratio.mediator_over_raw_floor.chain3_steps", 0.35, operator.ge, ">="),
    Target("aim: mediator steps/s >= 0.5 x raw floor (3-step)",
           "ratio.mediator_over_raw_floor.chain3_steps", 0.5, operator.ge, ">="),
    Target("SDK echo service >= 0.7 x raw echo service (3-step floor)",
           "ratio.sdk_over_raw_floor.chain3_steps", 0.7, operator.ge, ">="),
    Target("overhead per step p99 at half load < 5 ms", "mediator.chain3.half_load.overhead_p99",
           5.0, operator.lt, "<"),
    Target("3-step latency at low load <= 2 x raw floor's (p50)",
           "ratio.low_load_latency_over_raw_floor.chain3_p50", 2.0, operator.le, "<="),
    Target("mediator chains/s >= 5 x Celery (1-step)", "ratio.mediator_over_celery.chain1",
           5.0, operator.ge, ">="),
    Target("mediator chains/s >= 5 x Celery (3-step)", "ratio.mediator_over_celery.chain3",
           5.0, operator.ge, ">="),
    Target("mediator chains/s >= 10 x DBOS, async commit (1-step)",
           "ratio.mediator_over_dbos_async_commit.chain1", 10.0, operator.ge, ">="),
    Target("mediator chains/s >= 10 x DBOS, async commit (3-step)",
           "ratio.mediator_over_dbos_async_commit.chain3", 10.0, operator.ge, ">="),
    Target("timers on cost <= 15 % of 3-step throughput", "ratio.timers_over_plain.chain3",
           0.85, operator.ge, ">="),
    Target("timer firing lag p99 at half load < 100 ms", "mediator.chain3.half_load.timer_lag_p99",
           100.0, operator.lt, "<"),
    Target("load-balancing decision < 20 us (slowest strategy)", "micro.balancer.slowest",
           20.0, operator.lt, "<"),
    Target("1,000-step DAG plan < 5 ms (from a dict)", "micro.dag1000.plan_from_dict",
           5.0, operator.lt, "<"),
]  # fmt: skip

RATIOS = {
    "ratio.mediator_over_raw_floor.chain3_steps": (
        "mediator.chain3.steps_per_s", "floor.raw.chain3.steps_per_s"),
    "ratio.mediator_over_sdk_floor.chain3_steps": (
        "mediator.chain3.steps_per_s", "floor.sdk.chain3.steps_per_s"),
    "ratio.mediator_over_raw_floor.chain1_steps": (
        "mediator.chain1.steps_per_s", "floor.raw.chain1.steps_per_s"),
    "ratio.mediator_over_sdk_floor.chain1_steps": (
        "mediator.chain1.steps_per_s", "floor.sdk.chain1.steps_per_s"),
    "ratio.sdk_over_raw_floor.chain3_steps": (
        "floor.sdk.chain3.steps_per_s", "floor.raw.chain3.steps_per_s"),
    "ratio.sdk_over_raw_floor.chain1_steps": (
        "floor.sdk.chain1.steps_per_s", "floor.raw.chain1.steps_per_s"),
    "ratio.low_load_latency_over_raw_floor.chain3_p50": (
        "mediator.chain3.low_load.latency_p50", "floor.raw.chain3.low_load.latency_p50"),
    "ratio.half_load_latency_over_raw_floor.chain3_p50": (
        "mediator.chain3.half_load.latency_p50", "floor.raw.chain3.half_load.latency_p50"),
    "ratio.timers_over_plain.chain3": (
        "mediator.chain3_timers.steps_per_s", "mediator.chain3.steps_per_s"),
    "ratio.mediator_over_celery.chain1": (
        "mediator.chain1.workflows_per_s", "celery.chain1.chains_per_s"),
    "ratio.mediator_over_celery.chain3": (
        "mediator.chain3.workflows_per_s", "celery.chain3.chains_per_s"),
    "ratio.mediator_over_dbos.chain1": (
        "mediator.chain1.workflows_per_s", "dbos.chain1.chains_per_s"),
    "ratio.mediator_over_dbos.chain3": (
        "mediator.chain3.workflows_per_s", "dbos.chain3.chains_per_s"),
    "ratio.mediator_over_dbos_async_commit.chain1": (
        "mediator.chain1.workflows_per_s", "dbos_async_commit.chain1.chains_per_s"),
    "ratio.mediator_over_dbos_async_commit.chain3": (
        "mediator.chain3.workflows_per_s", "dbos_async_commit.chain3.chains_per_s"),
    "ratio.replicas2_over_replicas1.chain3": (
        "scaling.replicas2.chain3.workflows_per_s", "scaling.replicas1.chain3.workflows_per_s"),
    "ratio.replicas4_over_replicas1.chain3": (
        "scaling.replicas4.chain3.workflows_per_s", "scaling.replicas1.chain3.workflows_per_s"),
}  # fmt: skip

#: What the throughput targets allow at most on this machine: the steps/s a replica that
#: cost no CPU at all would reach, every other process (echo service, broker, the state
#: Redis, client) spending what it spent per step in this run and the cores as busy, over
#: the raw floor's steps/s. An estimate (the others' cost per step falls a little as
#: batches grow with the rate), but it bounds what any replica can reach here.
CEILINGS = {
    "ratio.free_replica_over_raw_floor.chain3_steps": (
        "mediator.chain3", "floor.raw.chain3.steps_per_s"),
    "ratio.free_replica_over_raw_floor.chain1_steps": (
        "mediator.chain1", "floor.raw.chain1.steps_per_s"),
}  # fmt: skip

#: From the same figures: the CPU per step (ms) the replica could spend and the workflow
#: still reach its throughput target (`TARGETS`' ratio to the raw floor), the cores as busy.
REPLICA_BUDGETS = {
    "budget.replica_cpu_for_target.chain3": (
        "mediator.chain3", "floor.raw.chain3.steps_per_s", 0.5),
    "budget.replica_cpu_for_target.chain1": (
        "mediator.chain1", "floor.raw.chain1.steps_per_s", 0.35),
}  # fmt: skip

#: The processes whose CPU per step make up a mediator rig's (`benchmarks.cpu.ROLES`).
_RIG_ROLES = ("replica", "echo", "broker", "redis", "client")


def derived(measures: list[Measure]) -> dict[str, float | None]:
    """Medians by name, plus the ratios of medians taken within this run."""
    values: dict[str, float | None] = {m.name: m.median for m in measures}
    for name, (top, bottom) in RATIOS.items():
        a, b = values.get(top), values.get(bottom)
        values[name] = round(a / b, 3) if a is not None and b else None
    for name, (prefix, floor) in CEILINGS.items():
        values[name] = _free_replica_ratio(values, prefix, values.get(floor))
    for name, (prefix, floor, ratio) in REPLICA_BUDGETS.items():
        values[name] = _replica_budget(values, prefix, values.get(floor), ratio)
    balancer = [m.median for m in measures
                if m.name.startswith("micro.balancer.") and m.median is not None]  # fmt: skip
    values["micro.balancer.slowest"] = max(balancer) if balancer else None
    return values


def _rig_cpu(values: dict[str, float | None], prefix: str) -> tuple[float, float, float] | None:
    """The workflow's steps/s, its rig's CPU per step (ms) and the replica's share of it;
    None without every figure."""
    cpu = [values.get(f"{prefix}.cpu_per_step.{role}") for role in _RIG_ROLES]
    rate = values.get(f"{prefix}.steps_per_s")
    if rate is None or any(v is None for v in cpu):
        return None
    return rate, sum(v for v in cpu if v is not None), cpu[0] or 0.0


def _free_replica_ratio(
    values: dict[str, float | None], prefix: str, floor: float | None
) -> float | None:
    """`CEILINGS`' estimate for the workflow `prefix`, or None without every figure."""
    found = _rig_cpu(values, prefix)
    if found is None or not floor:
        return None
    rate, total, replica = found
    others = total - replica
    return round(rate * total / others / floor, 3) if others > 0 else None


def _replica_budget(
    values: dict[str, float | None], prefix: str, floor: float | None, ratio: float
) -> float | None:
    """`REPLICA_BUDGETS`' figure (negative: out of reach whatever the replica spends)."""
    found = _rig_cpu(values, prefix)
    if found is None or not floor:
        return None
    rate, total, replica = found
    return round(rate * total / (ratio * floor) - (total - replica), 4)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(measures: list[Measure], errors: dict[str, str]) -> str:
    """A Markdown table of every measure, the ratios and the targets."""
    values = derived(measures)
    lines = ["| measure | median | unit | repetitions | note |", "|---|---:|---|---|---|"]
    for m in measures:
        reps = ", ".join(_fmt(v) for v in m.values) or "-"
        lines.append(f"| {m.name} | {_fmt(m.median)} | {m.unit} | {reps} | {m.note} |")
    lines += ["", "| ratio (medians, same run) | value |", "|---|---:|"]
    lines += [
        f"| {name} | {_fmt(values[name])} |" for name in [*RATIOS, *CEILINGS, *REPLICA_BUDGETS]
    ]
    lines += ["", "| target | value | status |", "|---|---:|---|"]
    for target in TARGETS:
        value, status = target.verdict(values)
        lines.append(f"| {target.label} | {_fmt(value)} | {status} |")
    if errors:
        lines += ["", "| section | error |", "|---|---|"]
        lines += [f"| {k} | {_one_line(v)} |" for k, v in errors.items()]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "/")[:300]


def to_json(
    measures: list[Measure], errors: dict[str, str], meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole run: machine and settings, every measure, ratios, targets, errors."""
    values = derived(measures)
    targets = []
    for target in TARGETS:
        value, status = target.verdict(values)
        targets.append({"target": target.label, "measure": target.measure,
                        "bound": f"{target.symbol} {target.bound:g}", "value": value,
                        "status": status})  # fmt: skip
    return {
        "meta": meta,
        "measures": {m.name: m.to_json() for m in measures},
        "ratios": {name: values[name] for name in [*RATIOS, *CEILINGS, *REPLICA_BUDGETS]},
        "targets": targets,
        "errors": errors,
    }


def update_readme(path: Path, table: str, meta: dict[str, Any]) -> None:
    """Replace the results section of the README with this run's table and machine."""
    machine = meta["machine"]
    header = (
        f"Run on {meta['date']} ({meta['profile']} profile, {meta['repeat']} repetitions, "
        f"{meta['duration_s']:.0f} s): {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['ram_gb']} GB RAM, Python {machine['python']}, {machine['os']}, "
        f"{machine.get('event_loop', 'asyncio')} event loop in every process; "
        f"broker {meta['broker']}, Redis {meta['redis']}."
    )
    section = f"{README_START}\n{header}\n\n{table}\n{README_END}"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{README_START}\n{README_END}\n"
    if README_START not in text:
        text += f"\n{README_START}\n{README_END}\n"
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1] if README_END in rest else ""
    path.write_text(before + section + after)
