"""Subscriber of the requests and replies topics: start and advance workflows.

One consumer (group ``<group_id>.inbound``, see `handlers.groups`) reads both topics, so the
workflows' whole way into the mediator is one batch loop: a loaded replica handles fewer,
larger batches, each starting runs and advancing others side by side, instead of two
loops each paying a fetch, a Redis round trip and an offset commit per batch."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from handlers._batch import Offsets, handle_batch, subscribe
from handlers.groups import INBOUND
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.settings import Settings
from topics.events import ReplyEvent, RequestEvent

__all__ = ["register"]


def register(broker: KafkaBroker, runtime: Runtime, settings: Settings, offsets: Offsets) -> None:
    """Subscribe `runtime` to the requests and replies topics; offsets are committed
    after Redis."""

    boundary = Boundary(INBOUND, runtime.reject, settings.backoff)
    runtime.boundaries.append(boundary)

    # `record` declares what the topics carry, for the AsyncAPI document: bodies are
    # left undecoded, so it is always None; the runtime parses the raw records itself.
    # The batch is taken from FastStream's context (see `handle_batch`).
    async def on_inbound(record: RequestEvent | ReplyEvent | None = None) -> None:
        await handle_batch(broker.context, runtime.handle_inbound, offsets, boundary)

    topics = settings.kafka.topics
    subscribe(broker, [topics.requests, topics.replies], settings.kafka, INBOUND, on_inbound)
