"""The control topic: operators' cancel, retry, breaker reset and drain."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from mediator.runtime.batches import Runtime
from mediator.runtime.consumers import Subscription
from mediator.runtime.groups import group_name
from mediator.settings import Settings
from topics.events import ControlEvent

__all__ = ["NAME", "describe", "subscription"]

NAME = "control"


def subscription(settings: Settings, runtime: Runtime) -> Subscription:
    """Controls, to `Runtime.handle_controls`; off the workflows' path."""
    return Subscription(NAME, (settings.kafka.topics.control,), runtime.handle_controls, quiet=True)


def describe(broker: KafkaBroker, settings: Settings) -> None:
    """Declare the subscription for the AsyncAPI document."""
    kafka = settings.kafka

    async def controls(event: ControlEvent) -> None:
        """Operators' controls, signed by an operator allowed to send them."""

    broker.subscriber(kafka.topics.control, group_id=group_name(kafka, NAME))(controls)
