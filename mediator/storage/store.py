"""The Redis store: workflow state, its indexes, the outbox and counters.

Each transition is committed by one Lua script guarded by the workflow's revision, so a
transition happens exactly once even when replicas race. Commits of a whole fetched batch
go out in one pipeline: one round trip for many workflows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from mediator.core.state import WorkflowState
from mediator.errors import ConfigurationError, StateUnavailable
from mediator.storage.cluster import nodes_of
from mediator.storage.commit import (
    Commit,
    CommitCodec,
    CommitOutcome,
    CommitResult,
    Tombstone,
    pairs,
    state_of,
    stored_whole,
)
from mediator.storage.connection import check_mode, lua_source, text
from mediator.storage.errors import redis_errors
from mediator.storage.keys import KEY_SCHEMA_VERSION, Keys
from mediator.storage.pipeline import pipelined

__all__ = ["Claimed", "Commit", "CommitOutcome", "CommitResult", "Store", "Tombstone"]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A timer claimed because it fell due: its name, how late it is (ms) and the lease
    deadline its claim gave it (its score now: removing it as stale checks that it still
    is, so a timer re-armed under the same name meanwhile stays)."""

    name: str
    late_ms: int
    lease: int


#: How long the outcome of an operator's control is kept.
CONTROL_OUTCOME_S = 24 * 3600


class Store:
    """Orchestration state in Redis, for one key prefix and shard count."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        retention_ms: int,
        recent_limit: int = 1000,
        lease_ms: int = 15_000,
        tombstone_ms: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        audit_limit: int = 0,
    ) -> None:
        self.redis = redis
        #: Entries kept in each run's audit log; 0: no audit log.
        self.audit_limit = audit_limit
        self.keys = keys
        self.retention_ms = retention_ms
        self.recent_limit = recent_limit
        self.lease_ms = lease_ms
        self.tombstone_ms = tombstone_ms
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._commit = redis.register_script(lua_source("commit.lua"))
        #: Runs read stored as one document (as before steps had fields of their own):
        #: their next commit writes every step (`CommitCodec.pack`).
        self._whole: set[str] = set()
        self._codec = CommitCodec(
            keys,
            retention_ms=retention_ms,
            recent_limit=recent_limit,
            lease_ms=lease_ms,
            tombstone_ms=tombstone_ms,
            audit_limit=audit_limit,
        )
        self._claim = redis.register_script(lua_source("claim.lua"))
        self._renew = redis.register_script(lua_source("renew.lua"))
        self._claim_timers = redis.register_script(lua_source("claim_timers.lua"))
        #: For each shard the last claim of timers polled: how long after it the earliest
        #: timer left there falls due (ms, Redis's clock; None: none left).
        self.timer_waits: dict[int, int | None] = {}
        #: The shards whose claim failed in the last claim of timers, with the error: none
        #: of their timers were claimed (the other shards' were).
        self.timer_failures: dict[int, Exception] = {}
        self._reroute = redis.register_script(lua_source("reroute.lua"))
        self._timers_done = redis.register_script(lua_source("timers_done.lua"))
        self._park_timer = redis.register_script(lua_source("park_timer.lua"))

    async def check_layout(self) -> None:
        """Record the key schema and shard count, or refuse a shard count that differs."""
        with redis_errors("checking the key layout"):
            await check_mode(self.redis)
            await self.redis.hsetnx(self.keys.meta, "shards", self.keys.shards)
            await self.redis.hsetnx(self.keys.meta, "schema", KEY_SCHEMA_VERSION)
            stored = await self.redis.hget(self.keys.meta, "shards")
        if stored is not None and int(stored) != self.keys.shards:
            msg = (
                f"Redis prefix {self.keys.prefix!r} was laid out with {int(stored)} shards but "
                f"this replica is configured with {self.keys.shards}; set "
                f"MEDIATOR_REDIS__SHARDS={int(stored)} or use another key prefix"
            )
            raise ConfigurationError(msg)

    async def load_many(self, workflow_ids: Sequence[str]) -> dict[str, WorkflowState | None]:
        """The current state of each workflow (None if unknown or expired); one round trip."""
        if not workflow_ids:
            return {}
        with redis_errors("loading state"):
            replies = await pipelined(
                self.redis,
                [("HGETALL", self.keys.workflow(wid)) for wid in workflow_ids],
                raise_on_error=True,
            )
        found: dict[str, WorkflowState | None] = {}
        for wid, reply in zip(workflow_ids, replies, strict=True):
            fields = pairs(reply)
            self._note_form(wid, fields)
            found[wid] = state_of(wid, fields)
        return found

    def _note_form(self, workflow_id: str, fields: Mapping[bytes, bytes]) -> None:
        """Remember the runs stored as one document: their next commit writes them whole."""
        if stored_whole(fields):
            if len(self._whole) > 10_000:  # a lost mark costs a refused commit, no more
                self._whole.clear()
            self._whole.add(workflow_id)
        else:
            self._whole.discard(workflow_id)

    async def load(self, workflow_id: str) -> WorkflowState | None:
        """The current state of one workflow."""
        return (await self.load_many([workflow_id]))[workflow_id]

    async def commit_many(self, commits: Sequence[Commit], now_ms: int) -> list[CommitResult]:
        """Commit transitions in one round trip: one script call per shard touched.

        Each transition is atomic on its own and applied in the order given.
        """
        if not commits:
            return []
        by_shard: dict[int, list[int]] = {}
        for index, commit in enumerate(commits):
            by_shard.setdefault(self.keys.shard_of(commit.state.workflow_id), []).append(index)
        shards = list(by_shard)
        batches = [[commits[i] for i in by_shard[shard]] for shard in shards]
        calls = [
            self._codec.pack(shard, batch, now_ms, self._whole)
            for shard, batch in zip(shards, batches, strict=True)
        ]
        with redis_errors("committing"):
            replies = await self._evalsha_many(self._commit, calls, wait=self.wait_replicas > 0)
        results: list[CommitResult | None] = [None] * len(commits)
        for shard, batch, reply in zip(shards, batches, replies, strict=True):
            if isinstance(reply, Exception):
                msg = f"commit script failed: {reply}"
                raise StateUnavailable(msg)
            for index, result in zip(
                by_shard[shard], self._codec.unpack(batch, reply), strict=True
            ):
                results[index] = result
                wid = commits[index].state.workflow_id
                if result.whole:
                    self._whole.add(wid)
                elif result.outcome is CommitOutcome.COMMITTED:
                    self._whole.discard(wid)
        return [r for r in results if r is not None]

    async def _evalsha_many(
        self,
        script: AsyncScript,
        calls: Sequence[tuple[list[str], list[Any]]],
        *,
        wait: bool = False,
    ) -> list[Any]:
        """Run `script` once per call in one pipeline, by SHA.

        redis-py's `Script` object would first ask `SCRIPT EXISTS` on every pipeline, a
        second round trip; instead, load the script only when Redis says it lacks it (after
        a restart or `SCRIPT FLUSH`) and re-run just those calls.
        """
        replies = await self._pipeline_evalsha(script.sha, calls, wait)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.redis.script_load(script.script)
            again = await self._pipeline_evalsha(script.sha, [calls[i] for i in missing], wait)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline_evalsha(
        self, sha: str, calls: Sequence[tuple[list[str], list[Any]]], wait: bool
    ) -> list[Any]:
        commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        if not wait:
            return await pipelined(self.redis, commands)
        # WAIT on the connection that wrote: it counts replicas that have every write this
        # connection made so far. On a cluster, one WAIT per primary written to, each sent
        # with that primary's calls (the client sends each primary's share of a pipeline on
        # one connection).
        nodes = await nodes_of(self.redis, [keys[0] for keys, _ in calls])
        if nodes is None:
            wait_for = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
            replies = await pipelined(self.redis, [*commands, wait_for])
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                for node in nodes:
                    pipe.execute_command(
                        "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
                    )
                replies = list(await pipe.execute(raise_on_error=False))
        waited = len(nodes) if nodes is not None else 1
        acks, replies = replies[len(replies) - waited :], replies[: len(replies) - waited]
        short = [a for a in acks if isinstance(a, Exception) or int(a) < self.wait_replicas]
        if short:
            acked = short[0]
            msg = (
                f"only {acked} of {self.wait_replicas} Redis replicas acknowledged the "
                f"commit within {self.wait_timeout_ms} ms; the batch will be redelivered"
            )
            raise StateUnavailable(msg)
        return replies

    # -- outbox ----------------------------------------------------------------------------

    async def outbox_done(self, entries: Sequence[tuple[int, str]]) -> None:
        """Forget outbox entries (shard, id) once Kafka acknowledged them."""
        if not entries:
            return
        by_shard: dict[int, list[str]] = {}
        for shard, message_id in entries:
            by_shard.setdefault(shard, []).append(message_id)
        commands: list[tuple[Any, ...]] = []
        for shard, ids in by_shard.items():
            commands += (
                ("HDEL", self.keys.outbox(shard), *ids),
                ("ZREM", self.keys.outbox_due(shard), *ids),
            )
        with redis_errors("clearing the outbox"):
            await pipelined(self.redis, commands, raise_on_error=True)

    async def claim_expired(self, shard: int, limit: int) -> tuple[int, list[tuple[str, bytes]]]:
        """Take over outbox entries whose lease expired (their publisher died or stalled),
        oldest first; returns the new lease deadline and the entries."""
        with redis_errors("claiming the outbox"):
            flat = await self._claim(
                keys=[self.keys.outbox(shard), self.keys.outbox_due(shard)],
                args=[self.lease_ms, limit],
            )
        entries = [(text(flat[i]), bytes(flat[i + 1])) for i in range(1, len(flat), 2)]
        return int(flat[0]), entries

    async def renew(
        self, shard: int, held: Sequence[tuple[str, int]], *, delay_ms: int | None = None
    ) -> tuple[int, list[bool]]:
        """Fencing: for each (id, lease deadline) this replica was given, whether it still
        holds the entry. Held entries get a new lease, or with `delay_ms` are re-scheduled
        that far ahead (a retry). Returns the new deadline and one flag per entry."""
        if not held:
            return 0, []
        args: list[Any] = [0 if delay_ms is not None else self.lease_ms, delay_ms or 0]
        for message_id, deadline in held:
            args += (message_id, deadline)
        with redis_errors("renewing outbox leases"):
            flat = await self._renew(
                keys=[self.keys.outbox(shard), self.keys.outbox_due(shard)], args=args
            )
        return int(flat[0]), [bool(int(flag)) for flag in flat[1:]]

    # -- timers ----------------------------------------------------------------------------

    async def claim_timers(
        self, limit: int, lease_ms: int, shards: Sequence[int] | None = None
    ) -> dict[int, list[Claimed]]:
        """Claim the timers that fell due in `shards` (default: every shard; one round trip
        for all of them): each claimed timer is leased for `lease_ms` and returned with its
        lateness in ms. Sets `timer_waits`, and `timer_failures` for the shards whose claim
        failed on its own (a cluster primary out of memory, a key of the wrong type): the
        timers claimed in the others are returned all the same, so one bad shard holds up
        no other. Raises `StateUnavailable` only when Redis could not be asked at all."""
        polled = range(self.keys.shards) if shards is None else shards
        calls = [([self.keys.timers(shard)], [lease_ms, limit]) for shard in polled]
        with redis_errors("claiming timers"):
            replies = await self._evalsha_many(self._claim_timers, calls)
        claimed: dict[int, list[Claimed]] = {}
        waits: dict[int, int | None] = {}
        failures: dict[int, Exception] = {}
        for shard, reply in zip(polled, replies, strict=True):
            if isinstance(reply, Exception):
                failures[shard] = StateUnavailable(f"claiming the timers of shard {shard}: {reply}")
                continue
            now, following = int(reply[0]), int(float(reply[1]))
            waits[shard] = max(0, following - now) if following >= 0 else None
            due = [
                Claimed(text(reply[i]), now - int(float(reply[i + 1])), now + lease_ms)
                for i in range(2, len(reply), 2)
            ]
            if due:
                claimed[shard] = due
        self.timer_waits, self.timer_failures = waits, failures
        return claimed

    async def reroute_instance(self, prefix: str, batch: int = 1000) -> int:
        """Hand on every step attempt in flight on the instance whose routed-index members
        start with `prefix` (`mediator.core.routing.instance_prefix`): each becomes a
        ``reroute`` timer due now, in every shard. How many were handed on."""
        total = 0
        shards = list(range(self.keys.shards))
        while shards:
            calls = [([self.keys.routed(s), self.keys.timers(s)], [prefix, batch]) for s in shards]
            with redis_errors("rerouting"):
                replies = await self._evalsha_many(self._reroute, calls)
            more = []
            for shard, reply in zip(shards, replies, strict=True):
                if isinstance(reply, Exception):
                    msg = f"reroute script failed: {reply}"
                    raise StateUnavailable(msg)
                total += int(reply)
                if int(reply) >= batch:
                    more.append(shard)
            shards = more
        return total

    async def timers_done(self, done: Sequence[tuple[int, Claimed]]) -> None:
        """Remove timers (shard, claimed timer) that fired and changed nothing (their step
        had moved on, their run is gone, or the name is not one the engine sets), each only
        while it is still as claimed: never one re-armed under the same name since."""
        if not done:
            return
        by_shard: dict[int, list[Any]] = {}
        for shard, timer in done:
            by_shard.setdefault(shard, []).extend((timer.name, timer.lease))
        calls = [([self.keys.timers(shard)], args) for shard, args in by_shard.items()]
        with redis_errors("removing timers"):
            replies = await self._evalsha_many(self._timers_done, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                msg = f"removing timers failed: {reply}"
                raise StateUnavailable(msg)

    async def park_timer(self, shard: int, timer: Claimed, reason: str, now_ms: int) -> bool:
        """Take a timer that cannot be applied out of the timer set, into the shard's
        dead-timer hash with `reason` (`Keys.dead_timers`); False if it was re-armed or
        removed meanwhile (nothing to park)."""
        record = orjson.dumps({"reason": reason, "parked_ms": now_ms})
        keys = [self.keys.timers(shard), self.keys.dead_timers(shard)]
        with redis_errors("parking a timer"):
            parked = await self._park_timer(keys=keys, args=[timer.name, timer.lease, record])
        return bool(int(parked))

    async def count(self, deltas: dict[str, int]) -> None:
        """Add to the deployment-wide counters (`Keys.stats`); best effort."""
        if not deltas:
            return
        with redis_errors("counting"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, delta in deltas.items():
                    pipe.hincrby(self.keys.stats, name, delta)
                await pipe.execute()

    async def control_outcomes(self, outcomes: Mapping[str, tuple[bool, str]], now_ms: int) -> None:
        """Record what became of operators' controls, by control id, for a day: the first
        outcome of each stays (a redelivered cancel, found not to apply to the run it
        cancelled, does not hide that it was applied)."""
        with redis_errors("recording control outcomes"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for control_id, (applied, detail) in outcomes.items():
                    doc = orjson.dumps({"applied": applied, "detail": detail, "at_ms": now_ms})
                    pipe.set(self.keys.control(control_id), doc, nx=True, ex=CONTROL_OUTCOME_S)
                await pipe.execute()

    async def outbox_size(self) -> int:
        """Entries waiting in the outbox across all shards."""
        with redis_errors("measuring the outbox"):
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in range(self.keys.shards):
                    pipe.zcard(self.keys.outbox_due(shard))
                sizes = await pipe.execute()
        return sum(int(n) for n in sizes)
