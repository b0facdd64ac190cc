"""The demo order saga's services (inventory, payment, shipping, notification).

They are real services built on the service SDK: each consumes its own topic and replies
through Kafka. `mediator dev` runs them beside the mediator; they also serve as a worked
example of `Worker`.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mediator.worker import ActionError, Worker
from topics.names import Topics

__all__ = ["DEMO_WORKFLOWS", "demo_services", "sample_order"]

DEMO_WORKFLOWS = Path(__file__).with_name("workflows")

#: Orders above this amount are declined by the payment service (a non-retryable error).
CARD_LIMIT = 900


async def _pause(low_ms: float, high_ms: float) -> None:
    await asyncio.sleep(random.uniform(low_ms, high_ms) / 1000)


def demo_services(
    bootstrap_servers: str,
    topics: Topics,
    *,
    enable_idempotence: bool,
    latency: bool = True,
    consumer_options: Mapping[str, Any] | None = None,
) -> list[Worker]:
    """The four demo services, ready to `start()`."""

    def worker(service: str) -> Worker:
        return Worker(
            service,
            bootstrap_servers,
            topics=topics,
            instance=f"{service}-1",
            enable_idempotence=enable_idempotence,
            consumer_options=consumer_options,
        )

    async def work(low_ms: float, high_ms: float) -> None:
        if latency:
            await _pause(low_ms, high_ms)

    inventory, payment, shipping, notification = (
        worker(name) for name in ("inventory", "payment", "shipping", "notification")
    )

    @inventory.action("reserve")
    async def reserve(data: dict[str, Any]) -> dict[str, Any]:
        await work(2, 10)
        if int(data.get("qty") or 0) <= 0:
            msg = f"cannot reserve {data.get('qty')!r} units of {data.get('sku')!r}"
            raise ActionError(msg, code="bad_quantity")
        return {"reservation_id": f"res-{uuid.uuid4().hex[:8]}", "sku": data.get("sku")}

    @inventory.action("release")
    async def release(data: dict[str, Any]) -> dict[str, Any]:
        await work(1, 5)
        return {"released": data.get("reservation")}

    @payment.action("screen")
    async def screen(data: dict[str, Any]) -> dict[str, Any]:
        await work(2, 8)
        return {"risk": "low"}

    @payment.action("charge")
    async def charge(data: dict[str, Any]) -> dict[str, Any]:
        await work(5, 15)
        amount = float(data.get("amount") or 0)
        if amount > CARD_LIMIT:
            msg = f"card declined: {amount:.2f} is over the limit of {CARD_LIMIT}"
            raise ActionError(msg, code="card_declined")
        return {"payment_id": f"pay-{uuid.uuid4().hex[:8]}", "amount": amount}

    @payment.action("refund")
    async def refund(data: dict[str, Any]) -> dict[str, Any]:
        await work(2, 8)
        return {"refunded": data.get("payment")}

    @shipping.action("ship")
    async def ship(data: dict[str, Any]) -> dict[str, Any]:
        await work(5, 20)
        return {"tracking": f"TRK{random.randint(100000, 999999)}"}

    @notification.action("sms")
    async def sms(data: dict[str, Any]) -> dict[str, Any]:
        await work(1, 5)
        return {"sent_to": data.get("phone")}

    @notification.action("email")
    async def email(data: dict[str, Any]) -> dict[str, Any]:
        await work(1, 5)
        return {"sent_to": data.get("email")}

    return [inventory, payment, shipping, notification]


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
