"""The requests and replies topics: runs started and advanced.

One consumer (group ``<group_id>.inbound``) reads both topics, so the workflows' whole way
into the mediator is one batch loop: a loaded replica handles fewer, larger batches, each
starting runs and advancing others side by side, instead of two loops each paying a
fetch, a Redis round trip and an offset commit per batch."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from mediator.runtime.batches import Runtime
from mediator.runtime.consumers import Subscription
from mediator.runtime.groups import INBOUND, group_name
from mediator.settings import Settings
from topics.events import ReplyEvent, RequestEvent

__all__ = ["describe", "subscription"]


def subscription(settings: Settings, runtime: Runtime) -> Subscription:
    """Requests and replies, to `Runtime.handle_inbound`."""
    topics = settings.kafka.topics
    return Subscription(INBOUND, (topics.requests, topics.replies), runtime.handle_inbound)


def describe(broker: KafkaBroker, settings: Settings) -> None:
    """Declare the subscription for the AsyncAPI document."""
    kafka = settings.kafka

    async def requests_and_replies(event: RequestEvent | ReplyEvent) -> None:
        """Requests start runs (a duplicate request id finds its run); replies advance
        them (matched on command id and attempt; stale ones are ignored)."""

    topics = (kafka.topics.requests, kafka.topics.replies)
    broker.subscriber(*topics, group_id=group_name(kafka, INBOUND))(requests_and_replies)
