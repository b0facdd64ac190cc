"""A worker's heartbeats: what the instance says about itself on the health topic, every
`heartbeat_interval` and when its partitions change."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.errors import KafkaError

from mediator import clock, codec
from mediator.sdk.actions import Actions
from topics.events import (
    HealthEvent,
    HealthStatus,
)

__all__ = ["Heartbeats"]

log = logging.getLogger("mediator.worker")


class Heartbeats(Actions):
    """Builds and publishes heartbeats."""

    @property
    def in_flight(self) -> int:
        """Commands whose actions are running now."""
        return len(self._running)

    def health(self, status: HealthStatus | None = None) -> HealthEvent:
        """This instance's heartbeat now (taking the figures since the previous one)."""
        answered, errors, latency = self._tally.take()
        inbox = self.topics.service(self.service)
        owned = self._consumer.assignment() if self._consumer is not None else set()
        return HealthEvent(
            service=self.service,
            instance=self.instance,
            status=status or self.status,
            load=self.in_flight,
            capacity=self._capacity,
            partitions=sorted(tp.partition for tp in owned if tp.topic == inbox),
            weight=self.weight,
            interval_ms=round((self.heartbeat_interval or 1.0) * 1000),
            answered=answered,
            errors=errors,
            latency_ms=latency,
            version=self.version,
            ts_ms=clock.now_ms(),
            boot=self.boot,
            seq=next(self._seq),
        )

    async def _heartbeats(self) -> None:
        assert self.heartbeat_interval
        while True:
            await self._beat()
            await asyncio.sleep(self.heartbeat_interval)

    def _beat_soon(self) -> None:
        """Heartbeat now, out of turn (the partitions it owns changed)."""
        if self._beats is not None and self._producer is not None:
            task = asyncio.create_task(self._beat(), name=f"heartbeat-now:{self.service}")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _beat(self, status: HealthStatus | None = None) -> None:
        """Publish one heartbeat; a failure is logged and the next one tries again."""
        if self._producer is None:
            return
        beat = self.health(status)
        value = codec.encode(beat)
        try:
            await self._producer.send_and_wait(
                self.topics.health,
                value,
                key=self.instance.encode(),
                headers=self._signed(
                    codec.headers(beat), value, self.topics.health, self.instance.encode()
                ),
            )
        except KafkaError as exc:
            self.stats["heartbeats_failed"] += 1
            log.warning("heartbeat of %s not delivered: %r", self.instance, exc)
        else:
            self.stats["heartbeats"] += 1
