"""Mediator replicas as separate operating-system processes, for fault tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml
from aiokafka.admin import AIOKafkaAdminClient

from mediator.settings import Settings

__all__ = ["MediatorProcess", "group_members"]


class MediatorProcess:
    """`python -m mediator run` with the given settings, logging to a file."""

    def __init__(self, settings: Settings, workflows: Path, directory: Path, name: str) -> None:
        self.name = name
        self.config = directory / f"{name}.yaml"
        self.log = directory / f"{name}.log"
        doc = settings.model_dump(mode="json")
        doc["workflows"] = [str(workflows)]
        self.config.write_text(yaml.safe_dump(doc))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Launch the replica, with `env` on top of this process's environment."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mediator", "run", "--config", str(self.config)],
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


async def group_members(bootstrap: str, group: str) -> int:
    """How many members a consumer group has right now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        return sum(len(g[5]) for g in response.groups if g[0] == 0)
    finally:
        await admin.close()
