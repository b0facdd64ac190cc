"""Subscriber of the requests topic: start workflows."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from handlers._batch import Offsets, handle_batch, subscribe
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.settings import Settings
from topics.events import RequestEvent

__all__ = ["register"]


def register(broker: KafkaBroker, runtime: Runtime, settings: Settings, offsets: Offsets) -> None:
    """Subscribe `runtime` to the requests topic; offsets are committed after Redis."""

    boundary = Boundary("requests", runtime.reject, settings.backoff)
    runtime.boundaries.append(boundary)

    # `record` declares what the topic carries, for the AsyncAPI document: bodies are
    # left undecoded, so it is always None; the runtime parses the raw records itself.
    # The batch is taken from FastStream's context (see `handle_batch`).
    async def on_requests(record: RequestEvent | None = None) -> None:
        await handle_batch(broker.context, runtime.handle_requests, offsets, boundary)

    subscribe(broker, settings.kafka.topics.requests, settings.kafka, "requests", on_requests)
