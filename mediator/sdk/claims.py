"""Where the SDKs keep large values (a claim check; the format is `mediator.claims`).

`ClaimStore` is the small interface a store implements: `put` bytes under their key with
a time to live, `get` them back. `RedisClaims` keeps them in Redis (the mediator's, or any),
one string per value (``<prefix>:claim:{<key>}``, its own hash slot on a cluster), for
`ttl_s` (by default the runs' retention, 7 days). An S3-style store implements the same two
methods over a bucket.

`Claims` is what a worker or a client holds: values over `threshold_bytes` are stored and
replaced by a reference (`offload`), references are fetched and replaced by their values
(`resolve`). A reference whose value is gone (expired, another store) is `ClaimMissing`;
a store that cannot answer raises `ClaimUnavailable` (transient).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from mediator.claims import digest, reference, references_in, replaced
from mediator.errors import MediatorError

__all__ = ["ClaimMissing", "ClaimStore", "ClaimUnavailable", "Claims", "RedisClaims"]

#: Values above this (their JSON, in bytes) go by reference unless told otherwise: well
#: under Kafka's default 1 MB record limit, with room for the rest of the record.
DEFAULT_THRESHOLD_BYTES = 256 * 1024
_REDIS_ERRORS = (RedisError, RedisClusterException)


class ClaimMissing(MediatorError):
    """A reference names a value the store does not have (expired, or never stored there)."""


class ClaimUnavailable(MediatorError):
    """The store could not be reached or failed: worth trying again."""


class ClaimStore(Protocol):
    """Keeps values' bytes by key."""

    async def put(self, key: str, data: bytes, ttl_s: int) -> None: ...

    async def get(self, key: str) -> bytes | None: ...


class RedisClaims:
    """A `ClaimStore` in Redis: one string per value, with a TTL."""

    def __init__(self, redis: Redis, prefix: str = "med") -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, key: str) -> str:
        return f"{self.prefix}:claim:{{{key}}}"

    async def put(self, key: str, data: bytes, ttl_s: int) -> None:
        try:
            await self.redis.set(self.key(key), data, ex=ttl_s)
        except _REDIS_ERRORS as exc:
            msg = f"cannot store a value by reference: {exc}"
            raise ClaimUnavailable(msg) from exc

    async def get(self, key: str) -> bytes | None:
        try:
            found = await self.redis.get(self.key(key))
        except _REDIS_ERRORS as exc:
            msg = f"cannot fetch a value stored by reference: {exc}"
            raise ClaimUnavailable(msg) from exc
        if found is None:
            return None
        return found.encode() if isinstance(found, str) else bytes(found)


class Claims:
    """Stores large values and fetches them back, for a worker or a client."""

    def __init__(
        self,
        store: ClaimStore,
        *,
        threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
        ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.store = store
        self.threshold_bytes = threshold_bytes
        self.ttl_s = ttl_s

    async def offload(self, value: Any) -> Any:
        """`value`, or a reference to it once stored when its JSON is over the threshold."""
        data = orjson.dumps(value)
        if len(data) <= self.threshold_bytes:
            return value
        await self.store.put(digest(data), data, self.ttl_s)
        return reference(data)

    async def resolve(self, value: Any) -> Any:
        """`value` with every reference in it replaced by the value stored for it."""
        keys = references_in(value)
        if not keys:
            return value
        values: dict[str, Any] = {}
        for key in dict.fromkeys(keys):
            data = await self.store.get(key)
            if data is None:
                msg = f"no value stored by reference under {key} (expired, or another store)"
                raise ClaimMissing(msg)
            if digest(data) != key:
                msg = f"the value stored under {key} does not match its key"
                raise ClaimMissing(msg)
            values[key] = orjson.loads(data)
        return replaced(value, values)
