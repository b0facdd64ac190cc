"""A whole mediator system for tests: workflows, service workers, mediators and a client.

Everything is real: the session's Tansu broker and Redis, the SDK workers, the FastStream
mediator. `System.close()` stops whatever was started, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mediator.cli.dev import service_names
from mediator.cli.infra import create_topics
from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.replica import Mediator
from mediator.sdk.client import MediatorClient
from mediator.sdk.worker import Worker
from mediator.settings import Settings

__all__ = ["CHAIN3", "RETRIED", "System", "echo", "slow_echo"]

log = logging.getLogger("tests.system")

#: The longest one component of a system may take to stop.
CLOSE_TIMEOUT_S = 60.0


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(file=out)
    return out.getvalue()


#: A 3-step sequential workflow on one service, `svc`, action `work`.
CHAIN3: dict[str, Any] = {
    "name": "chain3",
    "steps": [
        {"id": "a", "service": "svc", "action": "work"},
        {"id": "b", "service": "svc", "action": "work", "depends_on": ["a"]},
        {"id": "c", "service": "svc", "action": "work", "depends_on": ["b"]},
    ],
}


#: Step `a` may be retried once (20 ms later); `b` follows it. On `svc`, action `work`.
RETRIED: dict[str, Any] = {
    "name": "retried",
    "steps": [
        {"id": "a", "service": "svc", "action": "work",
         "retry": {"max_attempts": 2, "backoff": "20ms"}},
        {"id": "b", "service": "svc", "action": "work", "depends_on": ["a"]},
    ],
}  # fmt: skip


async def echo(data: Any, command: Any) -> dict[str, Any]:
    """A handler that returns what it got, tagged with the step."""
    return {"step": command.step, "input": data}


async def slow_echo(data: Any, command: Any) -> dict[str, Any]:
    """`echo` after 50 ms: with a bounded worker, a run of a few hundred workflows lasts
    seconds, so a fault injected after the first results lands mid-run."""
    await asyncio.sleep(0.05)
    return await echo(data, command)


class System:
    """A mediator system under test."""

    def __init__(self, settings: Settings, workflows: list[Mapping[str, Any]]) -> None:
        self.settings = settings
        self.workflow_docs = workflows
        self.definitions = Definitions(parse_workflows(list(workflows)))
        self.topics = settings.kafka.topics
        self.stack = contextlib.AsyncExitStack()
        self.mediators: list[Mediator] = []
        self.workers: dict[str, Worker] = {}
        self._client: MediatorClient | None = None
        self._closers: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    @property
    def bootstrap(self) -> str:
        """The broker address."""
        return self.settings.kafka.bootstrap_servers

    async def create_topics(self) -> None:
        """The mediator's topics and every service topic the workflows use."""
        names = [self.topics.service(s) for s in service_names(self.definitions)]
        names += [source.topic for source in self.settings.signals.sources]
        await create_topics(
            self.settings.kafka, [*self.topics.mediator_topics(), *names], partitions=4
        )

    def write_workflows(self, directory: Path) -> Path:
        """The workflows as a YAML file (for mediators run as separate processes)."""
        path = directory / "workflows.yaml"
        path.write_text(yaml.safe_dump({"workflows": list(self.workflow_docs)}))
        return path

    async def worker(
        self, service: str, actions: Mapping[str, Callable[..., Any]], **options: Any
    ) -> Worker:
        """Start a service worker with `actions`."""
        signing = self.settings.signing
        if signing.enabled:
            options.setdefault("keys", signing.for_service(service))
        else:
            options.setdefault("signing", False)
        worker = Worker(
            service,
            self.settings.kafka,
            topics=self.topics,
            enable_idempotence=False,
            consumer_options=self.settings.kafka.consumer_options(),
            **options,
        )
        for name, handler in actions.items():
            worker.add_action(name, handler)
        await worker.start()
        self._closers.append((f"worker {service}", worker.stop))
        self.workers[service] = worker
        return worker

    async def mediator(self) -> Mediator:
        """Start one more in-process mediator replica."""
        mediator = Mediator(self.settings, self.definitions)
        await mediator.start()
        self._closers.append(("mediator", mediator.stop))
        self.mediators.append(mediator)
        return mediator

    async def client(self) -> MediatorClient:
        """The (started) client."""
        if self._client is None:
            client = MediatorClient(
                self.settings.kafka,
                topics=self.topics,
                enable_idempotence=False,
                fetch_max_wait_ms=self.settings.kafka.fetch_max_wait_ms,
                operator=self.settings.signing.control_signer(),
            )
            await client.start()
            self._closers.append(("client", client.stop))
            self._client = client
        return self._client

    async def close(self) -> None:
        """Stop everything started, newest first.

        Each stop is bounded: a stop that hangs is reported with the stack of every task
        still waiting (the evidence to find what it waits on) and the rest still stop, so
        one hung shutdown cannot stall the whole session.
        """
        while self._closers:
            what, stop = self._closers.pop()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await stop()
            except TimeoutError:
                log.error("%s did not stop within %.0f s; tasks still waiting:\n%s",
                          what, CLOSE_TIMEOUT_S, _task_stacks())  # fmt: skip
        await self.stack.aclose()
