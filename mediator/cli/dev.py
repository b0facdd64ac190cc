"""`mediator dev`: the whole system on one laptop, with nothing to install but this package.

Starts an embedded Kafka-protocol broker and Redis, the mediator, the demo services (with
a flaky shipping service), then submits sample orders and prints each result as it arrives,
with what the breakers and parked queues do meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mediator.cli.demo import (
    APPROVAL_LIMIT,
    DEMO_WORKFLOWS,
    FLAKY_SERVICE,
    demo_services,
    sample_order,
)
from mediator.cli.flaky import Flakiness
from mediator.cli.infra import EmbeddedRedisCluster, create_topics, embedded
from mediator.cli.watch import FaultWatch
from mediator.cli.workflows import dashboard_site
from mediator.core.tasks import cancel_and_wait
from mediator.definitions import Definitions, load_paths
from mediator.ops.status import collect_status
from mediator.replica import Mediator
from mediator.sdk.client import MediatorClient
from mediator.settings import DEV_SETTINGS, Settings, load_settings, settings_document
from mediator.storage.keys import Keys
from topics.events import ResultEvent, WorkflowStatus

__all__ = ["EMBEDDED_FETCH_WAIT_MS", "run_dev", "service_names", "start_together"]

#: Tansu holds an empty fetch for its full max wait, so the embedded default keeps it short.
EMBEDDED_FETCH_WAIT_MS = 5
#: The dashboard's port under `mediator dev` when it is free (else any free port).
DASHBOARD_PORT = 8080

#: The development system's signing key and operator key: fixed and printed, so services
#: and tools of one's own join it. Not secrets: never use them outside `mediator dev`.
DEV_KEY = "mediator-dev-signing-key-not-a-secret"
DEV_OPERATOR_KEY = "mediator-dev-operator-key-not-a-secret"

Echo = Callable[[str], None]


def service_names(definitions: Definitions) -> set[str]:
    """Every service a set of workflows talks to (their topics must exist)."""
    return definitions.services()


#: How long the demo reviewer takes to approve a large order.
APPROVE_AFTER_S = 2.0


async def run_dev(
    *,
    requests: int | None,
    rate: float,
    workflows: list[Path],
    echo: Echo,
    redis_mode: str = "standalone",
) -> dict[str, Any]:
    """Run the demo; return the status summary read from Redis at the end. With
    ``redis_mode="cluster"`` the state lives on an embedded Redis Cluster (3 primaries,
    a replica each)."""
    definitions = load_paths([DEMO_WORKFLOWS, *workflows])
    what = "a Redis Cluster (3 primaries, 3 replicas)" if redis_mode == "cluster" else "Redis"
    echo(f"starting embedded Kafka-protocol broker (Tansu) and {what} ...")
    async with embedded(redis_mode=redis_mode) as infra:
        assert infra.kafka is not None and infra.redis is not None
        settings = load_settings(
            kafka={
                "bootstrap_servers": infra.kafka.bootstrap_servers,
                "enable_idempotence": False,
                "partitions": 4,
                "fetch_max_wait_ms": EMBEDDED_FETCH_WAIT_MS,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 300,
            },
            redis={"url": infra.redis.url, "shards": 4, "mode": redis_mode},
            # Quick to open and to probe, so a short demo shows a whole breaker cycle.
            circuit_breaker={
                "services": {FLAKY_SERVICE: {"failure_threshold": 3, "recovery_timeout_ms": "1s"}},
                "drain_rate": 20,
            },
            # A rate-limited service, so the dashboard shows a queue forming when a burst
            # comes (a breaker closing, a backlog draining) and draining; above the demo's
            # steady demand, so a long-running demo never builds an endless backlog.
            flow_control={"services": {"notification": {"max_in_flight": 8, "rate": 40}}},
            # Fixed keys, handed to the demo services below and written for one's own; the
            # dashboard and the CLI send controls as the `dev` operator.
            signing={
                "keys": {"dev": DEV_KEY},
                "enabled": True,
                "operators": {"dev": {"keys": {"dev-operator": DEV_OPERATOR_KEY}}},
                "operator": "dev",
            },
            http={"port": 0},
        )
        topics = settings.kafka.topics
        await create_topics(
            infra.kafka.bootstrap_servers,
            [*topics.mediator_topics(), *(topics.service(s) for s in service_names(definitions))],
            partitions=settings.kafka.partitions,
        )
        where = infra.redis.url
        if isinstance(infra.redis, EmbeddedRedisCluster):
            where = f"cluster {', '.join(infra.redis.addresses)}"
        echo(f"kafka  {infra.kafka.bootstrap_servers}   redis  {where}")
        with dev_settings_file(settings, echo):
            return await _drive(settings, definitions, requests=requests, rate=rate, echo=echo)


@contextlib.contextmanager
def dev_settings_file(settings: Settings, echo: Echo) -> Any:
    """Write the development system's settings where the CLI and the SDKs
    (`Worker.from_settings`, `MediatorClient.from_settings`) look when given none
    (`DEV_SETTINGS`, in this directory), for as long as it runs."""
    path = DEV_SETTINGS
    path.parent.mkdir(exist_ok=True)
    doc = settings_document(settings)
    doc.pop("workflows", None)
    doc["http"]["enabled"] = False  # a second process must not compete for the port
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(partial, path)
    echo(
        f"settings for other terminals in {path} (read by the CLI and Worker.from_settings() "
        f"run from here; elsewhere: export MEDIATOR_CONFIG={path.resolve()}); "
        f"signing key dev={DEV_KEY}"
    )
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _drive(
    settings: Settings,
    definitions: Definitions,
    *,
    requests: int | None,
    rate: float,
    echo: Echo,
) -> dict[str, Any]:
    kafka = settings.kafka
    workers = demo_services(
        kafka.bootstrap_servers,
        kafka.topics,
        enable_idempotence=kafka.enable_idempotence,
        consumer_options=kafka.consumer_options(),
        signing=settings.signing,
        flakiness=Flakiness(),
        on_phase=lambda said: echo(f"  ! {said}"),
    )
    mediator = Mediator(settings, definitions)
    client = MediatorClient(
        kafka.bootstrap_servers,
        topics=kafka.topics,
        enable_idempotence=kafka.enable_idempotence,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        operator=settings.signing.control_signer(),  # the demo reviewer's approvals
        on_result=_scheduled(echo),
    )
    async with contextlib.AsyncExitStack() as stack:
        # Side by side: each joins its consumer group, and a join takes seconds on Tansu.
        parts: list[tuple[str, contextlib.AbstractAsyncContextManager[Any]]] = [
            *((f"service {w.service}", w) for w in workers),
            ("mediator", mediator),
            ("client", client),
        ]
        await start_together(stack, parts, echo)
        echo(
            f"mediator up: workflows {', '.join(sorted(definitions.names()))}; "
            f"services {', '.join(w.service for w in workers)}"
        )
        keys = Keys(settings.redis.key_prefix, settings.redis.shards)
        url = await stack.enter_async_context(
            dashboard_site(
                settings, mediator.redis, keys, "127.0.0.1", _free_or_any(DASHBOARD_PORT)
            )
        )
        echo(f"dashboard {url}   metrics {_metrics_url(mediator)}")
        watch = FaultWatch(mediator.redis, keys, definitions.services(), echo)
        watching = asyncio.create_task(watch.run(), name="fault-watch")
        try:
            outcomes = await _submit_orders(client, requests=requests, rate=rate, echo=echo)
        finally:
            await cancel_and_wait(watching)
        # The last results can land between two looks: say where things ended.
        await watch.look()
        summary = await collect_status(mediator.redis, keys)
    counts = summary["counts"]
    echo(
        f"done: {sum(outcomes.values())} results "
        f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}); "
        f"redis says running {counts['running']}, completed {counts['completed']}, "
        f"failed {counts['failed']}"
    )
    return summary


async def start_together(
    stack: contextlib.AsyncExitStack,
    parts: Sequence[tuple[str, contextlib.AbstractAsyncContextManager[Any]]],
    echo: Echo,
    tick_s: float = 1.0,
) -> None:
    """Enter every context of `parts` at once, saying which is up as each comes up (and,
    every `tick_s`, what is still starting); each one entered is exited with `stack`. If
    any fails to start, the error is raised once all have settled."""
    began = time.perf_counter()
    waiting = {name for name, _ in parts}

    async def up(name: str, part: contextlib.AbstractAsyncContextManager[Any]) -> None:
        await part.__aenter__()
        stack.push_async_exit(part)
        waiting.discard(name)
        echo(f"  {name} up ({time.perf_counter() - began:.1f} s)")

    async def progress() -> None:
        while True:
            await asyncio.sleep(tick_s)
            echo(f"  ... still starting: {', '.join(sorted(waiting))}")

    ticker = asyncio.create_task(progress(), name="start-progress")
    try:
        results = await asyncio.gather(
            *(up(name, part) for name, part in parts), return_exceptions=True
        )
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _free_or_any(port: int) -> int:
    """`port` if nothing listens on it, else 0 (any free port)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def _metrics_url(mediator: Mediator) -> str:
    endpoints = mediator.endpoints
    return f"http://127.0.0.1:{endpoints.port}/metrics" if endpoints is not None else "off"


async def _submit_orders(
    client: MediatorClient, *, requests: int | None, rate: float, echo: Echo
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()

    async def one(n: int) -> None:
        sent = time.perf_counter()
        order, request_id = sample_order(n), f"order-{n:05d}"
        if float(order["amount"]) > APPROVAL_LIMIT:
            review = asyncio.create_task(_review(client, request_id, order, echo))
            tasks.add(review)
            review.add_done_callback(tasks.discard)
        result = await client.submit("order", order, request_id=request_id)
        outcomes[result.status.value] += 1
        echo(_describe(n, result, (time.perf_counter() - sent) * 1000))

    n = 0
    try:
        while requests is None or n < requests:
            n += 1
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return outcomes


async def _review(client: MediatorClient, request_id: str, order: Any, echo: Echo) -> None:
    """The demo reviewer: approves a large order after `APPROVE_AFTER_S` (unless someone
    did on the dashboard first: then the run has moved on and keeps or refuses this one)."""
    echo(
        f"  ? {request_id} ({order['amount']:.2f}) waits for approval: Approve or Reject it on "
        f"the dashboard, or the demo reviewer approves in {APPROVE_AFTER_S:g} s"
    )
    await asyncio.sleep(APPROVE_AFTER_S)
    await client.signal(request_id, "approval", {"approved": True, "by": "the demo reviewer"})


def _scheduled(echo: Echo) -> Callable[[ResultEvent], None]:
    """Say when a run a schedule started ends (the orders say so themselves)."""

    def seen(result: ResultEvent) -> None:
        if result.request_id.startswith("schedule."):
            echo(f"  ~ {result.request_id} ({result.workflow}) {result.status.value}")

    return seen


def _describe(n: int, result: ResultEvent, elapsed_ms: float) -> str:
    steps = result.steps.values()
    ran = sum(1 for s in steps if s.status == "completed")
    skipped = sum(1 for s in steps if s.status == "skipped")
    head = (
        f"[{n:5d}] {result.workflow} {result.request_id} "
        f"{result.status.value:<9} {elapsed_ms:6.1f} ms"
    )
    head += f"  steps {ran} ok" + (f", {skipped} skipped" if skipped else "")
    retried = [f"{sid} x{s.attempts}" for sid, s in result.steps.items() if s.attempts > 1]
    if retried:
        head += f"  attempts: {', '.join(retried)}"
    if result.status is WorkflowStatus.COMPLETED and isinstance(result.output, dict):
        return f"{head}  tracking={result.output.get('tracking')}"
    error = result.error
    text = f"{head}  {error.step}: {error.code}: {error.message}" if error else head
    if result.compensations:
        undone = ", ".join(f"{sid} {c.status}" for sid, c in result.compensations.items())
        text += f"  (compensated: {undone})"
    return text
