"""Redis Cluster: redis-py's asyncio cluster client, with the scripts kept loaded.

Every key the mediator touches in one script call, transaction or multi-key command shares
one hash slot (the shard tag, or a tag of its own: see `mediator.storage.keys`), so the
cluster client only has to send each command to the primary serving its slot; a pipeline
is split by the client into one pipeline per primary, sent concurrently.

What redis-py's cluster pipeline does not do is load scripts: an ``EVALSHA`` a primary does
not know (a new cluster, a replica just promoted after a failover, a node restarted empty)
fails with ``NOSCRIPT``. `ClusterClient` remembers every script registered on it, loads
them all on every primary when it connects, and when a pipeline meets ``NOSCRIPT`` loads
them again and re-sends only the calls that failed (a call refused for ``NOSCRIPT`` did not
run, so nothing runs twice). Script calls outside pipelines load their script themselves;
the commit pipeline, which ends with a ``WAIT`` per primary, re-sends its own.

Nor does the cluster client bound how long a call takes: while a slot has no primary (one
died with no replica to replace it), a pipeline to it is retried, layout refresh after
layout refresh, for minutes. `ClusterClient` gives every command and pipeline a deadline
(`redis.call_timeout_s`): past it the call fails with a Redis `TimeoutError`, which the
mediator treats as Redis unavailable (transient), so what waited backs off and says so.
A call cut short this way has its connections closed by redis-py (a reply half read is
never read by the next call); a write it had sent may or may not have run, as with any
Redis timeout, which every caller already allows for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeout

__all__ = ["ClusterClient", "ScriptedPipeline", "nodes_of"]

log = logging.getLogger("mediator.storage")

T = TypeVar("T")


async def within(deadline_s: float | None, call: Awaitable[T]) -> T:
    """`call`'s result, or a Redis `TimeoutError` once `deadline_s` has passed (None: no
    deadline)."""
    if deadline_s is None:
        return await call
    try:
        async with asyncio.timeout(deadline_s):
            return await call
    except TimeoutError:  # the deadline's (redis-py's own TimeoutError is no subclass)
        msg = (
            f"the Redis Cluster did not answer within {deadline_s:g} s "
            "(redis.call_timeout_s, its client's retries included)"
        )
        raise RedisTimeout(msg) from None


class ClusterClient(RedisCluster):
    """A cluster client that keeps the scripts registered on it loaded on every primary."""

    def __init__(self, *args: Any, call_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: How long one command or pipeline may take in all (None: as long as it takes).
        self.call_timeout_s = call_timeout_s
        self.scripts: dict[str, str] = {}
        #: How many times a pipeline met NOSCRIPT and loaded the scripts again.
        self.script_reloads = 0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await within(self.call_timeout_s, super().execute_command(*args, **kwargs))

    def register_script(self, script: str | bytes) -> AsyncScript:  # type: ignore[override]
        registered = super().register_script(script)
        self.scripts[registered.sha] = registered.script  # type: ignore[assignment]
        return registered

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        """Learn the cluster's layout (at the first command, and again after MOVED or a
        failover), then load the scripts on its primaries."""
        needed = self._initialize
        await super().initialize(*args, **kwargs)
        if needed and self.scripts:
            try:
                await self.load_scripts()
            except Exception as exc:  # a pipeline meeting NOSCRIPT loads them again
                log.info("Redis Cluster: scripts not loaded on every primary yet: %s", exc)
        return self

    async def load_scripts(self) -> None:
        """Load every registered script on every primary (``SCRIPT LOAD`` goes to all)."""
        for script in list(self.scripts.values()):
            await self.script_load(script)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ScriptedPipeline:
        if shard_hint:
            msg = "a cluster pipeline takes no shard_hint"
            raise ValueError(msg)
        return ScriptedPipeline(self, transaction)  # type: ignore[abstract]


class ScriptedPipeline(ClusterPipeline):
    """A cluster pipeline that re-sends, after loading the scripts, the script calls a
    primary refused for ``NOSCRIPT``."""

    def __init__(self, client: ClusterClient, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._owner = client
        self._calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        #: Whether calls refused for ``NOSCRIPT`` load the scripts and go again (once: the
        #: pipeline that sends them again does not, so a script no primary will keep, or
        #: a SHA never registered, ends as the `NoScriptError` it is, not as recursion).
        self.reload = True

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.append((args, kwargs))
        return super().execute_command(*args, **kwargs)

    async def reset(self) -> None:  # type: ignore[override]
        self._calls = []
        await super().reset()  # type: ignore[no-untyped-call]

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        return await within(
            self._owner.call_timeout_s, self._execute_all(raise_on_error, allow_redirections)
        )

    async def _execute_all(self, raise_on_error: bool, allow_redirections: bool) -> Any:
        calls, self._calls = self._calls, []
        if self._transaction:  # MULTI/EXEC: not re-sent piecemeal
            return await super().execute(raise_on_error, allow_redirections)
        replies = list(await super().execute(False, allow_redirections))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        # A pipeline that WAITs for replicas re-sends its calls itself (`Store`), so that
        # the WAIT follows them on their connection.
        waits = any(args and args[0] == "WAIT" for args, _ in calls)
        if missing and len(replies) == len(calls) and not waits and self.reload:
            self._owner.script_reloads += 1
            log.info(
                "Redis Cluster: %d script calls met NOSCRIPT; loading the scripts", len(missing)
            )
            await self._owner.load_scripts()
            again = self._owner.pipeline()
            again.reload = False
            for i in missing:
                args, kwargs = calls[i]
                again.execute_command(*args, **kwargs)
            for i, reply in zip(missing, await again.execute(False), strict=True):
                replies[i] = reply
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies


async def nodes_of(redis: Any, keys: Sequence[str]) -> list[ClusterNode] | None:
    """The primaries serving `keys` (each once), on a cluster client; None otherwise."""
    if not isinstance(redis, RedisCluster):
        return None
    await redis.initialize()  # learns the layout if it has not yet (a no-op after)
    found: dict[str, ClusterNode] = {}
    for key in keys:
        node = redis.get_node_from_key(key)
        if node is not None:
            found.setdefault(node.name, node)
    return list(found.values())
