"""Subscriber of the requests topic: start workflows."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.middlewares import AckPolicy

from handlers._batch import Offsets, handle_batch, undecoded
from mediator.runtime import Runtime
from mediator.settings import Settings

__all__ = ["register"]


def register(broker: KafkaBroker, runtime: Runtime, settings: Settings, offsets: Offsets) -> None:
    """Subscribe `runtime` to the requests topic; offsets are committed after Redis."""

    @broker.subscriber(
        settings.kafka.topics.requests,
        group_id=f"{settings.kafka.group_id}.requests",
        batch=True,
        max_records=settings.kafka.max_batch_records,
        batch_timeout_ms=settings.kafka.poll_timeout_ms,
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        session_timeout_ms=settings.kafka.session_timeout_ms,
        heartbeat_interval_ms=settings.kafka.heartbeat_interval_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.MANUAL,
        decoder=undecoded,
    )
    async def on_requests(message: KafkaMessage) -> None:
        await handle_batch(message, runtime.handle_requests, offsets)
