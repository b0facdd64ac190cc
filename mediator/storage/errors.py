"""Redis's errors, mapped once to the mediator's.

Every Redis call of the mediator, in the store or outside it (breakers, registry, parked
queues, leases, metrics), sorts its failures the same way: any `RedisError` (the server
unreachable or timing out, a failover in progress, a replica that is read-only, a server
out of memory or refusing writes after a failed save, a script that is busy) becomes
`StateUnavailable`, which every boundary treats as transient: what waited is retried with
capped backoff, never dead-lettered for it. A state that cannot be decoded is
`CorruptState`, raised where it is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import RedisError

from mediator.errors import StateUnavailable

__all__ = ["redis_errors"]


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise `StateUnavailable` (transient), saying what was being done, for any
    `RedisError` raised in the block."""
    try:
        yield
    except RedisError as exc:
        msg = f"Redis unavailable while {what}: {exc}"
        raise StateUnavailable(msg) from exc
