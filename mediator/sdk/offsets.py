"""Which consumed offsets a worker may commit while commands finish out of order.

A worker runs many commands of one partition at once, and they finish in any order. An
offset may be committed only once it and every offset before it on its partition are done,
or a restart would skip a command that never got its reply. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["OffsetTracker"]

P = TypeVar("P")


class OffsetTracker(Generic[P]):
    """Offsets handed out per partition, in order, and which of them are done."""

    def __init__(self) -> None:
        self._pending: dict[P, deque[int]] = {}
        self._done: dict[P, set[int]] = {}
        self._outstanding = 0

    def __len__(self) -> int:
        """How many tracked offsets are not done yet."""
        return self._outstanding

    def add(self, partition: P, offset: int) -> None:
        """An offset fetched and now being worked on (offsets arrive in order per partition)."""
        self._pending.setdefault(partition, deque()).append(offset)
        self._done.setdefault(partition, set())
        self._outstanding += 1

    def done(self, partition: P, offset: int) -> None:
        """Work on ``offset`` finished; ignored if its partition was dropped meanwhile."""
        done = self._done.get(partition)
        if done is None or offset in done:
            return
        pending = self._pending[partition]
        if not pending or not pending[0] <= offset <= pending[-1]:
            return
        done.add(offset)
        self._outstanding -= 1

    def committable(self, partitions: Iterable[P] | None = None) -> dict[P, int]:
        """For each partition whose done prefix grew, the next offset to commit (last + 1);
        the prefix is forgotten, so each offset is reported once."""
        chosen = self._pending.keys() if partitions is None else partitions
        ready: dict[P, int] = {}
        for partition in list(chosen):
            pending = self._pending.get(partition)
            if not pending:
                continue
            done = self._done[partition]
            last = None
            while pending and pending[0] in done:
                last = pending.popleft()
                done.discard(last)
            if last is not None:
                ready[partition] = last + 1
        return ready

    def drop(self, partitions: Iterable[P]) -> None:
        """Forget partitions this worker no longer owns (their work will be redone elsewhere)."""
        for partition in partitions:
            pending = self._pending.pop(partition, deque())
            done = self._done.pop(partition, set())
            self._outstanding -= len(pending) - len(done)
