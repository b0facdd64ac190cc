"""A whole mediator system for tests: workflows, service workers, mediators and a client.

Everything is real: the session's Tansu broker and Redis, the SDK workers, the FastStream
mediator. `System.close()` stops whatever was started, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mediator.cli.dev import service_names
from mediator.cli.infra import create_topics
from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.runtime.app import Mediator
from mediator.sdk.client import MediatorClient
from mediator.sdk.worker import Worker
from mediator.settings import Settings

__all__ = ["CHAIN3", "System", "echo", "slow_echo"]

#: A 3-step sequential workflow on one service, `svc`, action `work`.
CHAIN3: dict[str, Any] = {
    "name": "chain3",
    "steps": [
        {"id": "a", "service": "svc", "action": "work"},
        {"id": "b", "service": "svc", "action": "work", "depends_on": ["a"]},
        {"id": "c", "service": "svc", "action": "work", "depends_on": ["b"]},
    ],
}


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

    @property
    def bootstrap(self) -> str:
        """The broker address."""
        return self.settings.kafka.bootstrap_servers

    async def create_topics(self) -> None:
        """The mediator's topics and every service topic the workflows use."""
        names = [self.topics.service(s) for s in service_names(self.definitions)]
        await create_topics(self.bootstrap, [*self.topics.mediator_topics(), *names], partitions=4)

    def write_workflows(self, directory: Path) -> Path:
        """The workflows as a YAML file (for mediators run as separate processes)."""
        path = directory / "workflows.yaml"
        path.write_text(yaml.safe_dump({"workflows": list(self.workflow_docs)}))
        return path

    async def worker(
        self, service: str, actions: Mapping[str, Callable[..., Any]], **options: Any
    ) -> Worker:
        """Start a service worker with `actions`."""
        worker = Worker(
            service,
            self.bootstrap,
            topics=self.topics,
            enable_idempotence=False,
            consumer_options=self.settings.kafka.consumer_options(),
            **options,
        )
        for name, handler in actions.items():
            worker.add_action(name, handler)
        await self.stack.enter_async_context(worker)
        self.workers[service] = worker
        return worker

    async def mediator(self) -> Mediator:
        """Start one more in-process mediator replica."""
        mediator = Mediator(self.settings, self.definitions)
        await self.stack.enter_async_context(mediator)
        self.mediators.append(mediator)
        return mediator

    async def client(self) -> MediatorClient:
        """The (started) client."""
        if self._client is None:
            client = MediatorClient(
                self.bootstrap,
                topics=self.topics,
                enable_idempotence=False,
                fetch_max_wait_ms=self.settings.kafka.fetch_max_wait_ms,
            )
            await self.stack.enter_async_context(client)
            self._client = client
        return self._client

    async def close(self) -> None:
        """Stop everything started."""
        await self.stack.aclose()
