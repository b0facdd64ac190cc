"""Redis connections for the mediator: redis-py with commands packed in C.

redis-py's asyncio connection packs each command's arguments in Python, which on the hot
path (one commit script call per transition, about thirty arguments) costs more CPU than
the transition itself. hiredis packs the same bytes in C, an order of magnitude faster.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

__all__ = [
    "PackedConnection",
    "check_mode",
    "connect",
    "connect_to",
    "describe",
    "lua_source",
    "redacted",
    "sentinel_client",
    "text",
]


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
    """A client for `RedisSettings`: its URL, credentials, TLS and timeout; with ``mode:
    cluster`` a Redis Cluster client (`mediator.storage.cluster`), which answers the same
    commands (the URL names any one node: the client discovers the rest)."""
    if settings.mode == "cluster":
        from mediator.storage.cluster import ClusterClient

        options = settings.client_options() | {
            "socket_timeout": settings.socket_timeout_s,
            "socket_connect_timeout": settings.socket_timeout_s,
            "call_timeout_s": settings.call_timeout_s,
        }
        return cast(Redis, ClusterClient.from_url(settings.url, **options))
    if settings.mode == "sentinel":
        return sentinel_client(settings)
    return connect(settings.url, timeout_s=settings.socket_timeout_s, **settings.client_options())


async def check_mode(redis: Any) -> None:
    """Refuse, with what to set, a Redis whose kind is not the one `redis.mode` says: a
    Redis Cluster node spoken to as one Redis answers MOVED to most keys, and a single
    Redis cannot serve a cluster client."""
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisClusterException, ResponseError

    from mediator.errors import ConfigurationError

    if isinstance(redis, RedisCluster):
        try:
            await redis.initialize()
        except RedisClusterException as exc:
            if "not enabled" not in str(exc):
                raise
            msg = (
                "redis.mode is cluster but the Redis at redis.url is not a Redis Cluster "
                "node (cluster mode is not enabled on it): set redis.mode standalone "
                "(MEDIATOR_REDIS__MODE=standalone)"
            )
            raise ConfigurationError(msg) from None
        return
    try:
        info = await redis.info("cluster")
    except ResponseError:  # INFO unknown (a Redis-compatible store) or not allowed (ACL)
        return
    if int(info.get("cluster_enabled", 0)):
        msg = (
            "the Redis at redis.url is a Redis Cluster node: set redis.mode cluster "
            "(MEDIATOR_REDIS__MODE=cluster)"
        )
        raise ConfigurationError(msg)


def sentinel_client(settings: Any) -> Redis:
    """A client of the primary the Sentinels name: each new connection asks them where it
    is, so after a failover the connections to the old primary fail (transiently) and the
    next ones reach the new one. The URL's scheme (TLS), credentials and database apply
    to the primary; `sentinel_password` to the Sentinels."""
    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(settings.url)
    options = settings.client_options() | {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "db": int(parts.path.strip("/") or 0),
    }
    if parts.password is not None and "password" not in options:
        options["password"] = parts.password
    if parts.username and "username" not in options:
        options["username"] = parts.username
    if parts.scheme == "rediss":
        options["ssl"] = True
    sentinel_options: dict[str, Any] = {"socket_timeout": settings.socket_timeout_s}
    if settings.sentinel_password is not None:
        sentinel_options["password"] = settings.sentinel_password.get_secret_value()
    sentinel = Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_options)
    return cast(Redis, sentinel.master_for(settings.sentinel_master, **options))


def describe(settings: Any) -> str:
    """Where `RedisSettings` point, for logs and errors (no password)."""
    if settings.mode == "sentinel":
        return f"sentinel {settings.sentinel_master} via {', '.join(settings.sentinels)}"
    where = redacted(settings.url)
    return f"cluster {where}" if settings.mode == "cluster" else where


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
