"""The benchmark suite in its smallest configuration: every piece runs and reports numbers.

Correctness only (results present, positive, workflows completed); no timing assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import celery_bench, floor, inproc, mediator_bench, micro, report, scaling
from benchmarks.common import Measure, Profile
from benchmarks.stage import open_stage
from mediator.cli.infra import EmbeddedKafka, EmbeddedRedis

TINY = Profile(
    "smoke", repeat=1, warmup_s=0.2, measure_s=0.5, half_load_s=0.5, floor_in_flight=20,
    mediator_in_flight=20, celery_in_flight=10, micro_iterations=2, memory_workflows=20,
    budget_s=60.0, fresh_rigs=False, drain_s=20.0,
)  # fmt: skip


def _positive(measures: list[Measure], *names: str) -> None:
    by_name = {m.name: m for m in measures}
    for name in names:
        assert name in by_name, f"{name} missing from {sorted(by_name)}"
        values = by_name[name].values
        assert values and all(v > 0 for v in values), (name, values)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_every_section_reports_positive_numbers(
    kafka: EmbeddedKafka, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    measures: list[Measure] = []
    async with open_stage(kafka.bootstrap_servers, redis_server.url) as stage:
        measures += await floor.run_floor(stage, TINY, chains=(3,))
        measures += await mediator_bench.run_mediator(
            stage, TINY, workflows=("chain3", "chain3_timers")
        )
        measures += await floor.run_floor_latency(stage, TINY, rate=50.0)
        measures += await celery_bench.run_celery(stage, TINY, chains=(3,))
        measures += micro.balancer_decision(TINY) + micro.plan_dag(TINY)
        measures += micro.transition_events(TINY)
        measures += await micro.commit_per_transition(stage, TINY)
        measures += await micro.redis_bytes_per_workflow(stage, TINY)
        measures += await scaling.run_scaling(stage, TINY, in_flight=20, max_replicas=1)
    measures += await inproc.run_inproc(redis_server.url, TINY, [], runs=50)

    _positive(
        measures,
        "floor.raw.chain3.chains_per_s",
        "floor.sdk.chain3.chains_per_s",
        "floor.raw.chain3.cpu_per_step.echo",
        "floor.raw.chain3.half_load.latency_p99",
        "floor.raw.chain3.low_load.latency_p50",
        "mediator.chain3.cpu_per_step.replica",
        "mediator.chain3.cpu_per_step.echo",
        "mediator.chain3.low_load.latency_p50",
        "mediator.chain3.workflows_per_s",
        "mediator.chain3.steps_per_s",
        "mediator.chain3.half_load.latency_p50",
        "mediator.chain3.half_load.overhead_p99",
        "mediator.chain3_timers.steps_per_s",
        "mediator.chain3.half_load.timer_lag_p99",
        "celery.chain3.chains_per_s",
        "micro.dag1000.plan_from_dict",
        "micro.dag1000.plan_from_yaml",
        "micro.events.models",
        "micro.events.plain",
        "micro.commit.single",
        "micro.commit.pipelined100",
        "micro.redis.bytes_per_chain3",
        "scaling.replicas1.chain3.workflows_per_s",
        "inproc.chain3.cpu_per_step",
        "inproc.chain3.redis_cpu_per_step",
        "inproc.chain1.cpu_per_step",
    )
    balancer = [m for m in measures if m.name.startswith("micro.balancer.")]
    assert balancer and all(m.values or "n/a" in m.note for m in balancer)

    table = report.render_table(measures, {})
    assert "ratio.mediator_over_raw_floor.chain3_steps" in table
    doc = report.to_json(measures, {}, {"date": "now"})
    assert json.loads(json.dumps(doc))["measures"]["mediator.chain3.steps_per_s"]["median"] > 0
    readme = tmp_path / "README.md"
    meta = {"date": "now", "profile": "smoke", "repeat": 1, "duration_s": 1.0,
            "machine": {"cores": 2, "cpu": "x", "ram_gb": 1, "python": "3", "os": "linux"},
            "broker": "tansu", "redis": "valkey"}  # fmt: skip
    report.update_readme(readme, table, meta)
    report.update_readme(readme, table, meta)  # idempotent: one section, replaced
    assert readme.read_text().count(report.README_START) == 1


def _measure(name: str, value: float) -> Measure:
    return Measure(name, "x", values=[value])


def test_the_free_replica_ceiling_is_the_rate_with_the_replicas_cpu_taken_out() -> None:
    # 4,000 steps/s at 0.4 ms of CPU per step over the rig, half of it the replica's: the
    # same cores busy with only the other half would give 8,000 steps/s, 0.5 x a floor
    # of 16,000.
    cpu = {"replica": 0.2, "echo": 0.05, "broker": 0.05, "redis": 0.04, "client": 0.06}
    measures = [
        _measure("mediator.chain3.steps_per_s", 4000.0),
        _measure("floor.raw.chain3.steps_per_s", 16000.0),
        *(_measure(f"mediator.chain3.cpu_per_step.{role}", ms) for role, ms in cpu.items()),
    ]
    values = report.derived(measures)
    assert values["ratio.free_replica_over_raw_floor.chain3_steps"] == 0.5
    # The target, 0.5 x the floor (8,000 steps/s), allows the rig 1.6 cores / 8,000 =
    # 0.2 ms per step, all of it the others': nothing is left for the replica.
    assert report.REPLICA_BUDGETS["budget.replica_cpu_for_target.chain3"][2] == 0.5
    assert values["budget.replica_cpu_for_target.chain3"] == 0.0
    # Without the state Redis's CPU (a Redis the suite did not start) there is no estimate.
    values = report.derived([m for m in measures if not m.name.endswith(".redis")])
    assert values["ratio.free_replica_over_raw_floor.chain3_steps"] is None
    assert values["ratio.free_replica_over_raw_floor.chain1_steps"] is None
