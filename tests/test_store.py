"""The Redis store against a real server: atomic commits, indexes, outbox, expiry."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from mediator.core.state import StepState, StepStatus, WorkflowState, evolve
from mediator.errors import CorruptState
from mediator.runtime.messages import frame, unframe
from mediator.storage.keys import Keys
from mediator.storage.store import Commit, CommitOutcome, Store, Tombstone
from tests.engine_harness import NOW, started
from topics import WorkflowStatus


@pytest.fixture
def store(redis_client: Redis, key_prefix: str) -> Store:
    return Store(redis_client, Keys(key_prefix, 4), retention_ms=60_000, lease_ms=1_000)


def finished(state: WorkflowState, rev: int) -> WorkflowState:
    return evolve(state, status=WorkflowStatus.COMPLETED, finished_ms=NOW + 5, rev=rev)


async def test_create_is_idempotent_and_revisions_guard_updates(store: Store) -> None:
    state = started("wf-1")
    [created] = await store.commit_many([Commit(state, 0, counters={"x": 1})], NOW)
    [again] = await store.commit_many([Commit(state, 0, counters={"x": 1})], NOW)
    assert created.outcome is CommitOutcome.COMMITTED
    assert again.outcome is CommitOutcome.EXISTS and again.current == state

    moved = evolve(
        state,
        rev=2,
        steps={**state.steps, "a": evolve(state.steps["a"], status=StepStatus.COMPLETED)},
    )
    [stale] = await store.commit_many([Commit(evolve(moved, rev=5), 4)], NOW)
    [ok] = await store.commit_many([Commit(moved, 1)], NOW)
    [lost_race] = await store.commit_many([Commit(moved, 1)], NOW)
    assert stale.outcome is CommitOutcome.CONFLICT and stale.current == state
    assert ok.outcome is CommitOutcome.COMMITTED
    assert lost_race.outcome is CommitOutcome.CONFLICT and lost_race.current == moved
    assert await store.load("wf-1") == moved
    counters = await store.redis.hgetall(store.keys.counters(store.keys.shard_of("wf-1")))
    assert counters == {b"x": b"1"}  # the refused create counted nothing


async def test_a_revision_rolled_back_by_a_failover_is_not_taken_for_the_lost_one(
    store: Store,
) -> None:
    """A Redis failover that loses the latest writes puts a run back at an older
    revision; the next commit writes that revision number again, with another state. A
    replica holding the lost state (its cache) must not commit on top of the new one as if
    nothing had happened: the revision number matches, the stamp does not."""
    redis, key = store.redis, store.keys.workflow("wf-fo")
    state = evolve(started("wf-fo"), stamp="s1")
    await store.commit_many([Commit(state, 0)], NOW)
    before_loss = await redis.dump(key)
    a_done = {**state.steps, "a": evolve(state.steps["a"], status=StepStatus.COMPLETED)}
    lost = evolve(state, rev=2, steps=a_done, stamp="s2")
    [ok] = await store.commit_many([Commit(lost, 1, expected_stamp=state.stamp)], NOW)
    assert ok.outcome is CommitOutcome.COMMITTED
    await redis.restore(key, 0, before_loss, replace=True)  # the failover
    a_failed = {**state.steps, "a": evolve(state.steps["a"], status=StepStatus.FAILED)}
    other = evolve(state, rev=2, steps=a_failed, stamp="s3")
    [ok] = await store.commit_many([Commit(other, 1, expected_stamp=state.stamp)], NOW)
    assert ok.outcome is CommitOutcome.COMMITTED
    on_lost = evolve(lost, rev=3, status=WorkflowStatus.COMPLETED, finished_ms=NOW + 5, stamp="s4")
    [stale] = await store.commit_many([Commit(on_lost, 2, expected_stamp=lost.stamp)], NOW)
    assert stale.outcome is CommitOutcome.CONFLICT and stale.current == other
    assert await store.load("wf-fo") == other


async def test_a_run_with_thousands_of_steps_and_messages_is_written_whole(store: Store) -> None:
    # The script writes a run's fields, and its outbox entries, with as few calls as it
    # can: more than one call's worth (Lua's unpack is bounded) must all arrive.
    state = started("wf-big")
    steps = {f"s{i}": StepState(StepStatus.RUNNING, attempt=1) for i in range(4_500)}
    big = evolve(state, steps=steps)
    outbox = [(f"m{i}", frame("t", b"k", b"v%d" % i, [])) for i in range(4_500)]
    [created] = await store.commit_many([Commit(big, 0, outbox)], NOW)
    assert created.outcome is CommitOutcome.COMMITTED
    loaded = await store.load("wf-big")
    assert loaded is not None and loaded.steps == steps and list(loaded.steps) == list(steps)
    shard = store.keys.shard_of("wf-big")
    assert await store.redis.hlen(store.keys.outbox(shard)) == 4_500
    assert await store.redis.zcard(store.keys.outbox_due(shard)) == 4_500
    stored = await store.redis.hget(store.keys.outbox(shard), "m4499")
    assert stored is not None and unframe(shard, "m4499", stored).value == b"v4499"


async def test_a_batch_spanning_shards_commits_each_in_order(store: Store) -> None:
    states = [started(f"wf-{n}") for n in range(20)]
    assert len({store.keys.shard_of(s.workflow_id) for s in states}) > 1
    results = await store.commit_many([Commit(s, 0) for s in states], NOW)
    assert [r.outcome for r in results] == [CommitOutcome.COMMITTED] * 20
    loaded = await store.load_many([s.workflow_id for s in states])
    assert loaded == {s.workflow_id: s for s in states}


async def test_a_batch_over_every_shard_writes_each_run_to_its_own_shards_keys(
    store: Store,
) -> None:
    """One batch spanning every shard, twice (created, then finished): each run's indexes,
    outbox entries, timers, routed members and counters land in its own shard's keys, and
    each result answers its own commit, a conflict among them included."""
    keys = store.keys
    states = [started(f"wf-s{n}", name=f"w{n % 3}") for n in range(24)]
    shards = {s.workflow_id: keys.shard_of(s.workflow_id) for s in states}
    assert set(shards.values()) == set(range(keys.shards))
    creates = [
        Commit(s, 0, outbox=[(f"{s.workflow_id}.m", b"frame")], counters={"runs": 1},
               timers=[(f"deadline|{s.workflow_id}", 60_000)],
               routed=[("+", f"svc|i1|{s.workflow_id}")])
        for s in states
    ]  # fmt: skip
    created = await store.commit_many(creates, NOW)
    assert [r.outcome for r in created] == [CommitOutcome.COMMITTED] * 24
    ends = [
        evolve(s, status=WorkflowStatus.COMPLETED if n % 2 else WorkflowStatus.FAILED,
               finished_ms=NOW + 5, rev=2)
        for n, s in enumerate(states)
    ]  # fmt: skip
    stale = evolve(states[5], rev=9)  # a revision that moved on: a conflict
    finishing = [Commit(e, 1, cleared=[f"deadline|{e.workflow_id}"]) for e in ends[:5]]
    finishing += [Commit(stale, 8), *(Commit(e, 1) for e in ends[6:])]
    done = await store.commit_many(finishing, NOW + 5)
    assert [r.outcome for r in done] == [CommitOutcome.COMMITTED] * 5 + [CommitOutcome.CONFLICT] + [
        CommitOutcome.COMMITTED
    ] * 18
    assert done[5].current == states[5]
    for shard in range(keys.shards):
        mine = {wid for wid, at in shards.items() if at == shard}
        ended = {e.workflow_id: e.status.value for e in ends if e.workflow_id in mine}
        ended.pop(states[5].workflow_id, None)
        running = await store.redis.zrange(keys.status_index(shard, "running"), 0, -1)
        assert {m.decode() for m in running} == mine - set(ended)
        for status in ("completed", "failed"):
            index = await store.redis.zrange(keys.status_index(shard, status), 0, -1)
            assert {m.decode() for m in index} == {w for w, st in ended.items() if st == status}
        outbox = await store.redis.hkeys(keys.outbox(shard))
        assert {m.decode() for m in outbox} == {f"{wid}.m" for wid in mine}
        timers = await store.redis.zrange(keys.timers(shard), 0, -1)
        cleared = {e.workflow_id for e in ends[:5]}
        assert {t.decode() for t in timers} == {f"deadline|{w}" for w in mine - cleared}
        routed = await store.redis.zrange(keys.routed(shard), 0, -1)
        assert {m.decode() for m in routed} == {f"svc|i1|{wid}" for wid in mine}
        assert await store.redis.hget(keys.counters(shard), "runs") == str(len(mine)).encode()


async def test_indexes_follow_the_status_and_finished_runs_expire(store: Store) -> None:
    keys = store.keys
    state = started("wf-idx", name="orders")
    shard = keys.shard_of("wf-idx")
    await store.commit_many([Commit(state, 0)], NOW)
    assert await store.redis.zscore(keys.status_index(shard, "running"), "wf-idx") == NOW
    assert await store.redis.zscore(keys.name_index(shard, "orders"), "wf-idx") == NOW
    assert await store.redis.pttl(keys.workflow("wf-idx")) == -1  # running: kept

    await store.commit_many([Commit(finished(state, 2), 1)], NOW + 5)
    assert await store.redis.zscore(keys.status_index(shard, "running"), "wf-idx") is None
    assert await store.redis.zscore(keys.status_index(shard, "completed"), "wf-idx") == NOW + 5
    assert await store.redis.zscore(keys.recent(shard), "wf-idx") == NOW + 5
    assert 0 < await store.redis.pttl(keys.workflow("wf-idx")) <= 60_000
    fields = await store.redis.hmget(keys.workflow("wf-idx"), "rev", "status", "workflow")
    assert fields == [b"2", b"completed", b"orders"]


async def test_outbox_entries_are_leased_on_the_redis_clock_then_claimable_until_done(
    store: Store,
) -> None:
    # NOW is far from this machine's clock: leases must not depend on the replica's clock.
    state = started("wf-out")
    shard = store.keys.shard_of("wf-out")
    data = frame("svc.a", b"wf-out", b'{"v":1}', [("h", b"1")])
    [result] = await store.commit_many([Commit(state, 0, outbox=[("wf-out.a.1", data)])], NOW)
    server_ms = int((await store.redis.time())[0]) * 1000
    assert 0 < result.lease - server_ms <= 2_000

    assert (await store.claim_expired(shard, 10))[1] == []  # still leased
    await asyncio.sleep(1.1)
    lease, [(mid, claimed)] = await store.claim_expired(shard, 10)
    assert mid == "wf-out.a.1" and lease > result.lease
    message = unframe(shard, mid, claimed)
    assert (message.topic, message.key, message.value, message.headers) == (
        "svc.a",
        b"wf-out",
        b'{"v":1}',
        [("h", b"1")],
    )
    assert (await store.claim_expired(shard, 10))[1] == []  # re-leased by the claim
    assert await store.outbox_size() == 1
    await store.outbox_done([(shard, mid)])
    assert await store.outbox_size() == 0


async def test_a_lease_taken_over_is_no_longer_held_by_its_first_owner(store: Store) -> None:
    shard = store.keys.shard_of("wf-fence")
    data = frame("svc.a", None, b"{}", [])
    [first] = await store.commit_many(
        [Commit(started("wf-fence"), 0, outbox=[("wf-fence.a.1", data)])], NOW
    )
    _, still = await store.renew(shard, [("wf-fence.a.1", first.lease)])
    assert still == [True]  # renewing moves the deadline: read it back
    renewed = int(await store.redis.zscore(store.keys.outbox_due(shard), "wf-fence.a.1") or 0)
    await asyncio.sleep(1.1)
    claimed, _ = await store.claim_expired(shard, 10)  # another replica takes it over

    _, stale = await store.renew(shard, [("wf-fence.a.1", renewed)])
    _, fresh = await store.renew(shard, [("wf-fence.a.1", claimed)])
    assert (stale, fresh) == ([False], [True])
    await store.outbox_done([(shard, "wf-fence.a.1")])
    assert (await store.renew(shard, [("wf-fence.a.1", claimed)]))[1] == [False]


async def test_the_name_index_never_trims_a_run_that_is_still_running(store: Store) -> None:
    keys = store.keys
    old_running = started("wf-old-run", name="orders")
    old_done = started("wf-old-done", name="orders")
    shard = keys.shard_of("wf-old-run")
    long_ago = NOW - 3 * store.retention_ms
    await store.commit_many([Commit(old_running, 0), Commit(old_done, 0)], long_ago)
    await store.commit_many([Commit(finished(old_done, 2), 1)], long_ago + 1)
    # Something finishes now: the index is trimmed to the retention window.
    fresh = started("wf-new", name="orders")
    await store.commit_many([Commit(fresh, 0)], NOW)
    await store.commit_many([Commit(finished(fresh, 2), 1)], NOW)

    index = {k.decode() for k in await store.redis.zrange(keys.name_index(shard, "orders"), 0, -1)}
    assert "wf-old-run" in index
    if keys.shard_of("wf-old-done") == keys.shard_of("wf-new"):
        done_index = keys.name_index(keys.shard_of("wf-old-done"), "orders")
        assert await store.redis.zscore(done_index, "wf-old-done") is None


async def test_a_finished_run_leaves_a_tombstone_that_outlives_its_state(
    redis_client: Redis, key_prefix: str
) -> None:
    store = Store(redis_client, Keys(key_prefix, 4), retention_ms=60_000, tombstone_ms=60_000)
    state = evolve(started("wf-tomb"), fingerprint="fp1", origin="req/0/7")
    await store.commit_many([Commit(state, 0)], NOW)
    await store.commit_many([Commit(finished(state, 2), 1)], NOW + 5)
    ttl = await redis_client.pttl(store.keys.tombstone("wf-tomb"))
    assert 60_000 < ttl <= 120_000
    await redis_client.delete(store.keys.workflow("wf-tomb"))  # the state expired

    [again] = await store.commit_many([Commit(evolve(state, origin="req/1/3"), 0)], NOW + 10)

    assert again.outcome is CommitOutcome.FINISHED
    assert again.tombstone == Tombstone("fp1", "req/0/7", "completed", NOW + 5)
    assert await store.load("wf-tomb") is None  # not run again


async def test_a_state_that_no_longer_decodes_is_a_permanent_error(store: Store) -> None:
    await store.redis.hset(store.keys.workflow("wf-bad"), mapping={"rev": 1, "state": "{oops"})
    with pytest.raises(CorruptState, match="wf-bad"):
        await store.load("wf-bad")


async def test_commits_survive_a_script_cache_flush(store: Store) -> None:
    await store.commit_many([Commit(started("wf-f1"), 0)], NOW)
    await store.redis.script_flush()
    [result] = await store.commit_many([Commit(started("wf-f2"), 0)], NOW)
    assert result.outcome is CommitOutcome.COMMITTED
    assert await store.load("wf-f2") is not None


async def test_a_different_shard_count_for_the_same_prefix_is_refused(
    redis_client: Redis, key_prefix: str
) -> None:
    from mediator.errors import ConfigurationError

    await Store(redis_client, Keys(key_prefix, 4), retention_ms=1).check_layout()
    with pytest.raises(ConfigurationError, match=r"laid out with 4 shards .* configured with 8"):
        await Store(redis_client, Keys(key_prefix, 8), retention_ms=1).check_layout()
