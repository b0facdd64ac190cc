"""What the mediator reads from Kafka and what it publishes there, declared once.

`subscriptions` names each consumer of a replica (the requests and replies together, the
operators' controls, the services' heartbeats) and the runtime method its batches go to;
the replica's consumer loops (`mediator.runtime.consumers`) read them. `document` declares
the same subscriptions and every topic the mediator publishes to on a FastStream broker
that is never started, for the AsyncAPI document (``faststream docs gen``).
"""

from __future__ import annotations

from collections.abc import Iterable

from faststream.kafka import KafkaBroker

from handlers import control, health, inbound, outbound, signals
from mediator.kafka import broker_options
from mediator.runtime.batches import Runtime
from mediator.runtime.consumers import Subscription
from mediator.settings import Settings

__all__ = ["document", "subscriptions"]


def subscriptions(settings: Settings, runtime: Runtime) -> list[Subscription]:
    """Every subscription of a replica with `settings` (health only with discovery on)."""
    found = [inbound.subscription(settings, runtime), control.subscription(settings, runtime)]
    if settings.discovery.enabled:
        found.append(health.subscription(settings, runtime))
    if settings.signals.sources:
        found.append(signals.subscription(settings, runtime))
    return found


def document(settings: Settings, services: Iterable[str]) -> KafkaBroker:
    """A FastStream broker declaring every channel the mediator reads and writes (for the
    AsyncAPI document only: it is never started)."""
    kafka = settings.kafka
    broker = KafkaBroker(**broker_options(kafka), client_id=kafka.client_id, logger=None)
    inbound.describe(broker, settings)
    control.describe(broker, settings)
    if settings.discovery.enabled:
        health.describe(broker, settings)
    if settings.signals.sources:
        signals.describe(broker, settings)
    outbound.declare(broker, kafka.topics, services)
    return broker
