"""Alert evaluation: one replica at a time (a lease in Redis) samples each service's
availability and parked backlog into the metrics, evaluates the alert rules over the
window and publishes each change as an `AlertEvent` on the alerts topic, keeping the
alerts now firing and a history in Redis.

A change is published before Redis records it: if the record fails, the next round
publishes it again (at least once; `alert_id` and `since_ms` identify a repeat), and a
publish that fails leaves Redis as it was, so the round is retried with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from redis.asyncio import Redis

from mediator.clock import now_ms
from mediator.codec import encode, headers
from mediator.core.alerts import QUEUE_WAIT, Rule, evaluate
from mediator.core.metrics import Tally, summarize
from mediator.runtime.messages import Message
from mediator.runtime.outbox import Dispatcher
from mediator.runtime.periodic import Periodic
from mediator.runtime.registry import Registry
from mediator.settings import BackoffSettings, MonitoringSettings
from mediator.storage.alerts import AlertRecords
from mediator.storage.keys import Keys
from mediator.storage.metrics import MetricsStore
from mediator.storage.parked import ParkedQueues
from mediator.storage.slots import Slots
from topics.events import AlertEvent, AlertState, HealthStatus

__all__ = ["AlertEvaluator"]

log = logging.getLogger("mediator.alerts")


class AlertEvaluator(Periodic):
    """Evaluates the alert rules every `alert_interval_ms` while holding the lease."""

    name = "alerts"
    label = "alert evaluation"
    failed = "alert evaluation failed"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: MonitoringSettings,
        metrics: MetricsStore,
        tally: Tally,
        dispatcher: Dispatcher,
        topic: str,
        replica: str,
        services: Callable[[], Iterable[str]],
        registry: Registry | None = None,
        backoff: BackoffSettings | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.settings = settings
        self.metrics = metrics
        self.tally = tally
        self.dispatcher = dispatcher
        self.topic = topic
        self.replica = replica
        self.services = services
        self.registry = registry
        self.rules: Sequence[Rule] = [t.rule() for t in settings.alert_thresholds]
        self.records = AlertRecords(redis, keys)
        self.queues = ParkedQueues(redis, keys)
        self.slots = Slots(redis, keys)
        self.redis = redis
        self.leading = False
        self.published = 0

    async def round(self) -> float:
        interval = self.settings.alert_interval_ms
        if not await self.records.lead(self.replica, interval * 3):
            if self.leading:
                log.info("alert evaluation moved to another replica")
            self.leading = False
            return interval / 1000
        if not self.leading:
            log.info("this replica evaluates alerts")
        self.leading = True
        await self.evaluate()
        return interval / 1000

    async def evaluate(self) -> list[AlertEvent]:
        """Sample, evaluate, publish and record the changes; the changes."""
        now = now_ms()
        await self._sample(now)
        window = self.settings.alert_window_ms
        until = now // 1000
        names = sorted({*await self.metrics.names("svc"), *self.services()})
        summaries = await self.metrics.summaries("svc", names, until - window // 1000, until)
        if any(rule.metric == "queue_wait" for rule in self.rules):
            for name, wait in (await self._waits(names)).items():
                summary = summaries.get(name) or summarize([], window / 1000)
                summary.fields[QUEUE_WAIT] = wait
                summaries[name] = summary
        active = await self.records.active()
        held: list[AlertEvent] = []
        changes = evaluate(self.rules, summaries, active, now, window, held)
        if held:  # still firing: what they say now, without announcing them again
            await self.records.refresh(held)
        if not changes:
            return changes
        await self.dispatcher.send_now([self._message(change) for change in changes])
        self.published += len(changes)
        await self.records.record(changes, self.settings.alert_history)
        for change in changes:
            level = logging.WARNING if change.state is AlertState.FIRING else logging.INFO
            log.log(level, "alert %s %s: %s", change.alert_id, change.state.value, change.message)
        return changes

    async def _sample(self, now: int) -> None:
        """Add one availability sample and the parked backlog of each service."""
        services = set(self.services())
        if self.registry is not None:  # its view is refreshed by the registry upkeep
            for service, views in self.registry.view.items():
                up = sum(1 for v in views if v.status != HealthStatus.DOWN.value)
                self.tally.add("svc", service, "avail_n", now)
                self.tally.add("svc", service, "avail_up", now, 1 if up else 0)
                self.tally.add("svc", service, "inst_up", now, up)
        for service, parked in (await self.queues.counts(services)).items():
            # A gauge: set even when zero, so a drained backlog reads as zero.
            self.tally.set("svc", service, "parked", now, parked)

    async def _waits(self, services: Sequence[str]) -> dict[str, int]:
        """How long (ms, Redis clock) the oldest entry of each service's queue (zero when
        none waits) and of each workflow's concurrency keys' queues (``keys:<name>``, for
        workflows with runs holding or waiting for a slot) has waited."""
        seconds, micros = await self.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        oldest = await self.queues.oldest(services)
        waits = {s: max(0, now - oldest[s]) if s in oldest else 0 for s in services}
        for key in await self.slots.known():
            name = f"keys:{key.workflow}"
            wait = max(0, now - key.oldest_ms) if key.oldest_ms is not None else 0
            waits[name] = max(waits.get(name, 0), wait)
        return waits

    def _message(self, alert: AlertEvent) -> Message:
        return Message(
            shard=-1,
            id=f"alert:{alert.alert_id}:{alert.state.value}:{alert.ts_ms}",
            topic=self.topic,
            key=alert.alert_id.encode(),
            value=encode(alert),
            headers=headers(alert),
            kind="alert",
        )
