"""`mediator dev` starts its parts side by side and says how far it got."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import pytest

from mediator.cli.dev import start_together
from tests.helpers import wait_for


class Part:
    """Starts when `gate` opens (or fails to), and notes what happened to it."""

    def __init__(self, name: str, log: list[str], gate: asyncio.Event, fail: bool = False):
        self.name, self.log, self.gate, self.fail = name, log, gate, fail

    async def __aenter__(self) -> Part:
        self.log.append(f"enter {self.name}")
        await self.gate.wait()
        if self.fail:
            msg = f"{self.name} cannot start"
            raise ConnectionError(msg)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.log.append(f"exit {self.name}")


async def test_parts_start_side_by_side_with_progress() -> None:
    log: list[str] = []
    said: list[str] = []
    gate = asyncio.Event()
    parts = [(n, Part(n, log, gate)) for n in ("a", "b", "c")]
    async with contextlib.AsyncExitStack() as stack:
        starting = asyncio.create_task(start_together(stack, parts, said.append, tick_s=0.05))
        # All three are starting at once, and the wait is narrated.
        await wait_for(lambda: len(log) == 3 and said, what="three parts starting, narrated")
        assert log == ["enter a", "enter b", "enter c"]
        assert said and said[0] == "  ... still starting: a, b, c"
        gate.set()
        await starting
        assert sorted(line.split(" up ")[0] for line in said if " up " in line) == [
            "  a", "  b", "  c"
        ]  # fmt: skip
    assert sorted(log[3:]) == ["exit a", "exit b", "exit c"]


async def test_a_part_that_fails_to_start_is_raised_and_the_others_are_stopped() -> None:
    log: list[str] = []
    gate = asyncio.Event()
    gate.set()
    parts = [("ok", Part("ok", log, gate)), ("bad", Part("bad", log, gate, fail=True))]
    with pytest.raises(ConnectionError, match="bad cannot start"):
        async with contextlib.AsyncExitStack() as stack:
            await start_together(stack, parts, lambda _: None)
    assert log == ["enter ok", "enter bad", "exit ok"]
