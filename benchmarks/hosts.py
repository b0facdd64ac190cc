"""Child side of `benchmarks.procs`: echo services or one mediator replica, on a line protocol.

``python -m benchmarks.hosts services --config FILE`` runs the echo service with the service
SDK, ``... raw ...`` the raw echo service of `benchmarks.raw`, and ``... mediator ...`` one
in-process `Mediator` so its own overhead samples can be read. Each prints ``ready`` once
started, then answers one line per command read from stdin (``stats``, ``clear``) and stops
on EOF or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks.raw import serve_raw_echo
from benchmarks.stage import ECHO
from mediator import loops
from mediator.definitions import load_paths
from mediator.replica import Mediator
from mediator.sdk.worker import Worker
from mediator.settings import Settings, load_settings


async def echo(data: Any) -> Any:
    """The trivial step every benchmark runs: returns its input."""
    return data


async def _serve(handle: Callable[[str], str]) -> None:
    """Answer stdin commands until EOF or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    stopping = asyncio.create_task(stop.wait())
    try:
        while True:
            line_task = asyncio.create_task(reader.readline())
            await asyncio.wait([line_task, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not line_task.done():
                line_task.cancel()
                return
            line = line_task.result()
            if not line:
                return
            print(handle(line.decode().strip()), flush=True)
    finally:
        stopping.cancel()


async def services(
    settings: Settings, concurrency: int, instance: str | None = None, delay_s: float = 0.0
) -> None:
    """The echo service, one SDK worker (answering after `delay_s`)."""
    kafka = settings.kafka
    worker = Worker(
        ECHO,
        kafka.bootstrap_servers,
        topics=kafka.topics,
        instance=instance or f"{ECHO}-bench",
        enable_idempotence=kafka.enable_idempotence,
        concurrency=concurrency,
        consumer_options=kafka.consumer_options(),
        keys=settings.signing.for_service(ECHO),
        signing=settings.signing.enabled,
    )

    async def slow_echo(data: Any) -> Any:
        await asyncio.sleep(delay_s)
        return data

    worker.add_action(ECHO, slow_echo if delay_s else echo)

    def handle(command: str) -> str:
        if command == "stats":
            return orjson.dumps(dict(worker.stats)).decode()
        return "unknown command"

    async with worker:
        await _serve(handle)


async def raw_echo(settings: Settings) -> None:
    """The raw echo service (`benchmarks.raw`): plain aiokafka and orjson, no project code."""
    kafka = settings.kafka
    stop = asyncio.Event()
    group = f"{kafka.topics.service_prefix}{ECHO}"
    echoing = asyncio.create_task(
        serve_raw_echo(
            kafka.bootstrap_servers, kafka.topics.service(ECHO), group, stop,
            kafka.session_timeout_ms,
        )
    )  # fmt: skip
    serving = asyncio.create_task(_serve(lambda command: "unknown command"))
    await asyncio.wait([echoing, serving], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await echoing  # its failure, if any, ends the process with the traceback


async def mediator(settings: Settings) -> None:
    """One mediator replica whose overhead samples the parent can clear and read."""
    replica = Mediator(settings, load_paths(settings.workflows))

    def handle(command: str) -> str:
        runtime = replica.runtime
        if command == "clear":
            runtime.overhead.clear()
            runtime.timer_lag.clear()
            return "ok"
        if command == "stats":
            return orjson.dumps(
                {
                    "overhead_ms": runtime.overhead.summary(),
                    "timer_lag_ms": runtime.timer_lag.summary(),
                    "stats": runtime.stats.as_dict(),
                    "published": replica.dispatcher.published,
                }
            ).decode()
        return "unknown command"

    async with replica:
        await _serve(handle)


def main() -> None:
    """Parse the command line and run the chosen host until stopped."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hosts")
    parser.add_argument("role", choices=["services", "raw", "mediator"])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--instance", help="services: the instance id (default echo-bench)")
    parser.add_argument("--delay", type=float, default=0.0, help="services: seconds per call")
    args = parser.parse_args()
    settings = load_settings(args.config)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.role == "services":
        coro = services(settings, args.concurrency, args.instance, args.delay)
    else:
        coro = raw_echo(settings) if args.role == "raw" else mediator(settings)
    with contextlib.suppress(KeyboardInterrupt):
        loops.run(coro, settings.event_loop)  # every role on the same kind of loop


if __name__ == "__main__":
    main()
