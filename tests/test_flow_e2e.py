"""Flow control against the real broker and Redis: two replicas send to a service limited
to 20 commands in flight and 100 a second; for 30 s of load, offered above both limits in
turn, the service never sees more than either (measured at the service), and every run
finishes once its commands could go."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mediator.settings import FlowControlSettings
from tests.helpers import cli
from topics.events import WorkflowStatus

CALL = {
    "name": "call",
    "steps": [{"id": "work", "service": "api", "action": "work", "timeout": "20s"}],
}
MAX_IN_FLIGHT, RATE, BURST = 20, 100, 20
PHASE_S = 15  # slow calls (the in-flight limit binds), then fast ones (the rate binds)
OFFERED = 120  # runs a second


async def test_two_replicas_keep_a_service_within_its_limits(make_system: Any) -> None:
    flow = FlowControlSettings.model_validate(
        {"services": {"api": {"max_in_flight": MAX_IN_FLIGHT, "rate": RATE, "burst": BURST}},
         "release_ms": 50}
    )  # fmt: skip
    system = await make_system(CALL, flow_control=flow)
    in_flight = 0
    peak = 0
    starts: list[float] = []
    slow = True

    async def work(data: Any, command: Any) -> dict[str, Any]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        starts.append(time.monotonic())
        try:
            await asyncio.sleep(0.4 if data["slow"] else 0.01)
        finally:
            in_flight -= 1
        return {}

    await system.worker("api", {"work": work}, concurrency=500)
    replicas = [await system.mediator(), await system.mediator()]
    client = await system.client()
    runs: list[asyncio.Task[Any]] = []
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < 2 * PHASE_S:
        slow = elapsed < PHASE_S
        due = int(elapsed * OFFERED) + 1 - len(runs)
        for _ in range(due):
            runs.append(asyncio.create_task(client.submit("call", {"slow": slow}, timeout=120)))
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*runs)

    assert all(r.status is WorkflowStatus.COMPLETED for r in results)
    assert len(starts) == len(runs)
    # Never more than the limits at the service ...
    assert peak <= MAX_IN_FLIGHT, peak
    windows = _busiest_second(starts)
    assert windows <= RATE + BURST, windows
    # ... and both limits really held the load back (without them neither would hold).
    assert peak == MAX_IN_FLIGHT
    assert windows >= RATE * 0.8, windows
    queued = sum(m.runtime.stats.queued for m in replicas)
    assert queued > 0
    print(f"\n{len(runs)} runs; peak in flight {peak}; busiest second {windows}; {queued} queued")
    # The limit as operators see it, once the queue drained and every permit came back.
    await asyncio.sleep(0.5)
    code, out, err = await cli(system.settings, "services")
    assert code == 0, err
    assert "in flight 0/20, rate 100/s, queued 0" in out, out


def _busiest_second(starts: list[float]) -> int:
    """The most calls started within any one second."""
    times = sorted(starts)
    best, low = 0, 0
    for high, at in enumerate(times):
        while at - times[low] >= 1.0:
            low += 1
        best = max(best, high - low + 1)
    return best
