"""One batch of requests and replies: both parts run side by side, and a failure of one
never leaves the other running behind the rewind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from mediator.errors import StateUnavailable
from mediator.runtime.batches import Runtime
from topics.names import Topics

TOPICS = Topics(prefix="t.", service_prefix="t.svc.")


@dataclass
class Rec:
    topic: str
    offset: int


@dataclass
class Parts:
    """Stands in for the runtime's two halves; records what each was handed."""

    topics: Topics = TOPICS
    requests_error: Exception | None = None
    replies_error: Exception | None = None
    handled: dict[str, list[int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)

    async def _part(self, name: str, records: Sequence[Any], error: Exception | None) -> None:
        self.handled[name] = [r.offset for r in records]
        await asyncio.sleep(0.01 if name == "requests" else 0.02)
        self.finished.append(name)
        if error is not None:
            raise error

    async def handle_requests(self, records: Sequence[Any]) -> None:
        await self._part("requests", records, self.requests_error)

    async def handle_replies(self, records: Sequence[Any]) -> None:
        await self._part("replies", records, self.replies_error)


MIXED = [Rec(TOPICS.replies, 0), Rec(TOPICS.requests, 1), Rec(TOPICS.replies, 2)]


async def test_each_part_gets_its_own_records() -> None:
    parts = Parts()
    await Runtime.handle_inbound(parts, MIXED)  # type: ignore[arg-type]
    assert parts.handled == {"requests": [1], "replies": [0, 2]}
    only = Parts()
    await Runtime.handle_inbound(only, [Rec(TOPICS.replies, 5)])  # type: ignore[arg-type]
    assert only.handled == {"replies": [5]}


async def test_a_failing_part_lets_the_other_finish_and_a_transient_failure_wins() -> None:
    parts = Parts(
        requests_error=ValueError("a bug in one record"),
        replies_error=StateUnavailable("Redis unavailable while committing"),
    )
    with pytest.raises(StateUnavailable):
        await Runtime.handle_inbound(parts, MIXED)  # type: ignore[arg-type]
    assert sorted(parts.finished) == ["replies", "requests"]


async def test_a_permanent_failure_alone_is_raised_for_the_boundary_to_isolate() -> None:
    parts = Parts(replies_error=ValueError("a bug in one record"))
    with pytest.raises(ValueError, match="a bug"):
        await Runtime.handle_inbound(parts, MIXED)  # type: ignore[arg-type]
    assert sorted(parts.finished) == ["replies", "requests"]
    transient = Parts(requests_error=RedisConnectionError("gone"))
    with pytest.raises(RedisConnectionError):
        await Runtime.handle_inbound(transient, MIXED)  # type: ignore[arg-type]
