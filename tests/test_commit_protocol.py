"""The commit protocol against a real Redis: batches of transitions carrying every kind of
change at once (outbox, counters, timers set and cleared, parked steps, routes, audit
entries), some refused by their guard, land exactly as a model of ``commit.lua`` says.

Every key under the test's prefix is read back after the commit and compared with the
model applied to what was there before, so a change written twice, to the wrong key, or
not at all fails, and so does a write by a refused transition.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from mediator.core.engine import Engine
from mediator.core.state import WorkflowState, dumps, dumps_header, dumps_step, evolve
from mediator.storage.keys import Keys
from mediator.storage.store import Commit, CommitOutcome, CommitResult, Store, Tombstone
from tests.engine_harness import make, step
from topics import RequestEvent, WorkflowStatus
from topics.events import TERMINAL

NOW = 1_800_000_000_000
RETENTION_MS = 60_000
LEASE_MS = 1_000
TIMERS = ("t1", "t2", "t3")
SERVICES = ("svc1", "svc2")
MEMBERS = ("m1", "m2", "m3")
#: What each transition finds stored: nothing, a live run, a finished run, only the
#: tombstone of a finished run whose state expired (nothing, when tombstones are off), or
#: a live run stored as one document (as runs were before steps had fields of their own).
PRIORS = ("none", "live", "finished", "expired", "legacy")
#: How it is guarded: as a create, on the stored revision and stamp, on the revision
#: alone, on a revision that moved on, or on a stamp another commit wrote.
GUARDS = ("create", "ok", "any_stamp", "stale_rev", "stale_stamp")


@dataclass(frozen=True)
class Case:
    prior: str
    guard: str
    status: WorkflowStatus
    name: str
    fingerprint: str
    frames: list[bytes]
    counters: dict[str, int]
    timers: list[tuple[str, int]]
    cleared: list[str]
    parked: list[tuple[str, str, str]]
    routed: list[tuple[str, str]]
    audit: list[bytes]
    #: Written as a change from the state found (only the steps that changed), or whole.
    delta: bool
    #: Its step changes (else only the run's header does).
    touch: bool


cases = st.builds(
    Case,
    prior=st.sampled_from(PRIORS),
    guard=st.sampled_from(GUARDS),
    status=st.sampled_from(list(WorkflowStatus)),
    name=st.sampled_from(["alpha", "beta"]),
    fingerprint=st.text(max_size=6),
    frames=st.lists(st.binary(max_size=40), max_size=3),
    counters=st.dictionaries(st.sampled_from(["a", "b", "svc:x:sent"]), st.integers(-9, 9)),
    timers=st.lists(st.tuples(st.sampled_from(TIMERS), st.integers(0, 9_999)), max_size=3),
    cleared=st.lists(st.sampled_from(TIMERS), max_size=2),
    parked=st.lists(
        st.tuples(st.sampled_from("+-"), st.sampled_from(SERVICES), st.sampled_from(TIMERS)),
        max_size=3,
    ),
    routed=st.lists(st.tuples(st.sampled_from("+-"), st.sampled_from(MEMBERS)), max_size=3),
    audit=st.lists(st.binary(max_size=20), max_size=3),
    delta=st.booleans(),
    touch=st.booleans(),
)


def run(wid: str, name: str) -> WorkflowState:
    workflow = make(step("a"), name=name)
    request = RequestEvent(request_id=f"req-{wid}", workflow=name)
    return Engine("r").start(workflow, request, wid, NOW).state


async def contents(redis: Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under `prefix`: hashes as dicts, sorted sets as {member: score},
    streams as their entries' fields in order."""
    found: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        kind = await redis.type(key)
        if kind == b"hash":
            found[key] = await redis.hgetall(key)
        elif kind == b"zset":
            found[key] = dict(await redis.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            found[key] = [fields for _, fields in await redis.xrange(key)]
        else:
            msg = f"{key!r} is a {kind!r}"
            raise AssertionError(msg)
    return found


async def ttls(redis: Redis, names: Any) -> dict[bytes, int]:
    return {key: int(await redis.pttl(key)) for key in names}


class Model:
    """What ``commit.lua`` does to the keys, written out plainly."""

    def __init__(self, keys: Keys, before: dict[bytes, Any], had_ttl: dict[bytes, int]) -> None:
        self.keys = keys
        self.data = {key: value.copy() for key, value in before.items()}
        #: key -> expiry set by the commit (ms), "kept" (an expiry from before), None.
        self.ttl: dict[bytes, Any] = {k: "kept" if ms > 0 else None for k, ms in had_ttl.items()}

    def zset(self, key: str) -> dict[bytes, float]:
        return self.data.setdefault(key.encode(), {})  # type: ignore[no-any-return]

    def hash(self, key: str) -> dict[bytes, bytes]:
        return self.data.setdefault(key.encode(), {})  # type: ignore[no-any-return]

    def expire(self, key: str, ms: int | None) -> None:
        if key.encode() in self.data:
            self.ttl[key.encode()] = ms

    def commit(self, commit: Commit, now: int, server_now: int, store: Store) -> None:
        self.run(commit, now, store)
        self.changes(commit, server_now, store)

    def run_hash(self, commit: Commit, now: int) -> None:
        """The run's own hash: a live run as a header and a field per step written, a
        finished one as one document."""
        state = commit.state
        run_hash = self.hash(self.keys.workflow(state.workflow_id))
        run_hash.update(
            {
                b"rev": b"%d" % (commit.expected_rev + 1),
                b"stamp": (state.stamp or "").encode(),
                b"status": state.status.encode(),
                b"workflow": state.workflow.encode(),
                b"updated_ms": b"%d" % now,
            }
        )
        base = commit.base
        if state.status in TERMINAL:
            run_hash[b"state"] = dumps(state)
            for name in [n for n in run_hash if n in (b"layout", b"order") or n[:2] == b"s:"]:
                del run_hash[name]
            return
        run_hash[b"state"] = dumps_header(state)
        run_hash[b"layout"] = b"2"
        for sid, step_state in state.steps.items():
            if base is None or base.steps.get(sid) is not step_state:
                run_hash[b"s:" + sid.encode()] = dumps_step(step_state)
        if base is None:
            run_hash[b"order"] = orjson.dumps(list(state.steps))

    def run(self, commit: Commit, now: int, store: Store) -> None:
        """The run's hash, its indexes, its expiry and its tombstone."""
        keys, state, wid = self.keys, commit.state, commit.state.workflow_id
        running, horizon = self.zset(keys.status_index(0, "running")), now - RETENTION_MS
        indexes = {s: self.zset(keys.status_index(0, s)) for s in ("completed", "failed")}
        stored = self.data.get(keys.workflow(wid).encode(), {})
        was_finished = stored.get(b"status", b"running").decode() in TERMINAL
        self.run_hash(commit, now)
        name_index = self.zset(keys.name_index(0, state.workflow))
        if commit.expected_rev == 0:
            name_index[wid.encode()] = now
        if state.status not in TERMINAL:
            running[wid.encode()] = now
            if stored and was_finished:
                self.expire(keys.workflow(wid), None)
                self.expire(keys.audit(wid), None)
                for index in indexes.values():
                    index.pop(wid.encode(), None)
        else:
            running.pop(wid.encode(), None)
            index = "completed" if state.status is WorkflowStatus.COMPLETED else "failed"
            indexes[index][wid.encode()] = now
            self.zset(keys.recent(0))[wid.encode()] = now
            self.expire(keys.workflow(wid), RETENTION_MS)
            if store.tombstone_ms:
                self.hash(keys.tombstone(wid)).update(
                    {
                        b"fingerprint": (state.fingerprint or "").encode(),
                        b"origin": (state.origin or "").encode(),
                        b"status": state.status.encode(),
                        b"finished_ms": b"%d" % now,
                    }
                )
                self.expire(keys.tombstone(wid), RETENTION_MS + store.tombstone_ms)
            old = sorted((score, m) for m, score in name_index.items() if score <= horizon)
            for _, member in old[:64]:
                if member not in running:
                    del name_index[member]

    def changes(self, commit: Commit, server_now: int, store: Store) -> None:
        """Outbox, counters, timers, parked queues, routed index and audit stream."""
        keys, state, wid = self.keys, commit.state, commit.state.workflow_id
        for message_id, frame in commit.outbox:
            self.hash(keys.outbox(0))[message_id.encode()] = frame
            self.zset(keys.outbox_due(0))[message_id.encode()] = server_now + LEASE_MS
        counters = self.hash(keys.counters(0))
        for field, delta in commit.counters.items():
            counters[field.encode()] = b"%d" % (int(counters.get(field.encode(), 0)) + delta)
        timers = self.zset(keys.timers(0))
        for name in commit.cleared:
            timers.pop(name.encode(), None)
        for name, delay in commit.timers:
            timers[name.encode()] = server_now + delay
        for op, service, name in commit.parked:
            queue = self.zset(keys.parked(0, service))
            if op == "+":
                queue.setdefault(name.encode(), server_now)
            else:
                queue.pop(name.encode(), None)
        routed = self.zset(keys.routed(0))
        for op, member in commit.routed:
            if op == "+":
                routed[member.encode()] = 0
            else:
                routed.pop(member.encode(), None)
        if store.audit_limit and commit.audit:
            stream = self.data.setdefault(keys.audit(wid).encode(), [])
            stream += [{b"e": entry} for entry in commit.audit]
            del stream[: -store.audit_limit]
            if state.status in TERMINAL:
                self.expire(keys.audit(wid), RETENTION_MS)

    def trim(self, recent_limit: int, now: int) -> None:
        """What a call with a finished run in it does last."""
        for index in ("completed", "failed"):
            zset = self.zset(self.keys.status_index(0, index))
            for member in [m for m, score in zset.items() if score <= now - RETENTION_MS]:
                del zset[member]
        recent = self.zset(self.keys.recent(0))
        for member, _ in sorted(recent.items(), key=lambda m: (m[1], m[0]))[:-recent_limit]:
            del recent[member]

    def result(self) -> dict[bytes, Any]:
        return {key: value for key, value in self.data.items() if value}


async def prepare(store: Store, wid: str, case: Case, then: int) -> WorkflowState | None:
    """Store what `case` finds (at `then`); the state it finds, if any."""
    if case.prior == "none":
        return None
    state = evolve(run(wid, case.name), rev=1, stamp=f"old-{wid}", origin="topic/0/7")
    if case.prior == "legacy":  # written before steps had fields: the whole state in one
        await store.redis.hset(
            store.keys.workflow(wid),
            mapping={"rev": 1, "stamp": state.stamp or "", "status": "running",
                     "workflow": state.workflow, "updated_ms": then, "state": dumps(state)},
        )  # fmt: skip
        return state
    if case.prior != "live":
        state = evolve(state, status=WorkflowStatus.FAILED, finished_ms=then)
    # An audit entry, so that a finished run's stream expires and a retried one's does not.
    [done] = await store.commit_many([Commit(state, 0, audit=[b"before"])], then)
    assert done.outcome is CommitOutcome.COMMITTED
    if case.prior == "expired":
        await store.redis.delete(store.keys.workflow(wid))
        return None
    return state


def transition(
    wid: str, case: Case, base: WorkflowState | None, audit: bool
) -> tuple[Commit, CommitResult | None]:
    """The commit `case` makes, and its result when the guard refuses it (None: it
    commits)."""
    guard = case.guard if base is not None else "create"
    rev = {"create": 0, "ok": 1, "any_stamp": 1, "stale_rev": 2, "stale_stamp": 1}[guard]
    stamp = {"any_stamp": None, "stale_stamp": "someone-else"}.get(guard, f"old-{wid}")
    state = evolve(
        base or run(wid, case.name),
        rev=rev + 1,
        status=case.status,
        stamp=f"new-{wid}",
        fingerprint=case.fingerprint,
        finished_ms=NOW if case.status in TERMINAL else None,
    )
    if case.touch:  # a step state replaced (the others are the base's own objects)
        state.steps = {**state.steps, "a": evolve(state.steps["a"], attempt=7)}
    delta = case.delta and base is not None
    commit = Commit(
        state,
        rev,
        outbox=[(f"{wid}.o{i}", frame) for i, frame in enumerate(case.frames)],
        counters=case.counters,
        timers=case.timers,
        cleared=case.cleared,
        parked=case.parked,
        routed=case.routed,
        audit=case.audit if audit else (),
        expected_stamp=None if rev == 0 else stamp,
        base=base if delta else None,
    )
    if base is None:
        return commit, None
    # Stored as one document: written before steps had fields, or finished.
    legacy = case.prior in ("legacy", "finished")
    if guard == "create":
        return commit, CommitResult(CommitOutcome.EXISTS, base, whole=legacy)
    if guard in ("stale_rev", "stale_stamp") or (legacy and delta and case.status not in TERMINAL):
        # A run stored whole is not written in part (a finished one is written whole):
        # refused, to be written whole.
        return commit, CommitResult(CommitOutcome.CONFLICT, base, whole=legacy)
    return commit, None


@given(
    batch=st.lists(cases, min_size=1, max_size=4),
    old=st.booleans(),
    recent_limit=st.integers(1, 3),
    tombstone_ms=st.sampled_from([0, 30_000]),
    audit_limit=st.integers(0, 2),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_a_batch_commits_exactly_what_the_model_says(
    redis_client: Redis,
    batch: list[Case],
    old: bool,
    recent_limit: int,
    tombstone_ms: int,
    audit_limit: int,
) -> None:
    prefix = f"cp{uuid.uuid4().hex[:10]}"
    keys = Keys(prefix, 1)  # one shard: the whole batch is one script call
    store = Store(
        redis_client,
        keys,
        retention_ms=RETENTION_MS,
        recent_limit=recent_limit,
        lease_ms=LEASE_MS,
        tombstone_ms=tombstone_ms,
        audit_limit=audit_limit,
    )
    # What the runs found was written long enough ago (`old`) to be trimmed, or just now.
    then = NOW - RETENTION_MS - 1 if old else NOW
    bases = [await prepare(store, f"w{i}", case, then) for i, case in enumerate(batch)]
    await redis_client.zadd(keys.timers(0), {"t1": 5, "t2": 6})
    await redis_client.zadd(keys.parked(0, "svc1"), {"t1": 1, "t3": 2})
    await redis_client.zadd(keys.routed(0), {"m1": 0, "m2": 0})
    before = await contents(redis_client, prefix)
    model = Model(keys, before, await ttls(redis_client, before))

    made = [
        transition(f"w{i}", case, base, bool(audit_limit))
        for i, (case, base) in enumerate(zip(batch, bases, strict=True))
    ]
    results = await store.commit_many([commit for commit, _ in made], NOW)

    leases = {r.lease for r in results if r.outcome is CommitOutcome.COMMITTED}
    assert len(leases) <= 1  # one call, one lease deadline
    server_now = leases.pop() - LEASE_MS if leases else 0
    if server_now:
        assert abs(server_now - time.time() * 1000) < 60_000  # Redis's clock, not `NOW`
    for i, ((commit, refused), result) in enumerate(zip(made, results, strict=True)):
        tombstone = before.get(keys.tombstone(f"w{i}").encode())
        if refused is not None:
            assert result == refused
        elif commit.expected_rev == 0 and tombstone and bases[i] is None:
            fingerprint = tombstone[b"fingerprint"].decode()
            found = Tombstone(fingerprint, "topic/0/7", "failed", then)
            assert result == CommitResult(CommitOutcome.FINISHED, tombstone=found)
        else:
            assert result.outcome is CommitOutcome.COMMITTED, (i, result)
            model.commit(commit, NOW, server_now, store)
    if any(
        r.outcome is CommitOutcome.COMMITTED and c.state.status in TERMINAL
        for (c, _), r in zip(made, results, strict=True)
    ):
        model.trim(recent_limit, NOW)

    after = await contents(redis_client, prefix)
    assert after == model.result()
    for key, ms in (await ttls(redis_client, after)).items():
        expected = model.ttl.get(key)
        if expected is None:
            assert ms == -1, key
        elif expected == "kept":
            assert ms > 0, key
        else:
            assert expected - 3_000 < ms <= expected, key
