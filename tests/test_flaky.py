"""The demo's flaky action: its outages, errors and stalls follow its settings."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mediator.cli.flaky import Flakiness, Flaky
from mediator.sdk.worker import ActionError


async def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"ok": data}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_outages_fail_every_call_on_schedule_and_are_announced_once() -> None:
    clock, said = Clock(), []
    flaky = Flaky(
        "shipping",
        _ok,
        Flakiness(error_rate=0, stall_rate=0, first_outage=2, outage_every=10, outage=3),
        clock=clock,
        on_phase=said.append,
    )
    outcomes = []
    for t in (0, 1.9, 2.0, 3.5, 4.99, 5.0, 11.9, 12.0, 14.9, 15.0):
        clock.now = 100.0 + t
        try:
            await flaky({"t": t})
            outcomes.append("ok")
        except ActionError as exc:
            assert exc.retryable and exc.code == "unavailable"
            outcomes.append("down")
    assert outcomes == ["ok", "ok", "down", "down", "down", "ok", "ok", "down", "down", "ok"]
    assert said == [
        "shipping: outage, every call fails for 3s",
        "shipping: outage over",
        "shipping: outage, every call fails for 3s",
        "shipping: outage over",
    ]


async def test_errors_come_at_their_rate_and_are_retryable() -> None:
    flaky = Flaky(
        "shipping",
        _ok,
        Flakiness(error_rate=0.25, stall_rate=0, first_outage=1e9),
        rng=random.Random(7),
    )
    errors = 0
    for n in range(2000):
        try:
            assert await flaky({"n": n}) == {"ok": {"n": n}}
        except ActionError as exc:
            assert exc.retryable and exc.code == "busy"
            errors += 1
    assert errors / 2000 == pytest.approx(0.25, abs=0.03)


async def test_a_stall_delays_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("mediator.cli.flaky.asyncio.sleep", sleep)
    flaky = Flaky("shipping", _ok, Flakiness(error_rate=0, stall_rate=1.0, stall=4.0))
    assert await flaky({}) == {"ok": {}}
    assert slept == [4.0]
