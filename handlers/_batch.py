"""What every batch handler does around the runtime: ack after commit, nack on outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from faststream.kafka.message import KafkaMessage

from mediator.errors import StateUnavailable

__all__ = ["handle_batch", "undecoded"]

log = logging.getLogger("mediator.handlers")

#: Pause before redelivering a batch whose processing hit an outage, so nothing hot-loops.
OUTAGE_PAUSE_S = 1.0


async def undecoded(message: Any) -> None:
    """FastStream decoder that decodes nothing: the runtime parses the raw records itself,
    once, straight into the event models."""
    return None


async def handle_batch(
    message: KafkaMessage, process: Callable[[Sequence[Any]], Awaitable[None]]
) -> None:
    """Run `process` on the batch's records; commit offsets only if it succeeded.

    On a Redis or Kafka outage the batch is rewound (nack) and redelivered after a pause:
    transitions already committed are recognised as duplicates on the second pass.
    """
    raw = message.raw_message
    records = raw if isinstance(raw, tuple) else (raw,)
    try:
        await process(records)
    except (StateUnavailable, KafkaError) as exc:
        log.warning(
            "batch of %d from %s will be redelivered: %s", len(records), records[0].topic, exc
        )
        await asyncio.sleep(OUTAGE_PAUSE_S)
        await message.nack()
        return
    await message.ack()
