"""The error boundary where records enter the mediator.

Every exception a batch raises is sorted here, so none escapes into FastStream (which,
with manual acknowledgement, would log nothing and fetch on, letting the next batch's
offsets commit over the lost one):

- **transient** (`failures.is_transient`): the batch is rewound and redelivered after a
  capped exponential backoff; what it already committed is recognised as a duplicate on
  the next pass. Logged and counted, and the pause grows, so nothing hot-loops.
- **anything else**: the batch is split in halves until the record that fails is found
  alone; that record is dead-lettered with the error, every other record is processed,
  and the offsets move past all of them. A poison record costs about 2·log2(n) passes,
  never the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mediator.runtime.failures import is_transient
from mediator.settings import BackoffSettings

__all__ = ["Boundary", "isolate"]

log = logging.getLogger("mediator.boundary")

Process = Callable[[Sequence[Any]], Awaitable[None]]
Reject = Callable[[Any, str, str], Awaitable[None]]


async def isolate(
    items: Sequence[Any],
    process: Process,
    poisoned: Callable[[Any, Exception], Awaitable[None]],
) -> None:
    """Process `items`; when that fails for a reason that is not transient, split them in
    halves until the one that fails is alone, hand it to `poisoned` and process the rest.
    A transient failure is raised as it is (the caller retries the whole lot later)."""
    try:
        await process(items)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        if len(items) > 1:
            middle = len(items) // 2
            await isolate(items[:middle], process, poisoned)
            await isolate(items[middle:], process, poisoned)
            return
        await poisoned(items[0], exc)


class Boundary:
    """Runs one subscriber's batches; tells its caller whether to move the offsets on."""

    def __init__(self, name: str, reject: Reject, backoff: BackoffSettings | None = None):
        self.name = name
        self.reject = reject
        self.backoff = backoff or BackoffSettings()
        self.failures = 0  # consecutive transient failures
        self.rewinds = 0
        self.isolated = 0

    async def run(self, records: Sequence[Any], process: Process) -> bool:
        """Process `records`; True when every record ended applied or dead-lettered (move
        the offsets on), False after a transient failure (rewind and redeliver)."""
        try:
            await self._isolate(records, process)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # only transient failures get here
            self.failures += 1
            self.rewinds += 1
            delay = self.backoff.delay_ms(self.failures)
            log.warning(
                "%s: batch of %d will be redelivered in %d ms (failure %d in a row): %s",
                self.name,
                len(records),
                delay,
                self.failures,
                exc,
            )
            await asyncio.sleep(delay / 1000)
            return False
        self.failures = 0
        return True

    async def _isolate(self, records: Sequence[Any], process: Process) -> None:
        await isolate(records, process, self._poisoned)

    async def _poisoned(self, record: Any, exc: Exception) -> None:
        self.isolated += 1
        reason = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: record %s[%d]@%d cannot be processed and is dead-lettered: %s",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            reason,
            exc_info=exc,
        )
        await self.reject(record, reason, "unprocessable")
