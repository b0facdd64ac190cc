"""Redis's errors, mapped once to the mediator's.

Every Redis call of the mediator, in the store or outside it (breakers, registry, parked
queues, leases, metrics), sorts its failures the same way: any `RedisError` (the server
unreachable or timing out, a failover in progress, a replica that is read-only, a server
out of memory or refusing writes after a failed save, a script that is busy), and on a
Redis Cluster its client's own errors (a slot no primary serves during a failover, a
layout it could not learn), becomes `StateUnavailable`, which every boundary treats as
transient: what waited is retried with capped backoff, never dead-lettered for it. A
state that cannot be decoded is `CorruptState`, raised where it is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import RedisClusterException, RedisError

from mediator.errors import StateUnavailable

__all__ = ["REDIS_ERRORS", "redis_errors"]

#: What a Redis call raises when Redis (or a cluster's layout) fails it.
REDIS_ERRORS = (RedisError, RedisClusterException)


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise `StateUnavailable` (transient), saying what was being done, for any
    `RedisError` raised in the block."""
    try:
        yield
    except REDIS_ERRORS as exc:
        msg = f"Redis unavailable while {what}: {exc}"
        raise StateUnavailable(msg) from exc
