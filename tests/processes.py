"""Mediator replicas as separate operating-system processes, for fault tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from mediator.settings import Settings, settings_document
from tests.helpers import signing_spec

__all__ = ["FastStreamProcess", "MediatorProcess", "ServiceProcess", "group_members"]


class _Process:
    """A child process logging to a file, which a test can pause, kill or stop."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.log = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Launch it, with `env` on top of this process's environment."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def pause(self) -> None:
        """SIGSTOP: the replica freezes mid-flight, as in a long GC pause or a VM stall;
        its sockets stay open but nothing is read, sent or heartbeated."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the frozen replica carries on where it stopped."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush, no offset commit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    async def stop(self) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        # A paused replica acts on SIGTERM only once it runs again.
        self.process.send_signal(signal.SIGCONT)
        for _ in range(200):
            if self.process.poll() is not None:
                return self.process.returncode
            await asyncio.sleep(0.05)
        self.process.kill()
        return self.process.wait(timeout=10)

    def output(self) -> str:
        """Everything the replica logged."""
        return self.log.read_text(errors="replace")


class MediatorProcess(_Process):
    """`python -m mediator run` with the given settings, logging to a file."""

    def __init__(self, settings: Settings, workflows: Path, directory: Path, name: str) -> None:
        super().__init__(directory, name)
        self.config = directory / f"{name}.yaml"
        doc = settings_document(settings)
        doc["workflows"] = [str(workflows)]
        self.config.write_text(yaml.safe_dump(doc))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mediator", "run", "--config", str(self.config)]


class FastStreamProcess(MediatorProcess):
    """``faststream run mediator:create_app --factory``, configured as `MediatorProcess`
    is but through ``MEDIATOR_CONFIG`` (the factory takes no arguments)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "faststream", "run", "mediator:create_app", "--factory"]

    def start(self, env: Mapping[str, str] | None = None) -> None:
        super().start({"MEDIATOR_CONFIG": str(self.config), **(env or {})})


class ServiceProcess(_Process):
    """One service instance (`tests.service_main`): a `work` action taking `delay` s."""

    def __init__(
        self, settings: Settings, service: str, instance: str, directory: Path, **options: Any
    ) -> None:
        super().__init__(directory, instance)
        self.instance = instance
        self.config = directory / f"{instance}.json"
        topics = settings.kafka.topics
        doc = {
            "service": service,
            "instance": instance,
            "bootstrap": settings.kafka.bootstrap_servers,
            "prefix": topics.prefix,
            "service_prefix": topics.service_prefix,
            "consumer_options": settings.kafka.consumer_options(),
            "keys": keys_spec(settings, service),
            **options,
        }
        self.config.write_bytes(orjson.dumps(doc))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.service_main", str(self.config)]

    def received(self) -> list[tuple[str, int, int]]:
        """(command id, attempt, unix ms) of every command it received."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("received "):
                _, command_id, attempt, at = line.split()
                found.append((command_id, int(attempt), int(at)))
        return found


def keys_spec(settings: Settings, service: str) -> str | None:
    """`service`'s keys as ``id=secret,...`` (current first); None with signing off."""
    ring = settings.signing.for_service(service) if settings.signing.enabled else None
    return signing_spec(ring) if ring is not None else None


async def group_members(bootstrap: str, group: str) -> int:
    """How many members a consumer group has right now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        return sum(len(g[5]) for g in response.groups if g[0] == 0)
    finally:
        await admin.close()
