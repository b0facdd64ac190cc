"""The DBOS peer's process: ``python -m benchmarks.dbos_app URL STEPS IN_FLIGHT WARMUP MEASURE``.

A DBOS workflow of ``STEPS`` steps, each step the echo work done in-process (a DBOS step
is a function the workflow calls, checkpointed in PostgreSQL: that is how DBOS users
write a step; no broker between them, which favours DBOS against the mediator, whose every
step is a command and a reply over Kafka). ``IN_FLIGHT`` workflows run at once (asyncio
lanes, each starting its next workflow when the previous one returned); the workflows
completed within the ``MEASURE`` seconds after ``WARMUP`` are counted. Prints one line of
JSON: ``{"completed": n, "window_s": s, "failed": n}``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from dbos import DBOS, DBOSConfig


@DBOS.step()
async def echo(value: dict[str, Any]) -> dict[str, Any]:
    """The echo work: the input back."""
    return value


@DBOS.workflow()
async def chain(n: int, steps: int) -> dict[str, Any]:
    """``steps`` echo steps, each given the one before's output."""
    value: dict[str, Any] = {"n": n}
    for _ in range(steps):
        value = await echo(value)
    return value


async def closed_loop(
    steps: int, in_flight: int, warmup_s: float, measure_s: float
) -> dict[str, float]:
    """Workflows completed in the window (and failed ones) with `in_flight` lanes."""
    start = time.monotonic()
    opened, closed = start + warmup_s, start + warmup_s + measure_s
    completed = failed = 0

    async def lane(lane_no: int) -> None:
        nonlocal completed, failed
        n = lane_no
        while time.monotonic() < closed:
            try:
                ok = await chain(n, steps) == {"n": n}
            except Exception:  # counted, and the run is reported failed
                ok = False
            if not ok:
                failed += 1
            elif opened <= time.monotonic() < closed:
                completed += 1
            n += in_flight

    await asyncio.gather(*(lane(i) for i in range(in_flight)))
    return {"completed": completed, "window_s": measure_s, "failed": failed}


async def main(argv: list[str]) -> None:
    url, steps, in_flight, warmup_s, measure_s = argv
    config: DBOSConfig = {
        "name": "mediator-bench",
        "system_database_url": url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        result = await closed_loop(int(steps), int(in_flight), float(warmup_s), float(measure_s))
    finally:
        DBOS.destroy()
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
