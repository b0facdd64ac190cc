"""Durable timers end to end on the real broker and Redis: step timeouts, replay with
backoff, non-retryable errors and the workflow deadline."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from mediator.sdk.worker import ActionError
from tests.helpers import step
from tests.system import echo
from topics import WorkflowStatus


async def never(data: Any) -> dict[str, Any]:
    """A service that takes the command and never answers in time."""
    await asyncio.sleep(30)
    return {}


async def test_a_step_that_never_replies_times_out_and_fails_the_run(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "stuck",
            "steps": [
                step("a", action="echo"),
                step("b", action="never", depends_on=["a"], timeout="300ms"),
                step("c", action="echo", depends_on=["b"]),
            ],
        }
    )
    await system.worker("svc", {"echo": echo, "never": never}, stop_timeout=0.2)
    mediator = await system.mediator()
    client = await system.client()
    began = time.monotonic()

    result = await client.submit("stuck", {}, timeout=10)

    assert time.monotonic() - began < 5
    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "timeout"
    assert result.error.step == "b" and "300 ms" in result.error.message
    assert {s: v.status for s, v in result.steps.items()} == {
        "a": "completed",
        "b": "failed",
        "c": "pending",
    }
    assert mediator.runtime.stats.timers >= 1


async def test_retryable_errors_are_replayed_with_backoff_until_one_succeeds(
    make_system: Any,
) -> None:
    retry = {"max_attempts": 3, "backoff": "200ms", "multiplier": 2, "jitter": 0}
    system = await make_system(
        {"name": "flaky", "steps": [step("a", action="flaky", timeout="5s", retry=retry)]}
    )
    calls: list[tuple[int, float]] = []

    async def flaky(data: Any, command: Any) -> dict[str, Any]:
        calls.append((command.attempt, time.monotonic()))
        if command.attempt < 3:
            msg = "busy, try later"
            raise ActionError(msg, code="busy", retryable=True)
        return {"attempt": command.attempt}

    await system.worker("svc", {"flaky": flaky})
    mediator = await system.mediator()
    client = await system.client()

    result = await client.submit("flaky", {}, timeout=10)

    assert result.status is WorkflowStatus.COMPLETED
    assert result.output == {"a": {"attempt": 3}}
    assert [attempt for attempt, _ in calls] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(calls)]
    # 200 ms then 400 ms, plus a poll interval (50 ms) and two hops through the broker.
    assert 0.2 <= gaps[0] < 0.2 + 0.35, gaps
    assert 0.4 <= gaps[1] < 0.4 + 0.35, gaps
    summary = result.steps["a"]
    assert summary.attempts == 3
    # Nothing is left to fire: each timer was removed by the commit that made it moot.
    keys = mediator.store.keys
    for shard in range(keys.shards):
        assert await mediator.redis.zcard(keys.timers(shard)) == 0
    assert [(h.attempt, h.error and h.error.code) for h in summary.history] == [
        (1, "busy"),
        (2, "busy"),
    ]


async def test_a_non_retryable_error_is_not_replayed(make_system: Any) -> None:
    retry = {"max_attempts": 5, "backoff": "50ms"}
    system = await make_system(
        {"name": "declined", "steps": [step("a", action="pay", retry=retry)]}
    )
    calls: list[int] = []

    async def pay(data: Any, command: Any) -> dict[str, Any]:
        calls.append(command.attempt)
        msg = "card declined"
        raise ActionError(msg, code="card_declined", retryable=False)

    await system.worker("svc", {"pay": pay})
    await system.mediator()
    client = await system.client()

    result = await client.submit("declined", {}, timeout=10)
    await asyncio.sleep(0.3)  # room for a retry that must not come

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "card_declined"
    assert calls == [1]


async def test_the_workflow_deadline_fails_a_run_that_runs_too_long(make_system: Any) -> None:
    system = await make_system(
        {"name": "slow", "timeout": "400ms", "steps": [step("a", action="never")]}
    )
    await system.worker("svc", {"never": never}, stop_timeout=0.2)
    await system.mediator()
    client = await system.client()

    result = await client.submit("slow", {}, timeout=10)

    assert result.status is WorkflowStatus.FAILED
    assert result.error is not None and result.error.code == "deadline_exceeded"
    assert result.finished_ms - (result.started_ms or 0) >= 400
