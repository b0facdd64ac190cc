"""What a replica counts about itself, as typed fields (a misspelt counter is a type
error, not a `KeyError` at run time). Exposed on the Prometheus endpoint by family
(`mediator.runtime.recording.StatsCollector`) and logged when the replica stops."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["BreakerStats", "OutboxStats", "RuntimeStats", "Stats"]


class Stats:
    """Counters as dataclass fields, all ints."""

    __slots__ = ()

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(slots=True)
class RuntimeStats(Stats):
    """What the runtime handled: requests, replies, timers, controls and heartbeats."""

    requests: int = 0
    duplicates: int = 0
    redelivered: int = 0
    conflicting_requests: int = 0
    replies: int = 0
    ignored_replies: int = 0
    unknown_workflow_replies: int = 0
    conflicts: int = 0
    dead_letters: int = 0
    rejected_requests: int = 0
    timers: int = 0
    stale_timers: int = 0
    controls: int = 0
    ignored_controls: int = 0
    parked: int = 0
    rerouted: int = 0
    heartbeats: int = 0
    stale_heartbeats: int = 0
    instances_down: int = 0
    rerouted_on_death: int = 0
    bad_signatures: int = 0
    #: Commands held in their service's queue by a flow-control limit.
    queued: int = 0
    permit_release_errors: int = 0
    #: Runs queued under a concurrency key that this replica handed a freed slot.
    admitted: int = 0
    slot_release_errors: int = 0


@dataclass(slots=True)
class OutboxStats(Stats):
    """What the outbox's publishes and sweeps met."""

    retried: int = 0
    dead: int = 0
    fenced: int = 0
    lost_in_flight: int = 0
    sweep_failures: int = 0
    unknown_partition: int = 0
    #: Times the producer was made again: its sequence numbers out of step with the
    #: broker's (an idempotent producer after a batch the broker refused).
    producer_renewed: int = 0


@dataclass(slots=True)
class BreakerStats(Stats):
    """The shared breakers' transitions this replica made, and its writes that failed."""

    opened: int = 0
    closed: int = 0
    half_opened: int = 0
    probes: int = 0
    conflicts: int = 0
    errors: int = 0
