"""What the mediator publishes, declared to FastStream for the AsyncAPI document
(``faststream docs gen``). The mediator sends through its outbox, not through these
publishers; they describe the channels and payloads so the document is complete."""

from __future__ import annotations

from collections.abc import Iterable

from faststream.kafka import KafkaBroker

from topics.events import AlertEvent, CommandEvent, DeadLetter, ResultEvent
from topics.names import Topics

__all__ = ["declare"]


def declare(broker: KafkaBroker, topics: Topics, services: Iterable[str]) -> None:
    """Declare the command topic of each of `services`, results, dead letters and alerts."""
    for service in sorted(set(services)):
        broker.publisher(
            topics.service(service),
            title=f"{topics.service(service)}:Command",
            description=f"Commands to service {service!r}; it answers each with a "
            f"ReplyEvent on the command's reply_to ({topics.replies}).",
            schema=CommandEvent,
        )
    broker.publisher(
        topics.results,
        title=f"{topics.results}:Result",
        description="The result of each run (or of a request refused), keyed by request_id; "
        "a request's reply_to may name another topic.",
        schema=ResultEvent,
    )
    broker.publisher(
        topics.dlq,
        title=f"{topics.dlq}:DeadLetter",
        description="Records the mediator could not use, with the reason; replayable.",
        schema=DeadLetter,
    )
    broker.publisher(
        topics.alerts,
        title=f"{topics.alerts}:Alert",
        description="Alerts on service metrics: firing once, resolved once.",
        schema=AlertEvent,
    )
