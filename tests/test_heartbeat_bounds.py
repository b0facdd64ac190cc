"""Heartbeats and replies are bounded where they enter: a value that would make an
instance immortal, win every weighted choice, break the routed index's member format or
grow the metrics' label set is refused as invalid (and dead-lettered by the replica)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from topics.events import HealthEvent, ReplyEvent

BEAT = '{"service":"payments","instance":"pay-1","ts_ms":1'


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (',"weight":Infinity', "weight"),
        (',"weight":1e308', "weight"),
        (',"load":NaN', "load"),
        (',"interval_ms":86400000', "interval_ms"),
        (',"partitions":[-1]', "partitions"),
        (',"partitions":[1000000]', "partitions"),
        (',"capacity":0', "capacity"),
        (',"inbox":"not a topic"', "inbox"),
    ],
)
def test_an_out_of_bounds_heartbeat_is_refused(extra: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        HealthEvent.model_validate_json(BEAT + extra + "}")
    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("name", ["pay|1", "pay 1", "", "-pay", "x" * 201, "pay\n1"])
def test_instance_and_service_names_come_from_a_strict_pattern(name: str) -> None:
    with pytest.raises(ValidationError):
        HealthEvent(service="payments", instance=name, ts_ms=1)
    with pytest.raises(ValidationError):
        HealthEvent(service=name, instance="pay-1", ts_ms=1)
    with pytest.raises(ValidationError):
        ReplyEvent.model_validate(
            {"command_id": "c", "workflow_id": "w", "step": "s", "attempt": 1,
             "status": "ok", "instance": name}
        )  # fmt: skip


def test_ordinary_names_and_values_pass() -> None:
    beat = HealthEvent(
        service="svc_payments.v2", instance="payments-host-1.example:8080@pid-77", ts_ms=1,
        weight=2.5, interval_ms=500, partitions=[0, 3], load=12.0,
    )  # fmt: skip
    assert beat.partitions == [0, 3]


def test_instance_labels_of_a_service_are_bounded() -> None:
    """Replies name their instance: past a bound, new names share one label, so no sender
    can grow the Prometheus series without end."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from mediator.core.metrics import Observation
    from mediator.runtime.recording import MAX_INSTANCE_LABELS, OTHER_INSTANCES, Recorder

    registry = CollectorRegistry()
    recorder = Recorder(registry, bucket_s=10)
    seen = [Observation("svc", "pay", "ok", 5, instance=f"pay-{n}")
            for n in range(MAX_INSTANCE_LABELS + 50)]  # fmt: skip
    recorder.record([SimpleNamespace(counters={}, observed=seen)], 1_700_000_000_000)  # type: ignore[list-item]
    labels = {
        sample.labels["instance"]
        for family in registry.collect()
        if family.name == "mediator_instance_replies"
        for sample in family.samples
    }
    assert len(labels) == MAX_INSTANCE_LABELS + 1 and OTHER_INSTANCES in labels
