"""What the outbox holds and the producer sends: a `Message`, and how one is stored in
Redis (`frame`, `unframe`). No I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["EVENTS", "Message", "frame", "unframe"]

#: The kind of a message that stands for several records (see `Message`).
EVENTS = "events"


@dataclass(slots=True)
class Message:
    """One Kafka message; stored in the outbox of `shard` under `id` (shard -1: not stored).

    `lease` is the outbox lease deadline this replica was given when it committed or
    claimed the message (Redis clock, ms): its fencing token. `kind` is "command",
    "result", "reply", "dead_letter" or "events". `partition`, when set, is the partition
    of `topic` it goes to (a command routed to the instance that owns it); otherwise the
    key chooses.

    A message of kind "events" is one outbox entry for several records of one topic and
    key with the same headers (a commit's transition events): `value` holds their values
    one per line (compact JSON has no raw newline), and it is published as that many
    records, in order (`records`).
    """

    shard: int
    id: str
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    kind: str = "result"
    lease: int = 0
    partition: int | None = None

    @property
    def records(self) -> list[bytes]:
        """The values of the Kafka records it is published as."""
        return self.value.split(b"\n") if self.kind == EVENTS else [self.value]

    @property
    def frame(self) -> bytes:
        """How it is stored in Redis."""
        return frame(self.topic, self.key, self.value, self.headers, self.kind, self.partition)

    @property
    def size(self) -> int:
        """Bytes of key, value and headers: what a broker's size limit is measured on
        (less the few dozen bytes of record framing); of "events", its largest record's."""
        key = len(self.key) if self.key is not None else 0
        value = max(map(len, self.records)) if self.kind == EVENTS else len(self.value)
        return key + value + sum(len(k) + len(v) for k, v in self.headers)


def frame(
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, bytes]],
    kind: str = "result",
    partition: int | None = None,
) -> bytes:
    """One line of JSON (topic, key, headers, kind[, partition]) followed by the raw value."""
    plain_key = key.decode() if key is not None else None
    head: list[Any] = [topic, plain_key, [[k, v.decode()] for k, v in headers], kind]
    if partition is not None:
        head.append(partition)
    return orjson.dumps(head) + b"\n" + value


def unframe(shard: int, message_id: str, data: bytes) -> Message:
    """The `Message` stored as `data`."""
    head, _, value = data.partition(b"\n")
    topic, key, headers, *rest = orjson.loads(head)
    return Message(
        shard=shard,
        id=message_id,
        topic=topic,
        key=key.encode() if key is not None else None,
        value=value,
        headers=[(k, v.encode()) for k, v in headers],
        kind=rest[0] if rest else "result",
        partition=rest[1] if len(rest) > 1 else None,
    )
