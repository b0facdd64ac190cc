"""A service instance as its own process, for routing and fault tests:
``python -m tests.service_main CONFIG.json``. It runs one action, ``work``, which waits
``delay`` seconds and answers with its instance id; every command it receives is
printed (``received <command id> <attempt> <unix ms>``) so a test can see where each went.
With ``fail``, every call fails with a retryable error (a broken instance).
SIGTERM drains it (the SDK's own handling)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from mediator.sdk.worker import ActionError, Worker
from topics.events import CommandEvent
from topics.names import Topics


async def main(config: dict[str, Any]) -> None:
    delay = float(config.get("delay", 0.0))
    fail = bool(config.get("fail", False))
    worker = Worker(
        config["service"],
        config["bootstrap"],
        topics=Topics(prefix=config["prefix"], service_prefix=config["service_prefix"]),
        instance=config["instance"],
        enable_idempotence=False,
        heartbeat_interval=float(config.get("heartbeat_interval", 1.0)),
        weight=float(config.get("weight", 1.0)),
        consumer_options=config.get("consumer_options"),
        keys=config.get("keys"),
        signing=config.get("keys") is not None,
    )

    async def work(data: Any, command: CommandEvent) -> dict[str, Any]:
        print(f"received {command.command_id} {command.attempt} {time.time_ns() // 1_000_000}")
        await asyncio.sleep(delay)
        if fail:
            broken = f"{worker.instance} is broken"
            raise ActionError(broken, code="broken", retryable=True)
        return {"by": worker.instance}

    worker.add_action("work", work)
    await worker.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(orjson.loads(Path(sys.argv[1]).read_bytes())))
