"""The demo order saga's services (inventory, payment, shipping, notification).

They are real services built on the service SDK: each consumes its own topic and replies
through Kafka. `mediator dev` runs them beside the mediator; they also serve as a worked
example of `Worker`. Shipping can be made flaky (`Flakiness`), as `mediator dev` does, so
that retries, its circuit breaker and compensations can be watched at work.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from mediator.cli.flaky import Flakiness, Flaky
from mediator.kafka import KafkaConnection
from mediator.sdk.worker import ActionError, Worker
from mediator.settings import SigningSettings
from topics.names import Topics

__all__ = ["APPROVAL_LIMIT", "DEMO_WORKFLOWS", "FLAKY_SERVICE", "demo_services", "sample_order"]

DEMO_WORKFLOWS = Path(__file__).parent.parent / "workflows"

#: The service made flaky when `demo_services` is given a `Flakiness`.
FLAKY_SERVICE = "shipping"

#: Orders above this amount are declined by the payment service (a non-retryable error).
CARD_LIMIT = 900

#: Orders above this amount wait for a reviewer's approval (the `approve` step).
APPROVAL_LIMIT = 800


def demo_services(
    bootstrap_servers: str | KafkaConnection,
    topics: Topics,
    *,
    enable_idempotence: bool,
    latency: bool = True,
    consumer_options: Mapping[str, Any] | None = None,
    signing: SigningSettings,
    flakiness: Flakiness | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> list[Worker]:
    """The four demo services, ready to `start()`, signing with their keys from
    `signing`; with ``flakiness``, shipping misbehaves (``on_phase`` hears when its outages
    start and end)."""
    workers = []
    for service, actions in _ACTIONS.items():
        worker = Worker(
            service,
            bootstrap_servers,
            topics=topics,
            instance=f"{service}-1",
            enable_idempotence=enable_idempotence,
            consumer_options=consumer_options,
            keys=signing.for_service(service) if signing.enabled else None,
            signing=signing.enabled,
            legacy_signatures=signing.legacy_signatures,
        )
        for name, (handler, low_ms, high_ms) in actions.items():
            action = _with_latency(handler, low_ms, high_ms) if latency else handler
            if flakiness is not None and service == FLAKY_SERVICE:
                action = Flaky(service, action, flakiness, on_phase=on_phase)
            worker.add_action(name, action)
        workers.append(worker)
    return workers


Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _with_latency(handler: Action, low_ms: float, high_ms: float) -> Action:
    async def slow(data: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(random.uniform(low_ms, high_ms) / 1000)
        return await handler(data)

    return slow


async def _reserve(data: dict[str, Any]) -> dict[str, Any]:
    if int(data.get("qty") or 0) <= 0:
        msg = f"cannot reserve {data.get('qty')!r} units of {data.get('sku')!r}"
        raise ActionError(msg, code="bad_quantity")
    return {"reservation_id": f"res-{uuid.uuid4().hex[:8]}", "sku": data.get("sku")}


async def _release(data: dict[str, Any]) -> dict[str, Any]:
    return {"released": data.get("reservation")}


async def _screen(data: dict[str, Any]) -> dict[str, Any]:
    return {"risk": "low"}


async def _charge(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("approved") is False:  # a reviewer said no (none is asked for small orders)
        msg = f"order rejected by {data.get('reviewer') or 'a reviewer'}"
        raise ActionError(msg, code="rejected")
    amount = float(data.get("amount") or 0)
    if amount > CARD_LIMIT:
        msg = f"card declined: {amount:.2f} is over the limit of {CARD_LIMIT}"
        raise ActionError(msg, code="card_declined")
    return {"payment_id": f"pay-{uuid.uuid4().hex[:8]}", "amount": amount}


async def _count(data: dict[str, Any]) -> dict[str, Any]:
    return {"skus": 4, "units": random.randint(100, 200), "at": data.get("at")}


async def _refund(data: dict[str, Any]) -> dict[str, Any]:
    return {"refunded": data.get("payment")}


async def _ship(data: dict[str, Any]) -> dict[str, Any]:
    return {"tracking": f"TRK{random.randint(100000, 999999)}"}


async def _notify(data: dict[str, Any]) -> dict[str, Any]:
    return {"sent_to": data.get("phone") or data.get("email")}


#: service -> action -> (handler, min latency ms, max latency ms)
_ACTIONS: dict[str, dict[str, tuple[Action, float, float]]] = {
    "inventory": {
        "reserve": (_reserve, 2, 10),
        "release": (_release, 1, 5),
        "count": (_count, 5, 20),
    },
    "payment": {
        "screen": (_screen, 2, 8),
        "charge": (_charge, 5, 15),
        "refund": (_refund, 2, 8),
    },
    "shipping": {"ship": (_ship, 5, 20)},
    "notification": {"sms": (_notify, 1, 5), "email": (_notify, 1, 5)},
}


def sample_order(n: int, rng: random.Random | None = None) -> dict[str, Any]:
    """A plausible order; about one in ten is over the card limit and will fail."""
    rng = rng or random.Random(n)
    order: dict[str, Any] = {
        "sku": rng.choice(["BOOK-1", "LAMP-7", "MUG-3", "DESK-2"]),
        "qty": rng.randint(1, 3),
        "card": f"4111-{rng.randint(1000, 9999)}",
        "amount": round(rng.uniform(10, 1000), 2),
        "address": f"{rng.randint(1, 200)} Harbour Road",
        "email": f"customer{n}@example.com",
    }
    if rng.random() < 0.5:
        order["phone"] = f"+44 7700 900{rng.randint(100, 999)}"
    return order
