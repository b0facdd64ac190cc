"""The stage every benchmark runs on: broker, Redis, workflows, settings and echo services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import tag
from benchmarks.procs import Child
from mediator import loops
from mediator.cli.infra import EmbeddedKafka, EmbeddedRedis, create_topics
from mediator.settings import Settings, load_settings, settings_document
from topics.names import Topics

__all__ = [
    "ECHO",
    "WORKFLOWS",
    "Rig",
    "Rigs",
    "Stage",
    "chain",
    "dag",
    "machine",
    "open_stage",
    "steps_of",
]

ECHO = "echo"
#: Partitions of every topic the suite creates (the embedded default's count).
PARTITIONS = 4
#: Signing is on in the benchmarks, as in a default deployment: it is on the hot path.
BENCH_KEY_ID, BENCH_KEY = "bench", secrets.token_urlsafe(32)


def chain(n: int) -> dict[str, Any]:
    """A workflow of ``n`` echo steps, each depending on the one before."""
    steps = [
        {"id": f"s{i}", "service": ECHO, "action": ECHO, "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]
    return {"name": f"chain{n}", "steps": steps}


def dag(branches: int = 4, depth: int = 2) -> dict[str, Any]:
    """A root fanning out to ``branches`` chains of ``depth`` steps that join in one step."""
    steps: list[dict[str, Any]] = [{"id": "root", "service": ECHO, "action": ECHO}]
    for b in range(branches):
        for d in range(depth):
            dep = "root" if d == 0 else f"b{b}_{d - 1}"
            steps.append({"id": f"b{b}_{d}", "service": ECHO, "action": ECHO, "depends_on": [dep]})
    ends = [f"b{b}_{depth - 1}" for b in range(branches)]
    steps.append({"id": "join", "service": ECHO, "action": ECHO, "depends_on": ends})
    return {"name": f"dag{len(steps)}", "steps": steps}


#: A service nobody runs: its commands time out.
VOID = "void"


def with_timers(workflow: dict[str, Any]) -> dict[str, Any]:
    """`workflow` with a step timeout and retries on every step (timers on, none firing)."""
    steps = [{**s, "timeout": "5s", "retry": {"max_attempts": 3}} for s in workflow["steps"]]
    return {**workflow, "name": f"{workflow['name']}_timers", "steps": steps}


#: One step that never gets a reply: its timeout timer fires (timer lag is measured on it).
TIMEOUT1: dict[str, Any] = {
    "name": "timeout1",
    "steps": [{"id": "s0", "service": VOID, "action": ECHO, "timeout": "200ms"}],
}

#: chain3 under a concurrency key that never binds (a key per run): every run takes a slot
#: before its first commit and frees it after its last.
CHAIN3_KEYED: dict[str, Any] = {
    **chain(3),
    "name": "chain3_keyed",
    "concurrency": {"key": "payload.n", "limit": 1},
}

#: A root, 1,000 steps side by side after it, and a join of all of them.
FANOUT1000: dict[str, Any] = {**dag(1000, 1), "name": "fanout1000"}

WORKFLOWS: dict[str, dict[str, Any]] = {
    wf["name"]: wf
    for wf in (
        chain(1), chain(3), with_timers(chain(3)), chain(10), dag(4, 2), TIMEOUT1, CHAIN3_KEYED,
        chain(100), FANOUT1000,
    )
}  # fmt: skip


def steps_of(workflow: str) -> int:
    """How many steps one run of ``workflow`` executes."""
    return len(WORKFLOWS[workflow]["steps"])


@dataclass
class Rig:
    """A broker with the echo service running on it, and optionally one mediator replica."""

    settings: Settings
    replica: Child | None = None
    #: The echo service's process (the SDK worker, or the raw echo service).
    echo: Child | None = None
    #: The rig's own broker's process id (None against a given broker).
    broker_pid: int | None = None
    #: The state Redis's process id, for a rig with a replica on a Redis the suite started
    #: (one rig runs at a time, so its CPU is this rig's).
    redis_pid: int | None = None

    def pids(self) -> dict[str, int]:
        """The processes of this rig the suite started, by role (for CPU accounting)."""
        found = {
            "broker": self.broker_pid,
            "echo": _pid(self.echo),
            "replica": _pid(self.replica),
            "redis": self.redis_pid,
        }
        return {role: pid for role, pid in found.items() if pid is not None}

    @property
    def bootstrap(self) -> str:
        """The rig's broker address."""
        return self.settings.kafka.bootstrap_servers

    @property
    def topics(self) -> Topics:
        """The rig's topic names."""
        return self.settings.kafka.topics


@dataclass
class Stage:
    """What every section of a run shares: Redis servers, a scratch directory, the broker.

    Tansu keeps records in memory and gets slower as its logs grow (on this machine a
    1-step floor falls from ~6,000 to under 1,000 chains/s over 40 s of load), which would
    make whatever runs later look worse. So with the embedded broker every `rig` gets a
    broker of its own; with a given broker, a rig gets fresh topics.
    """

    bootstrap: str | None
    redis_url: str
    celery_redis_url: str
    broker: str
    workdir: Path
    #: The state Redis's process id, when the suite started it (for CPU accounting).
    redis_pid: int | None = None

    def settings(self, name: str, bootstrap: str) -> Settings:
        """Settings with fresh topics, consumer groups and Redis key prefix.

        The short fetch wait and group timeouts suit the embedded broker, which holds an
        empty fetch for its full wait and a JoinGroup reply for half the session timeout.
        """
        run = tag(name)
        return load_settings(
            kafka={
                "bootstrap_servers": bootstrap,
                "enable_idempotence": False,
                "topic_prefix": f"{run}.",
                "service_topic_prefix": f"{run}.svc.",
                "partitions": PARTITIONS,
                "group_id": f"{run}-mediator",
                "fetch_max_wait_ms": 5,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 300,
            },
            redis={"url": self.redis_url, "key_prefix": run, "shards": 16},
            http={"port": 0},
            # `void` exists to make step timeouts fire (timer lag is measured on them): its
            # breaker would open and park its commands, turning each timeout into a
            # `circuit_open`. The echo service keeps the default breaker.
            circuit_breaker={"services": {VOID: {"failure_threshold": 1_000_000_000}}},
            workflows=[str(self.workflows_file)],
            log_level="WARNING",
            signing={"keys": {BENCH_KEY_ID: BENCH_KEY}},
        )

    @property
    def workflows_file(self) -> Path:
        """Every benchmark workflow as one YAML file."""
        path = self.workdir / "workflows.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump({"workflows": list(WORKFLOWS.values())}))
        return path

    def write_config(self, settings: Settings) -> Path:
        """``settings`` as a YAML file for a child process."""
        path = self.workdir / f"{settings.redis.key_prefix}.yaml"
        path.write_text(yaml.safe_dump(settings_document(settings)))
        return path

    @contextlib.asynccontextmanager
    async def rig(
        self, name: str, *, mediator: bool = False, echo: str = "services", **overrides: Any
    ) -> AsyncIterator[Rig]:
        """A fresh broker (or fresh topics), the echo service (``echo``: ``services`` for
        the SDK worker, ``raw`` for the raw one), and a replica if asked for; `overrides`
        replace sections of the settings (``load_balancing={...}``)."""
        async with contextlib.AsyncExitStack() as stack:
            broker_pid = None
            if self.bootstrap is None:
                broker = await stack.enter_async_context(EmbeddedKafka())
                bootstrap = broker.bootstrap_servers
                broker_pid = broker.process.pid if broker.process else None
            else:
                bootstrap = self.bootstrap
            settings = self.settings(name, bootstrap)
            if overrides:
                settings = load_settings(**{**settings_document(settings), **overrides})
            topics = settings.kafka.topics
            await create_topics(
                bootstrap,
                [*topics.mediator_topics(), topics.service(ECHO), topics.service(VOID)],
                partitions=PARTITIONS,
            )
            config = self.write_config(settings)
            children = [self._host(echo, config)]
            if mediator:
                children.append(self._host("mediator", config))
            for child in children:
                stack.push_async_callback(child.stop)
            # Side by side: each start is mostly waiting for a consumer group join.
            await asyncio.gather(*(child.start(ready_timeout_s=60) for child in children))
            replica = children[1] if mediator else None
            redis_pid = self.redis_pid if mediator else None
            yield Rig(settings, replica, children[0], broker_pid, redis_pid)

    def _host(self, role: str, config: Path, *extra: str, name: str | None = None) -> Child:
        args = ["-m", "benchmarks.hosts", role, "--config", str(config), *extra]
        return Child(f"{config.stem}-{name or role}", args, self.workdir)

    def echo_instance(self, settings: Settings, instance: str, delay_s: float) -> Child:
        """One more echo service instance, its own process (not started)."""
        config = self.write_config(settings)
        extra = ("--instance", instance, "--delay", str(delay_s))
        return self._host("services", config, *extra, name=instance)


class Rigs:
    """Rigs for one section: a fresh one for every use, or (``fresh=False``) one shared."""

    def __init__(
        self, stage: Stage, name: str, *, fresh: bool, mediator: bool = False,
        echo: str = "services",
    ) -> None:  # fmt: skip
        self.stage, self.name, self.fresh, self.mediator = stage, name, fresh, mediator
        self.echo = echo
        self._stack = contextlib.AsyncExitStack()
        self._shared: Rig | None = None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Rig]:
        """A rig for one measurement."""
        if self.fresh:
            async with self.stage.rig(self.name, mediator=self.mediator, echo=self.echo) as rig:
                yield rig
            return
        if self._shared is None:
            opening = self.stage.rig(self.name, mediator=self.mediator, echo=self.echo)
            self._shared = await self._stack.enter_async_context(opening)
        yield self._shared

    async def __aenter__(self) -> Rigs:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()


@contextlib.asynccontextmanager
async def open_stage(bootstrap: str | None, redis_url: str | None) -> AsyncIterator[Stage]:
    """Embedded Valkey servers (or the Redis given), and the broker given if any.

    Celery gets its own Redis server when the suite starts them (so its keys and load stay
    apart from the mediator's); against a given Redis it shares ``redis_url``.
    """
    with tempfile.TemporaryDirectory(prefix="mediator-bench-") as scratch:
        async with contextlib.AsyncExitStack() as stack:
            redis_pid = None
            if redis_url:
                stores = (redis_url, redis_url)
            else:
                state = await stack.enter_async_context(EmbeddedRedis())
                celery = await stack.enter_async_context(EmbeddedRedis())
                stores = (state.url, celery.url)
                redis_pid = state.process.pid if state.process is not None else None
            broker = bootstrap or "Tansu (embedded, in-memory, a fresh one per measurement)"
            yield Stage(bootstrap, *stores, broker, Path(scratch), redis_pid)


def _pid(child: Child | None) -> int | None:
    process = child.process if child is not None else None
    return process.pid if process is not None else None


def machine() -> dict[str, Any]:
    """Cores, memory, Python and OS of this machine."""
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "event_loop": "uvloop" if loops.loop_factory() is not None else "asyncio",
    }
