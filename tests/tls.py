"""TLS in front of the test servers: a certificate authority made for the test, and a
TLS-terminating proxy before the embedded broker (this Tansu build speaks plaintext only),
as a cloud or a sidecar would put one before a broker."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from mediator.cli.infra import HOST, EmbeddedKafka, find_free_port
from mediator.kafka import KafkaConnection, new_admin

__all__ = ["Authority", "TlsKafka", "tls_kafka", "tls_redis"]


@dataclass
class Authority:
    """A certificate authority and a server certificate it issued, as PEM files."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.ca.cert_pem.write_to_path(str(self.cafile))
        server = self.ca.issue_cert("localhost", HOST)
        server.private_key_and_cert_chain_pem.write_to_path(str(self.directory / "server.pem"))
        self._server = server

    @property
    def cafile(self) -> Path:
        return self.directory / "ca.pem"

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server.configure_cert(context)
        return context


class _Proxy:
    """Accepts TLS on one port and relays the bytes to a plaintext port."""

    def __init__(self, context: ssl.SSLContext, target_port: int) -> None:
        self.port = find_free_port()
        self.context = context
        self.target_port = target_port
        self.connections = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, HOST, self.port, ssl=self.context, ssl_handshake_timeout=5
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class TlsKafka(EmbeddedKafka):
    """An embedded broker that tells clients to connect through the TLS proxy."""

    def __init__(self, proxy: _Proxy, cafile: Path) -> None:
        super().__init__()
        self.proxy = proxy
        self.cafile = cafile

    @property
    def connection(self) -> KafkaConnection:
        """How a client reaches this broker: TLS to the proxy, trusting the test's CA."""
        return KafkaConnection(
            bootstrap_servers=f"localhost:{self.proxy.port}",
            security_protocol="SSL",
            ssl_cafile=self.cafile,
        )

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        command = super()._command(binary, workdir)
        at = command.index("--advertised-listener-url") + 1
        command[at] = f"tcp://localhost:{self.proxy.port}"
        return command

    async def _probe(self) -> None:
        admin = new_admin(self.connection)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def tls_kafka(directory: Path) -> AsyncIterator[tuple[TlsKafka, Authority]]:
    """A broker reachable only over TLS (through the proxy), and the CA that signed it."""
    authority = Authority(directory)
    kafka_port = find_free_port()
    proxy = _Proxy(authority.server_context(), kafka_port)
    await proxy.start()
    server = TlsKafka(proxy, authority.cafile)
    server.port = kafka_port
    try:
        async with server:
            yield server, authority
    finally:
        await proxy.stop()


@contextlib.asynccontextmanager
async def tls_redis(
    directory: Path, user: str, password: str
) -> AsyncIterator[tuple[int, Authority]]:
    """Debian's ``redis-server`` (the embedded Valkey has no TLS) on a TLS-only port,
    with one ACL user and the default user off; yields the port and the CA."""
    import shutil

    from mediator.storage.connection import connect

    binary = shutil.which("redis-server")
    if binary is None:
        msg = "redis-server is not installed (apt-get install redis-server)"
        raise RuntimeError(msg)
    authority = Authority(directory)
    key = directory / "server.pem"
    port = find_free_port()
    process = await asyncio.create_subprocess_exec(
        binary, "--port", "0", "--tls-port", str(port), "--bind", HOST,
        "--tls-cert-file", str(key), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(authority.cafile), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(directory),
        "--user", "default", "off",
        "--user", user, "on", f">{password}", "~*", "&*", "+@all",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = connect(
            f"rediss://{HOST}:{port}/0", timeout_s=1.0, username=user, password=password,
            ssl_ca_certs=str(authority.cafile),
        )  # fmt: skip
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            else:
                msg = "redis-server with TLS did not answer"
                raise RuntimeError(msg)
        finally:
            await client.aclose()
        yield port, authority
    finally:
        process.terminate()
        await process.wait()
