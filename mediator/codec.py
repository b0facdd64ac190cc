"""Encoding of events for Kafka: JSON values, contract headers and the wall clock.

One place decides how an event becomes bytes, so every producer in the project (mediator,
service SDK, client SDK) writes the same shape. ``None`` fields are left out: the models
give them back as defaults, so the value round-trips through ``Model.model_validate_json``
while staying small on the wire.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Sequence

from pydantic import BaseModel

from topics.headers import headers_for

__all__ = ["encode", "headers", "now_ms", "partition_for"]


def encode(event: BaseModel) -> bytes:
    """The JSON bytes of ``event``, without ``None`` fields.

    Same bytes as ``orjson.dumps(event.model_dump(mode="json", exclude_none=True))`` but
    serialised straight to JSON by pydantic-core, about twice as fast (no dict in between).
    ``None`` inside free-form fields (``input``, ``output``, ``payload``) is kept.
    """
    return event.__pydantic_serializer__.to_json(event, exclude_none=True)


def headers(event: BaseModel) -> list[tuple[str, bytes]]:
    """The contract headers of ``event`` (type, schema version, content type, trace id)."""
    event_type = getattr(event, "type", type(event).__name__)
    schema_version = getattr(event, "schema_version", 1)
    return headers_for(str(event_type), int(schema_version), getattr(event, "trace_id", None))


def now_ms() -> int:
    """Milliseconds since the Unix epoch, as every ``*_ms`` field of the contract counts."""
    return time.time_ns() // 1_000_000


def partition_for(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """Partitioner for every producer of the project: CRC32 of the key.

    aiokafka's default hashes keys with a pure-Python murmur2, a measurable share of a
    busy mediator's CPU. Any stable hash keeps a key's messages in order; which partition
    a key maps to is not part of the contract.
    """
    if key is None:
        return random.choice(list(available or all_partitions))
    return all_partitions[zlib.crc32(key) % len(all_partitions)]
