"""The health topic: services' heartbeats, recorded in the registry."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from mediator.runtime.batches import Runtime
from mediator.runtime.consumers import Subscription
from mediator.runtime.groups import group_name
from mediator.settings import Settings
from topics.events import HealthEvent

__all__ = ["NAME", "describe", "subscription"]

NAME = "health"


def subscription(settings: Settings, runtime: Runtime) -> Subscription:
    """Heartbeats (and the markers that make silence evidence), to
    `Runtime.handle_health`; off the workflows' path."""
    return Subscription(NAME, (settings.kafka.topics.health,), runtime.handle_health, quiet=True)


def describe(broker: KafkaBroker, settings: Settings) -> None:
    """Declare the subscription for the AsyncAPI document."""
    kafka = settings.kafka

    async def heartbeats(event: HealthEvent) -> None:
        """Services' heartbeats: status, load, capacity, the partitions each owns."""

    broker.subscriber(kafka.topics.health, group_id=group_name(kafka, NAME))(heartbeats)
