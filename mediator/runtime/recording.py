"""What a replica measures: the engine's counters and timed outcomes of every committed
transition, tallied into time buckets (written to Redis by `MetricsFlusher`, one pipeline
per flush, so replicas add up) and into the replica's Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mediator.core.counters import CounterKey
from mediator.core.metrics import BOUNDS_MS, Observation, Tally, counter_series
from mediator.core.transition import Transition
from mediator.runtime.periodic import Periodic
from mediator.settings import BackoffSettings
from mediator.storage.metrics import MetricsStore

__all__ = ["MetricsFlusher", "Recorder", "StatsCollector"]

log = logging.getLogger("mediator.metrics")

_SECONDS = tuple(b / 1000 for b in BOUNDS_MS)
#: Distinct instance labels per service in `mediator_instance_replies`; further instances
#: are counted under `OTHER_INSTANCES`.
MAX_INSTANCE_LABELS = 256
OTHER_INSTANCES = "_other"


class Recorder:
    """Tallies committed transitions; `tally` is drained by the flusher."""

    def __init__(self, registry: CollectorRegistry, bucket_s: int = 10) -> None:
        self.tally = Tally(bucket_s)
        self.registry = registry
        self._instances: dict[str, set[str]] = {}
        self.response = Histogram(
            "mediator_service_response_seconds",
            "Time from a command's send to its reply (or its timeout), per service.",
            ["service", "outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.instance_replies = Counter(
            "mediator_instance_replies",
            "Commands answered or timed out, per service instance.",
            ["service", "instance", "outcome"],
            registry=registry,
        )
        self.service_events = Counter(
            "mediator_service_commands",
            "Commands per service by what became of them (sent, ok, error, timeout, "
            "retried, parked, rerouted, ...).",
            ["service", "event"],
            registry=registry,
        )
        self.workflow_events = Counter(
            "mediator_workflows",
            "Workflow runs by event (started, completed, failed, cancelled, ...).",
            ["workflow", "event"],
            registry=registry,
        )
        self.duration = Histogram(
            "mediator_workflow_duration_seconds",
            "Time from a run's start to its end, per workflow and final status.",
            ["workflow", "status"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.breaker_changes = Counter(
            "mediator_breaker_transitions",
            "Circuit breaker state changes made by this replica.",
            ["service", "state"],
            registry=registry,
        )
        #: Label children already looked up, by engine counter name or observation key.
        self._children: dict[object, Any] = {}

    def record(self, transitions: Iterable[Transition], now_ms: int) -> None:
        """Tally committed transitions: a batch's counters are summed first, so each
        series is added to once per batch, not once per transition."""
        tally = self.tally
        children = self._children
        totals: dict[CounterKey, int] = {}
        observed: list[Observation] = []
        for transition in transitions:
            for name, delta in transition.counters.items():
                if delta > 0:
                    totals[name] = totals.get(name, 0) + delta
            observed += transition.observed
        tally.counters(totals, now_ms)
        for name, delta in totals.items():
            child = children.get(name)
            if child is None:
                child = children[name] = self._counter_child(name)
            if child is not False:
                child.inc(delta)
        if not observed:
            return
        tally.observe_many(observed, now_ms)
        for seen in observed:
            key = (seen.kind, seen.name, seen.outcome, seen.instance)
            timers = children.get(key)
            if timers is None:
                timers = children[key] = self._observation_children(seen)
            timers[0].observe(max(0, seen.ms) / 1000)
            if timers[1] is not None:
                timers[1].inc()

    def _counter_child(self, name: CounterKey) -> Any:
        """The Prometheus counter an engine counter feeds (False: none)."""
        found = counter_series(name)
        if found is None:
            return False
        kind, series, event = found
        family = self.service_events if kind == "svc" else self.workflow_events
        return family.labels(series, event)

    def _observation_children(self, seen: Observation) -> tuple[Any, Any]:
        """The histogram (and the instance counter) an observation feeds."""
        if seen.kind == "wf":
            return self.duration.labels(seen.name, seen.outcome), None
        instance = None
        if seen.instance is not None:
            # Instance names come from services: a bounded set of labels per service,
            # the rest counted together, so no sender can grow the series without bound.
            known = self._instances.setdefault(seen.name, set())
            label = seen.instance
            if label not in known:
                if len(known) >= MAX_INSTANCE_LABELS:
                    label = OTHER_INSTANCES
                else:
                    known.add(label)
            instance = self.instance_replies.labels(seen.name, label, seen.outcome)
        return self.response.labels(seen.name, seen.outcome), instance

    def breaker_changed(self, now_ms: Callable[[], int]) -> Callable[[str, str, str], None]:
        """A `Breakers.on_change` callback that tallies each transition."""

        def changed(service: str, old: str, new: str) -> None:
            state = new.replace("-", "_")
            self.breaker_changes.labels(service, state).inc()
            self.tally.add("svc", service, f"breaker_{state}", now_ms())

        return changed


class StatsCollector(Collector):
    """Exposes counters kept in plain dicts (the runtime's, the outbox's) and gauges
    read when scraped."""

    def __init__(
        self,
        counters: dict[str, Callable[[], dict[str, int]]],
        gauges: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]] | None = None,
    ) -> None:
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterable[Metric]:
        for family, read in self.counters.items():
            metric = CounterMetricFamily(
                f"mediator_{family}",
                f"Events counted by this replica's {family}.",
                labels=["event"],
            )
            for event, count in sorted(read().items()):
                metric.add_metric([event], count)
            yield metric
        if self.gauges is None:
            return
        by_name: dict[str, GaugeMetricFamily] = {}
        for gauge, doc, labels, reading in self.gauges():
            gauges = by_name.get(gauge)
            if gauges is None:
                gauges = by_name[gauge] = GaugeMetricFamily(gauge, doc, labels=list(labels))
            gauges.add_metric(list(labels.values()), reading)
        yield from by_name.values()


class MetricsFlusher(Periodic):
    """Writes the tally to Redis every `flush_ms`. A write that fails puts the tally back
    (it goes with the next write) and is retried with backoff."""

    name = "metrics-flush"
    label = "metrics flush"
    failed = "writing metrics failed"

    def __init__(
        self,
        recorder: Recorder,
        store: MetricsStore,
        flush_ms: int,
        backoff: BackoffSettings | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.recorder = recorder
        self.store = store
        self.flush_ms = flush_ms
        self.written = 0

    async def round(self) -> float:
        await self.flush()
        return self.flush_ms / 1000

    async def flush(self) -> None:
        """Write what was tallied since the last flush."""
        series = self.recorder.tally.drain()
        if not series:
            return
        try:
            await self.store.write(series)
        except BaseException:
            self.recorder.tally.restore(series)
            raise
        self.written += len(series)

    async def stop(self) -> None:
        """Stop, writing what is left (best effort: Redis may be gone)."""
        await super().stop()
        try:
            await self.flush()
        except Exception as exc:
            log.warning("metrics not written at shutdown: %s", exc)
