"""Large values by reference (a claim check): the wire format of a reference, pure.

A value too large to travel in a Kafka record (a step's output, a request's payload) is
stored out of band and replaced by a reference, one JSON object::

    {"$claim": {"key": "<sha256 of the bytes, hex>", "size": <bytes>, "encoding": "json"}}

The stored bytes are the value's JSON (UTF-8). The key is the SHA-256 of those bytes, so a
value stored twice (a retried handler, a replayed command) is one entry, and a reader can
check what it fetched. The mediator never opens a reference: it keeps it in the run's state
and passes it on whole (as a later step's input, in the result); the SDKs resolve it where
it is used (`mediator.sdk.claims`). An expression reaching into a referenced value
(``steps.report.pages``) fails with a clear error: take the value whole instead.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["CLAIM", "digest", "is_reference", "reference", "references_in", "replaced"]

#: The one key of a reference object.
CLAIM = "$claim"


def digest(data: bytes) -> str:
    """The key a value's bytes are stored under."""
    return hashlib.sha256(data).hexdigest()


def reference(data: bytes) -> dict[str, Any]:
    """The reference to `data` (a value's JSON bytes)."""
    return {CLAIM: {"key": digest(data), "size": len(data), "encoding": "json"}}


def is_reference(value: Any) -> bool:
    """Whether `value` is a reference object."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(ref := value.get(CLAIM), dict)
        and isinstance(ref.get("key"), str)
    )


def references_in(value: Any) -> list[str]:
    """The keys of every reference inside `value` (walking objects and arrays)."""
    found: list[str] = []
    _walk(value, found)
    return found


def _walk(value: Any, found: list[str]) -> None:
    if isinstance(value, dict):
        if is_reference(value):
            found.append(value[CLAIM]["key"])
            return
        for item in value.values():
            _walk(item, found)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found)


def replaced(value: Any, values: dict[str, Any]) -> Any:
    """`value` with each reference replaced by the value its key has in `values`."""
    if isinstance(value, dict):
        if is_reference(value):
            return values[value[CLAIM]["key"]]
        return {k: replaced(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [replaced(item, values) for item in value]
    return value
