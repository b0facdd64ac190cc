"""Stopping background tasks: a swallowed cancellation cannot hang a shutdown."""

from __future__ import annotations

import asyncio
import logging

from mediator.core.tasks import cancel_and_wait
from mediator.runtime.periodic import Periodic


class _Swallower:
    """Loses the first `times` cancellations, as a library cleaning up a connection can."""

    def __init__(self, times: int) -> None:
        self.times = times

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if self.times <= 0:
                    raise
                self.times -= 1


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    task = asyncio.create_task(_Swallower(times=2).run())
    await asyncio.sleep(0.01)
    assert await cancel_and_wait(task, patience=5.0)
    assert task.cancelled()


async def test_a_task_that_never_stops_is_left_after_the_patience() -> None:
    swallower = _Swallower(times=10**9)
    task = asyncio.create_task(swallower.run())
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not await cancel_and_wait(task, patience=0.3)
    assert 0.3 <= loop.time() - began < 2.0
    assert not task.done()
    swallower.times = 0
    assert await cancel_and_wait(task, patience=5.0)


class _Stubborn(Periodic):
    """A round that loses the first cancellation it receives."""

    def __init__(self) -> None:
        super().__init__(None, logging.getLogger("test"))
        self.lost = 0

    async def round(self) -> float:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.lost == 0:
                self.lost += 1
                return 0.0
            raise
        return 0.0


async def test_a_periodic_task_stops_although_a_round_lost_the_cancellation() -> None:
    periodic = _Stubborn()
    periodic.start()
    await asyncio.sleep(0.02)
    stopper = asyncio.create_task(periodic.stop())
    done, _ = await asyncio.wait({stopper}, timeout=5)
    assert stopper in done, "stop() still waiting on a task that lost its cancellation"
    assert periodic.lost == 1
