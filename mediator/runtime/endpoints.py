"""The replica's HTTP endpoints: ``/metrics`` (Prometheus text format), ``/healthz``
(liveness: the event loop answers) and ``/readyz`` (readiness: consuming, and Redis
answers within a second)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["Endpoints", "listen"]

log = logging.getLogger("mediator.http")

#: Readiness checks: each returns None when fine, else what is wrong.
Check = Callable[[], Awaitable[str | None]]


async def listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on `host`:`port` (0: a free port); its runner (`cleanup` stops it) and
    the port bound. Raises OSError (the port is taken) with nothing left running."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockets = getattr(site._server, "sockets", None)
    return runner, sockets[0].getsockname()[1] if sockets else port


class Endpoints:
    """Serves the endpoints on `host`:`port` (0: a free port, see `port` once started)."""

    def __init__(self, registry: CollectorRegistry, ready: Check, host: str, port: int) -> None:
        self.registry = registry
        self.ready = ready
        self.host = host
        self.port = port
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.app = app
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; a port in use is a `ConfigurationError`-worthy OSError to the caller."""
        self._runner, self.port = await listen(self.app, self.host, self.port)
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            problem = await asyncio.wait_for(self.ready(), 2.0)
        except TimeoutError:
            problem = "readiness check timed out"
        except Exception as exc:
            problem = f"readiness check failed: {exc}"
        if problem is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": problem}, status=503)
