"""The health topic: services' heartbeats into the registry, and the markers that say
how far the topic has been read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import Field, TypeAdapter

from mediator.runtime.context import (
    BatchOutput,
    Record,
)
from mediator.runtime.controls import Controls
from topics.events import (
    HealthEvent,
    MarkEvent,
)

__all__ = ["Health"]


#: What the health topic carries: services' heartbeats and the mediator's markers.
HEALTH_TOPIC: TypeAdapter[HealthEvent | MarkEvent] = TypeAdapter(
    Annotated[HealthEvent | MarkEvent, Field(discriminator="type")]
)


class Health(Controls):
    """Records heartbeats and how far the health topic was read."""

    async def handle_health(self, records: Sequence[Record]) -> None:
        """Record services' heartbeats in the registry, and how far each partition of the
        health topic has been read (its markers: `mediator.runtime.liveness`); a record
        that does not validate is dead-lettered with its reason."""
        out = BatchOutput()
        beats: list[HealthEvent] = []
        marks: dict[int, int] = {}
        read: dict[int, tuple[int, int]] = {}
        for record in records:
            first, last = read.get(record.partition, (record.offset, record.offset))
            read[record.partition] = (min(first, record.offset), max(last, record.offset))
            signed, signer = self._signer(record, out)
            if not signed:
                continue
            event: HealthEvent | MarkEvent | None = self._decode(record, HEALTH_TOPIC, out)
            if event is None:
                continue
            if isinstance(event, MarkEvent):
                marks[record.partition] = max(marks.get(record.partition, 0), event.t_ms)
                continue
            if (reason := self._not_from(event.service, signer)) is not None:
                self._forged(record, f"heartbeat of {reason}", out)
                continue
            beats.append(event)
        if records and self.registry is not None:
            stale = self.registry.stale
            changes = await self.registry.apply(beats, marks, read)
            self.stats.stale_heartbeats += self.registry.stale - stale
            self.stats.heartbeats += len(beats)
            out.counts["heartbeats"] += len(beats)
            for change in changes:
                out.counts[f"instance:{change.service}:{change.what.replace(' ', '_')}"] += 1
        await self._flush(out)
