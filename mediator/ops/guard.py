"""What stands between the dashboard and the network: who may ask (an operator token, as
HTTP Basic or Bearer), under which host name (DNS rebinding), from which page (no other
origin may make it act), and the headers that keep its pages out of frames and sniffers.

Every request must name an allowed host. With a token configured, every page and API call
needs it. A call that changes something (any POST) must also come as JSON from the
dashboard's own page: it carries the ``X-Mediator-Action`` header, which a page on another
origin cannot send without a CORS preflight the dashboard never grants, and its ``Origin``,
when present, is the dashboard's own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

__all__ = ["ACTION_HEADER", "Guard", "hash_token", "is_loopback"]

log = logging.getLogger("mediator.dashboard")

#: The header the dashboard's page sends with every action.
ACTION_HEADER = "X-Mediator-Action"
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def hash_token(token: str) -> str:
    """The form a token is kept in (settings may hold it so): ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """The dashboard's middleware: host allow-list, token, same-origin actions, headers."""

    def __init__(self, token: str | None, hosts: Iterable[str]) -> None:
        #: The token's hash (``sha256:<hex>``), or None: no token asked (loopback only).
        self.digest = (
            None if token is None else token if token.startswith("sha256:") else hash_token(token)
        )
        self.hosts = {h.lower().strip("[]") for h in hosts}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            status, reason = refusal
            log.warning("refused %s %s: %s", request.method, request.path, reason)
            response: web.StreamResponse = web.json_response({"error": reason}, status=status)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Basic realm="mediator", charset="UTF-8"'
        else:
            response = await handler(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _refusal(self, request: web.Request) -> tuple[int, str] | None:
        host = (request.host or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]") not in self.hosts:
            return 421, f"host {host!r} is not one this dashboard answers to (dashboard.hosts)"
        if self.digest is not None and not self._authorised(request):
            return 401, "an operator token is needed (dashboard.token)"
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if request.headers.get(ACTION_HEADER) != "1":
                return 403, f"actions come from the dashboard's page only ({ACTION_HEADER})"
            if request.content_type != "application/json":
                return 415, "actions are JSON (Content-Type: application/json)"
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() != f"{request.scheme}://{host}":
                return 403, f"origin {origin!r} may not act on this dashboard"
        elif request.method == "OPTIONS":
            return 403, "cross-origin requests are not allowed"
        return None

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        token: str | None = None
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return False
            token = decoded.partition(":")[2]
        if not token or self.digest is None:
            return False
        return hmac.compare_digest(hash_token(token), self.digest)
