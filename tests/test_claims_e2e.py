"""Large values by reference (a claim check), on the real broker and Redis: a step's output
of several megabytes (over Kafka's 1 MB record limit) is stored by the service's SDK and
travels as a reference, the next step gets it whole, the client gets it in the result; a
large payload goes the same way; an expression reaching into a referenced value fails the
run with a clear error; a reference whose value is gone fails its step, not the worker."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from mediator.claims import is_reference
from mediator.sdk.claims import Claims, RedisClaims
from topics import WorkflowStatus

REPORT = {
    "name": "report",
    "steps": [
        {"id": "make", "service": "reports", "action": "make", "input": "payload"},
        {"id": "count", "service": "reports", "action": "count", "depends_on": ["make"],
         "input": "steps.make"},
    ],
}  # fmt: skip
PEEK = {
    "name": "peek",
    "steps": [
        {"id": "make", "service": "reports", "action": "make", "input": "payload"},
        {"id": "count", "service": "reports", "action": "count", "depends_on": ["make"],
         "input": {"pages": "steps.make.pages"}},
    ],
}  # fmt: skip
ECHO = {
    "name": "sizes",
    "steps": [{"id": "size", "service": "reports", "action": "size", "input": "payload"}],
}


def big(pages: int) -> dict[str, Any]:
    """About `pages` KB of JSON."""
    return {"pages": [f"page {n}: " + "x" * 1000 for n in range(pages)]}


@pytest.mark.slow
async def test_values_over_the_record_limit_travel_by_reference(
    make_system: Any, redis_client: Redis, key_prefix: str
) -> None:
    claims = Claims(RedisClaims(redis_client, key_prefix), threshold_bytes=64 * 1024)
    system = await make_system(REPORT, PEEK, ECHO)

    async def make(data: dict[str, Any]) -> dict[str, Any]:
        return big(data["pages"])

    async def count(data: dict[str, Any]) -> dict[str, Any]:
        return {"pages": len(data["pages"]), "last": data["pages"][-1][:9]}

    async def size(data: dict[str, Any]) -> dict[str, Any]:
        return {"items": len(data["items"])}

    await system.worker("reports", {"make": make, "count": count, "size": size}, claims=claims)
    mediator = await system.mediator()
    client = await system.client()
    client.claims = claims

    # 3,000 pages: about 3 MB, three times what one Kafka record may hold.
    result = await client.submit("report", {"pages": 3000}, request_id="big", timeout=60)
    assert result.status is WorkflowStatus.COMPLETED, result.error
    assert result.output["count"] == {"pages": 3000, "last": "page 2999"}
    assert result.output["make"] == big(3000)  # resolved for the client
    state = await mediator.store.load(result.workflow_id or "")
    assert state is not None and is_reference(state.steps["make"].output)  # kept small

    # A small output is not stored: it travels as it is.
    small = await client.submit("report", {"pages": 3}, request_id="small", timeout=30)
    assert small.output["count"]["pages"] == 3
    state = await mediator.store.load(small.workflow_id or "")
    assert state is not None and not is_reference(state.steps["make"].output)

    # A 2 MB payload goes by reference too, and its step gets it whole.
    items = {"items": ["y" * 1000 for _ in range(2000)]}
    sized = await client.submit("sizes", items, request_id="payload", timeout=30)
    assert sized.output["size"] == {"items": 2000}

    # Reaching into a referenced value is an error the run reports.
    peek = await client.submit("peek", {"pages": 3000}, request_id="peek", timeout=30)
    assert peek.status is WorkflowStatus.FAILED
    assert peek.error is not None and "steps.make is stored by reference" in peek.error.message


SPLIT = {
    "name": "split",
    "steps": [
        {"id": "make", "service": "maker", "action": "make", "input": "payload"},
        {"id": "count", "service": "counter", "action": "count", "depends_on": ["make"],
         "input": "steps.make"},
    ],
}  # fmt: skip


@pytest.mark.slow
async def test_a_reference_whose_value_is_not_there_fails_its_step(
    make_system: Any, redis_client: Redis, key_prefix: str
) -> None:
    """The next step's service reads another store (or the value expired): its step fails
    with `claim_missing`, not retried, and the worker goes on."""
    system = await make_system(SPLIT)
    mine = Claims(RedisClaims(redis_client, f"{key_prefix}-a"), threshold_bytes=1024)
    other = Claims(RedisClaims(redis_client, f"{key_prefix}-b"), threshold_bytes=1024)
    counted: list[int] = []

    async def make(data: dict[str, Any]) -> dict[str, Any]:
        return big(data["pages"])

    async def count(data: dict[str, Any]) -> dict[str, Any]:
        counted.append(len(data["pages"]))
        return {}

    await system.worker("maker", {"make": make}, claims=mine)
    await system.worker("counter", {"count": count}, claims=other)
    await system.mediator()
    client = await system.client()
    result = await client.submit("split", {"pages": 10}, request_id="gone", timeout=30)
    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "claim_missing", result.error
    assert "no value stored by reference" in result.error.message
    assert counted == []  # the handler never ran on a reference it could not resolve
