"""Signal sources: topics whose records are signals by correlation key (`signals.sources`)."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from mediator.runtime.batches import Runtime
from mediator.runtime.consumers import Subscription
from mediator.runtime.groups import group_name
from mediator.settings import Settings

__all__ = ["NAME", "describe", "subscription"]

NAME = "signals"


def subscription(settings: Settings, runtime: Runtime) -> Subscription:
    """The configured sources' topics, to `Runtime.handle_signals`; off the workflows' path."""
    topics = tuple(source.topic for source in settings.signals.sources)
    return Subscription(NAME, topics, runtime.handle_signals, quiet=True)


def describe(broker: KafkaBroker, settings: Settings) -> None:
    """Declare the subscription for the AsyncAPI document."""
    kafka = settings.kafka
    for source in settings.signals.sources:

        async def records(event: dict[str, object]) -> None:
            """Records that are signals (by correlation key), as configured."""

        broker.subscriber(source.topic, group_id=group_name(kafka, NAME))(records)
