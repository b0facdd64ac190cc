"""Redis connections for the mediator: redis-py with commands packed in C.

redis-py's asyncio connection packs each command's arguments in Python, which on the hot
path (one commit script call per transition, about thirty arguments) costs more CPU than
the transition itself. hiredis packs the same bytes in C, an order of magnitude faster.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

__all__ = ["PackedConnection", "connect", "connect_to", "lua_source", "redacted", "text"]


class PackedConnection(Connection):
    """A TCP connection whose commands are packed by hiredis."""

    def pack_command(self, *args: Any) -> list[bytes]:
        """The RESP bytes of one command (same bytes as redis-py's own packer)."""
        if isinstance(args[0], str) and " " in args[0]:
            # redis-py splits multi-word command names ("CLIENT SETINFO") into arguments.
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


def connect(url: str, *, timeout_s: float | None = None, **options: Any) -> Redis:
    """A client for `url` (`options`: credentials, TLS files); plain TCP URLs get the C
    packer."""
    options |= {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if url.startswith("redis://"):
        options["connection_class"] = PackedConnection
    return Redis.from_url(url, **options)


def connect_to(settings: Any) -> Redis:
    """A client for `RedisSettings`: its URL, credentials, TLS and timeout."""
    return connect(settings.url, timeout_s=settings.socket_timeout_s, **settings.client_options())


def redacted(url: str) -> str:
    """`url` with its password (if any) replaced by ``***``, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def text(value: bytes | str) -> str:
    """A Redis reply value as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value


@functools.cache
def lua_source(name: str) -> str:
    """The source of one of the package's Lua scripts (``mediator/storage/lua/<name>``).

    A line ``--- @include "<other>"`` (as in BullMQ's scripts) stands for the source of
    ``lua/<other>.lua``, put in its place here: Redis knows a script by the SHA of the
    text it is given, so that SHA covers what the script includes.
    """
    return _expanded(name, ())


_INCLUDE = re.compile(r'^--- @include "([^"]+)"[ \t]*$', re.MULTILINE)


def _expanded(name: str, within: tuple[str, ...]) -> str:
    if name in within:
        msg = f"Lua scripts include each other in a cycle: {' -> '.join((*within, name))}"
        raise ValueError(msg)
    script = importlib.resources.files("mediator.storage").joinpath(f"lua/{name}")
    if not script.is_file():
        found = f", included by {within[-1]}" if within else ""
        msg = f"no Lua script mediator/storage/lua/{name}{found}"
        raise FileNotFoundError(msg)
    return _INCLUDE.sub(
        lambda include: _expanded(f"{include[1]}.lua", (*within, name)).rstrip("\n"),
        script.read_text(),
    )
