"""Metrics, the audit log, Prometheus and alerts against the real broker and Redis."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import orjson
import pytest

from mediator.sdk.worker import ActionError
from mediator.storage.keys import workflow_id_for
from tests.helpers import consume_all, wait_for
from tests.system import CHAIN3, echo
from topics.events import AlertEvent, AlertState, WorkflowStatus


async def _fail_some(data: Any, command: Any) -> dict[str, Any]:
    if data.get("fail") and command.step == "b":
        msg = "refused"
        raise ActionError(msg, code="refused", retryable=False)
    return await echo(data, command)


async def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_in_redis_and_on_the_metrics_endpoint_match_what_ran(
    make_system: Any,
) -> None:
    system = await make_system(CHAIN3)
    await system.worker("svc", {"work": _fail_some})
    mediator = await system.mediator()
    client = await system.client()

    results = await asyncio.gather(
        *(client.submit("chain3", {"i": i, "fail": i % 4 == 0}, timeout=30) for i in range(12))
    )
    failed = sum(r.status is WorkflowStatus.FAILED for r in results)
    assert failed == 3

    await mediator.flusher.flush()
    until = int(time.time())
    svc = (await mediator.metrics.summaries("svc", ["svc"], until - 120, until))["svc"]
    # 12 runs: a and b for each (24 commands), c for the 9 that passed b.
    assert svc.count("sent") == 33
    assert svc.count("ok") == 30
    # The three refusals are answers the service chose (not retryable): counted as
    # rejected, not as errors, so they move neither its error rate nor its alerts.
    assert svc.count("rejected") == 3 and svc.count("error") == 0
    assert svc.answered == 33
    assert svc.error_rate == 0
    assert svc.percentile(99) is not None
    wf = (await mediator.metrics.summaries("wf", ["chain3"], until - 120, until))["chain3"]
    assert (wf.count("started"), wf.count("completed"), wf.count("failed")) == (12, 9, 3)
    assert wf.answered == 12
    instances = await mediator.metrics.names("inst")
    assert instances == [f"svc/{system.workers['svc'].instance}"]

    assert mediator.endpoints is not None
    status, text = await _scrape(mediator.endpoints.port)
    assert status == 200
    count = "mediator_service_response_seconds_count"
    assert _sample(text, count, service="svc", outcome="ok") == 30
    assert _sample(text, count, service="svc", outcome="rejected") == 3
    assert _sample(text, "mediator_service_response_seconds_bucket", service="svc",
                   outcome="ok", le="+Inf") == 30  # fmt: skip
    assert _sample(text, "mediator_workflows_total", workflow="chain3", event="started") == 12
    assert _sample(text, "mediator_workflows_total", workflow="chain3", event="failed") == 3
    assert _sample(text, "mediator_workflow_duration_seconds_count", workflow="chain3",
                   status="completed") == 9  # fmt: skip
    assert _sample(text, "mediator_runtime_total", event="replies") == 33
    assert _sample(text, "mediator_breaker_state", service="svc") == 0
    assert "mediator_timer_shards_failing 0.0" in text.splitlines()

    assert (await _scrape(mediator.endpoints.port, "/healthz"))[0] == 200
    assert (await _scrape(mediator.endpoints.port, "/readyz"))[0] == 200


async def test_audit_log_records_each_transition_with_its_replica(make_system: Any) -> None:
    system = await make_system(CHAIN3)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()

    result = await client.submit("chain3", {"x": 1}, request_id="audited", timeout=30)
    assert result.status is WorkflowStatus.COMPLETED

    wid = workflow_id_for("audited")
    raw = await mediator.redis.xrange(mediator.store.keys.audit(wid))
    entries = [orjson.loads(fields[b"e"]) for _, fields in raw]
    assert [(e["event"], e.get("step")) for e in entries] == [
        ("request", None),
        ("reply", "a"),
        ("reply", "b"),
        ("reply", "c"),
    ]
    assert {e["replica"] for e in entries} == {mediator.replica}
    assert [e["status"] for e in entries] == ["running", "running", "running", "completed"]
    assert [[s["step"] for s in e.get("sent", [])] for e in entries] == [["a"], ["b"], ["c"], []]
    instance = system.workers["svc"].instance
    assert all(e["instance"] == instance and e["outcome"] == "ok" for e in entries[1:])
    # A finished run's log expires with its state.
    assert await mediator.redis.pttl(mediator.store.keys.audit(wid)) > 0


async def test_audit_log_keeps_only_the_newest_entries(make_system: Any, settings: Any) -> None:
    system = await make_system(CHAIN3, audit=settings.audit.model_copy(update={"max_entries": 2}))
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    await client.submit("chain3", {}, request_id="capped", timeout=30)
    raw = await mediator.redis.xrange(mediator.store.keys.audit(workflow_id_for("capped")))
    assert [orjson.loads(f[b"e"]).get("step") for _, f in raw] == ["b", "c"]


@pytest.mark.slow
async def test_a_slow_service_fires_one_alert_and_one_resolve(
    make_system: Any, settings: Any
) -> None:
    monitoring = settings.service_monitoring.model_copy(
        update={
            "bucket_s": 1,
            "flush_ms": 100,
            "alert_interval_ms": 300,
            "alert_window_ms": 3_000,
            # Far above what a loaded two-core CI machine makes of a fast echo (p95 spikes
            # of 100-250 ms were seen there), so only the slowdown below can breach it.
            "alert_thresholds": [
                settings.service_monitoring.alert_thresholds[0].model_copy(
                    update={"threshold": "500ms", "min_samples": 3}
                )
            ],
        }
    )
    system = await make_system(CHAIN3, service_monitoring=monitoring)
    delay = {"s": 0.0}

    async def work(data: Any, command: Any) -> dict[str, Any]:
        await asyncio.sleep(delay["s"])
        return await echo(data, command)

    await system.worker("svc", {"work": work}, concurrency=16)
    mediator = await system.mediator()
    client = await system.client()
    stop = asyncio.Event()

    async def traffic(lane: int) -> None:
        i = 0
        while not stop.is_set():
            await client.submit("chain3", {"lane": lane, "i": i}, timeout=30)
            i += 1

    async def phase(seconds: float) -> None:
        await asyncio.sleep(seconds)

    # Four requests in flight, so a slow window still holds enough samples to judge.
    runner = asyncio.gather(*(traffic(lane) for lane in range(4)))
    try:
        await phase(2.0)  # fast: nothing fires
        assert await mediator.redis.hlen(mediator.store.keys.alerts("active")) == 0
        delay["s"] = 1.0
        await wait_for(
            lambda: mediator.redis.hlen(mediator.store.keys.alerts("active")),
            timeout=20,
            what="the response-time alert to fire",
        )
        await phase(2.0)  # still slow: it must not fire again
        delay["s"] = 0.0
        await wait_for(
            lambda: _not(mediator.redis.hlen(mediator.store.keys.alerts("active"))),
            timeout=20,
            what="the alert to resolve",
        )
        await phase(1.5)  # fast again: nothing more
    finally:
        stop.set()
        await runner
    records = await consume_all(system.bootstrap, system.topics.alerts, count=2, timeout=10)
    seen = [AlertEvent.model_validate_json(r.value) for r in records]
    assert [(a.state, a.service, a.metric) for a in seen] == [
        (AlertState.FIRING, "svc", "response_time"),
        (AlertState.RESOLVED, "svc", "response_time"),
    ]
    fired, resolved = seen
    assert fired.alert_id == resolved.alert_id and fired.since_ms == resolved.since_ms
    assert fired.value is not None and fired.value > 500
    history = await mediator.redis.lrange(mediator.store.keys.alerts("history"), 0, -1)
    assert len(history) == 2


async def _not(value: Any) -> bool:
    return not await value


async def test_a_metrics_write_that_fails_keeps_the_tally_for_the_next(settings: Any) -> None:
    import pytest
    from prometheus_client import CollectorRegistry

    from mediator.errors import StateUnavailable
    from mediator.runtime.recording import MetricsFlusher, Recorder
    from mediator.storage.connection import connect
    from mediator.storage.keys import Keys
    from mediator.storage.metrics import MetricsStore

    recorder = Recorder(CollectorRegistry(), bucket_s=10)
    recorder.tally.add("svc", "pay", "ok", 1_700_000_000_000, 3)
    gone = connect("redis://127.0.0.1:1/0", timeout_s=0.5)  # nothing listens there
    flusher = MetricsFlusher(recorder, MetricsStore(gone, Keys("x", 4), 10, 60_000), 100)
    try:
        with pytest.raises(StateUnavailable, match="writing metrics"):
            await flusher.flush()
    finally:
        await gone.aclose()
    assert recorder.tally.drain() == {("svc", "pay", 1_700_000_000): {"ok": 3}}


async def test_a_taken_metrics_port_stops_the_replica_with_a_clear_error(
    make_system: Any, settings: Any
) -> None:
    import socket

    import pytest

    from mediator.errors import ConfigurationError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        system = await make_system(CHAIN3, http=settings.http.model_copy(update={"port": port}))
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics and health on "
                           f"127.0.0.1:{port}.*http.port"):  # fmt: skip
            await system.mediator()
