"""Subscriber of the replies topic: advance workflows."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from handlers._batch import Offsets, batch_subscription, handle_batch
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.settings import Settings
from topics.events import ReplyEvent

__all__ = ["register"]


def register(broker: KafkaBroker, runtime: Runtime, settings: Settings, offsets: Offsets) -> None:
    """Subscribe `runtime` to the replies topic; offsets are committed after Redis."""

    boundary = Boundary("replies", runtime.reject, settings.backoff)
    runtime.boundaries.append(boundary)

    # `record` declares what the topic carries, for the AsyncAPI document: bodies are
    # left undecoded, so it is always None; the runtime parses the raw records itself.
    async def on_replies(message: KafkaMessage, record: ReplyEvent | None = None) -> None:
        await handle_batch(message, runtime.handle_replies, offsets, boundary)

    broker.subscriber(
        settings.kafka.topics.replies, **batch_subscription(settings.kafka, "replies")
    )(on_replies)
