"""The pure metrics and alert rules: tallies, histograms, summaries, fire and resolve."""

from __future__ import annotations

from mediator.core.alerts import QUEUE_WAIT, Rule, evaluate
from mediator.core.counters import CounterKey, svc, wf
from mediator.core.metrics import Observation, Tally, bucket_field, percentile_ms, summarize
from mediator.core.transition import Transition
from mediator.settings import AlertThreshold, Settings
from topics.events import AlertEvent, AlertState

T0 = 1_700_000_000_000


def test_observations_land_in_histogram_buckets_by_upper_bound() -> None:
    assert bucket_field(0) == "h:5"
    assert bucket_field(5) == "h:5"
    assert bucket_field(6) == "h:10"
    assert bucket_field(60_001) == "h:inf"


def test_tally_splits_engine_counters_and_observations_by_bucket() -> None:
    tally = Tally(bucket_s=10)
    tally.counters(
        {
            svc("pay", "sent"): 2,
            svc("pay", "ok"): 1,
            wf("order", "started"): 1,
            CounterKey("", "", "steps:x"): 4,
        },
        T0,
    )
    tally.counters(
        {svc("pay", "sent"): -1, wf("order", "failed"): -1}, T0
    )  # taken back: not events
    tally.observe(Observation("svc", "pay", "ok", 40, "pay-1"), T0)
    tally.observe(Observation("svc", "pay", "timeout", 2_000, "pay-2"), T0 + 10_000)
    series = tally.drain()
    bucket = tally.bucket(T0)
    assert series[("svc", "pay", bucket)] == {"sent": 2, "ok": 1, "n": 1, "sum": 40, "h:50": 1}
    assert series[("wf", "order", bucket)] == {"started": 1}
    assert series[("inst", "pay/pay-1", bucket)] == {"n": 1, "sum": 40, "h:50": 1, "ok": 1}
    later = tally.bucket(T0 + 10_000)
    assert later == bucket + 10
    assert series[("inst", "pay/pay-2", later)]["timeout"] == 1
    assert len(tally) == 0


def test_restore_puts_back_counts_and_keeps_the_newer_gauge() -> None:
    tally = Tally(bucket_s=10)
    tally.add("svc", "pay", "ok", T0, 3)
    tally.set("svc", "pay", "parked", T0, 7)
    failed = tally.drain()
    tally.add("svc", "pay", "ok", T0, 2)
    tally.set("svc", "pay", "parked", T0, 1)
    tally.restore(failed)
    fields = tally.drain()[("svc", "pay", tally.bucket(T0))]
    assert fields == {"ok": 5, "parked": 1}


def test_percentiles_read_from_the_histogram() -> None:
    fields = {"h:10": 50, "h:100": 45, "h:1000": 5}
    assert percentile_ms(fields, 50) == 10
    assert percentile_ms(fields, 95) == 100
    assert percentile_ms(fields, 99) == 900  # 4/5 of the way through (500, 1000]
    assert percentile_ms({}, 50) is None
    # Within its bucket, not the bucket's bound: four replies in (25, 50] ms.
    assert percentile_ms({"h:50": 4}, 50) == 37.5
    assert percentile_ms({"h:inf": 3}, 50) == 60_000  # the open bucket: the largest bound


def test_summary_rates_and_availability() -> None:
    summary = summarize(
        [
            {"n": 6, "ok": 4, "error": 1, "timeout": 1},
            {"n": 4, "ok": 4, "avail_n": 4, "avail_up": 3},
        ],
        seconds=10,
    )
    assert summary.answered == 10
    assert summary.throughput == 1.0
    assert summary.error_rate == 0.2
    assert summary.rate("timeout") == 0.1
    assert summary.availability == 0.75


def test_engine_observations_are_carried_by_the_transition() -> None:
    # A run that ends observes its duration (kind wf), in the same transition.
    from mediator.core.state import WorkflowState
    from mediator.core.transition import end
    from topics.events import WorkflowStatus

    state = WorkflowState(
        workflow_id="wf-1",
        request_id="r-1",
        workflow="order",
        version=1,
        status=WorkflowStatus.RUNNING,
        payload={},
        created_ms=T0,
        updated_ms=T0,
    )
    transition = end(Transition(state), {"ok": True}, None, T0 + 1_234)
    assert transition.observed == [Observation("wf", "order", "completed", 1_234)]


def slow_rule(**extra: object) -> Rule:
    return AlertThreshold(metric="response_time", threshold="200ms", min_samples=3, **extra).rule()


def test_an_alert_fires_once_while_breached_and_resolves_once() -> None:
    rule = slow_rule()
    slow = summarize([{"n": 5, "h:500": 5}], 5)
    fast = summarize([{"n": 5, "h:50": 5}], 5)
    [fired] = evaluate([rule], {"pay": slow}, {}, T0, 5_000)
    assert fired.state is AlertState.FIRING
    assert fired.value == 487.5 and fired.threshold == 200.0
    assert "p95 response time 487.5 ms is above 200 ms" in fired.message
    active = {fired.alert_id: fired}
    assert evaluate([rule], {"pay": slow}, active, T0 + 1_000, 5_000) == []  # no repeat
    [resolved] = evaluate([rule], {"pay": fast}, active, T0 + 2_000, 5_000)
    assert resolved.state is AlertState.RESOLVED
    assert resolved.alert_id == fired.alert_id and resolved.since_ms == T0


def test_an_alert_still_firing_says_what_holds_now_without_firing_again() -> None:
    rule = slow_rule()
    slow = summarize([{"n": 5, "h:500": 5}], 5)
    slower = summarize([{"n": 5, "h:1000": 5}], 5)
    [fired] = evaluate([rule], {"pay": slow}, {}, T0, 5_000)
    held: list[AlertEvent] = []
    changes = evaluate([rule], {"pay": slower}, {fired.alert_id: fired}, T0 + 1_000, 5_000, held)
    assert changes == []  # nothing new to announce
    [now] = held
    assert now.state is AlertState.FIRING and now.since_ms == T0 and now.ts_ms == T0 + 1_000
    assert now.value == 975.0 and "p95 response time 975 ms" in now.message


def test_too_few_samples_do_not_fire_and_availability_fires_below() -> None:
    rule = slow_rule()
    assert evaluate([rule], {"pay": summarize([{"n": 2, "h:500": 2}], 5)}, {}, T0, 5_000) == []
    availability = AlertThreshold(metric="availability", threshold="99%").rule()
    down = summarize([{"avail_n": 10, "avail_up": 5}], 5)
    [fired] = evaluate([availability], {"pay": down}, {}, T0, 5_000)
    assert fired.value == 0.5
    assert "below 99.00%" in fired.message


def test_rules_apply_to_their_services_and_resolve_when_unmeasured() -> None:
    rule = slow_rule(services=["pay"])
    slow = summarize([{"n": 5, "h:500": 5}], 5)
    assert evaluate([rule], {"ship": slow}, {}, T0, 5_000) == []
    [fired] = evaluate([rule], {"pay": slow}, {}, T0, 5_000)
    [gone] = evaluate([rule], {}, {fired.alert_id: fired}, T0 + 1, 5_000)
    assert gone.state is AlertState.RESOLVED


def test_thresholds_parse_as_the_spec_writes_them() -> None:
    rules = [t.rule() for t in Settings().service_monitoring.alert_thresholds]
    assert [(r.metric, r.limit, r.severity) for r in rules] == [
        ("response_time", 5_000.0, "warning"),
        ("error_rate", 0.05, "critical"),
        ("availability", 0.99, "critical"),
    ]


def test_a_threshold_that_does_not_parse_is_refused_clearly() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is not a share"):
        AlertThreshold(metric="error_rate", threshold="lots")
    with pytest.raises(ValidationError, match="is not a duration"):
        AlertThreshold(metric="response_time", threshold="soon")


def test_a_firing_alert_holds_through_a_window_with_too_few_samples() -> None:
    # A slow service answers few commands per window: a thin window is no evidence that
    # it recovered (resolving there made the alert flap: fire, resolve, fire again).
    rule = slow_rule()
    [fired] = evaluate([rule], {"pay": summarize([{"n": 5, "h:500": 5}], 5)}, {}, T0, 5_000)
    active = {fired.alert_id: fired}
    thin = summarize([{"n": 2, "h:500": 2}], 5)
    assert evaluate([rule], {"pay": thin}, active, T0 + 1_000, 5_000) == []
    # A window with nothing answered at all: the service went quiet, nothing holds it.
    [quiet] = evaluate([rule], {"pay": summarize([{"sent": 0}], 5)}, active, T0 + 2_000, 5_000)
    assert quiet.state is AlertState.RESOLVED


def test_a_queue_wait_alert_fires_on_the_oldest_wait_and_resolves_once_drained() -> None:
    rule = AlertThreshold(metric="queue_wait", threshold="30s", severity="warning").rule()
    assert rule.limit == 30_000 and rule.name == "queue_wait>30000ms"
    waiting = summarize([], 60)
    waiting.fields[QUEUE_WAIT] = 45_000
    [fired] = evaluate([rule], {"keys:order": waiting}, {}, T0, 60_000)
    assert fired.state is AlertState.FIRING and fired.value == 45_000
    assert fired.message == "keys:order: oldest queued wait 45000 ms is above 30000 ms"
    active = {fired.alert_id: fired}
    drained = summarize([], 60)
    drained.fields[QUEUE_WAIT] = 0
    [resolved] = evaluate([rule], {"keys:order": drained}, active, T0 + 5_000, 60_000)
    assert resolved.state is AlertState.RESOLVED
    # A service with nothing sampled (no queue read) is not judged: nothing fires.
    assert evaluate([rule], {"pay": summarize([{"n": 9}], 60)}, {}, T0, 60_000) == []
