"""Concurrency keys' slots against the real Redis: granted up to the limit, the rest
queued by priority then age (a new run never overtakes the queue), handed to the queue's
head as runs end; and the upkeep repairs what a crash left half done: a slot never
handed on, one held for a run that ended, a granted run whose admit timer was lost."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from mediator.clock import now_ms
from mediator.core.state import WorkflowState
from mediator.runtime.keyed import GRACE_MS, KeyUpkeep
from mediator.storage.keys import Keys
from mediator.storage.slots import Slots, slot_score
from topics.events import WorkflowStatus

T = 1_000_000


def _slots(redis: Redis, prefix: str) -> tuple[Slots, Keys]:
    keys = Keys(prefix, 4)
    return Slots(redis, keys), keys


async def _timers(redis: Redis, keys: Keys) -> set[str]:
    found = set()
    for shard in range(keys.shards):
        found |= {m.decode() for m in await redis.zrange(keys.timers(shard), 0, -1)}
    return found


async def test_slots_are_granted_up_to_the_limit_and_handed_on_in_queue_order(
    redis_client: Redis, key_prefix: str
) -> None:
    slots, keys = _slots(redis_client, key_prefix)
    runs = [("a|0", slot_score(0, T)), ("b|0", slot_score(0, T + 1))]
    assert await slots.acquire("wf", "k", 1, runs, T) == ({"a|0"}, set())
    # Recomputed (a conflict, a redelivery): the holder is told it holds one already.
    assert await slots.acquire("wf", "k", 1, runs, T + 2) == (set(), {"a|0"})
    # A later urgent run goes before `b`; none overtakes while the queue waits.
    await slots.acquire("wf", "k", 1, [("u|0", slot_score(9, T + 5))], T + 5)
    assert await slots.release("wf", "k", 1, ["a|0"], T + 10) == ["u|0"]
    assert "admit|u||0" in await _timers(redis_client, keys)
    [state] = await slots.known()
    assert (state.held, state.queued, state.oldest_ms) == (1, 1, T + 1)
    # A run that ends in the queue (cancelled) leaves it; the last slot frees.
    assert await slots.release("wf", "k", 1, ["b|0"], T + 11) == []
    assert await slots.release("wf", "k", 1, ["u|0"], T + 12) == []
    assert await slots.forget(state.digest)
    assert await slots.known() == []


class _Runs:
    """A state store holding some runs (the upkeep only loads them)."""

    def __init__(self, *states: WorkflowState) -> None:
        self.states = {s.workflow_id: s for s in states}

    async def load_many(self, ids: Any) -> dict[str, WorkflowState | None]:
        return {wid: self.states.get(wid) for wid in ids}


def _run(wid: str, status: WorkflowStatus, queued: bool = False) -> WorkflowState:
    return WorkflowState(
        workflow_id=wid,
        request_id=wid,
        workflow="wf",
        version=1,
        status=status,
        payload={},
        created_ms=T,
        updated_ms=T,
        concurrency_key="k",
        queued_ms=T if queued else None,
    )


async def test_the_upkeep_repairs_lost_releases_and_lost_admit_timers(
    redis_client: Redis, key_prefix: str
) -> None:
    slots, keys = _slots(redis_client, key_prefix)
    long_ago = T - GRACE_MS  # the slots below were granted long before the upkeep looks
    # `done` ended, but the replica that committed its end died before freeing its slot;
    # `lost` was granted a slot but its admit timer was never set; `next` waits.
    await slots.acquire("wf", "k", 2, [("done|0", 1), ("lost|0", 2)], long_ago)
    await slots.acquire("wf", "k", 2, [("next|0", slot_score(0, long_ago))], long_ago)
    store = _Runs(
        _run("done", WorkflowStatus.COMPLETED),
        _run("lost", WorkflowStatus.RUNNING, queued=True),
        _run("next", WorkflowStatus.RUNNING, queued=True),
    )
    upkeep = KeyUpkeep(redis_client, keys, slots, store, "r1")  # type: ignore[arg-type]
    assert await _timers(redis_client, keys) == set()
    await upkeep.tick()
    assert upkeep.freed == 1 and upkeep.timers_reset == 1
    assert await _timers(redis_client, keys) == {"admit|lost||0", "admit|next||0"}
    [state] = await slots.known()
    assert (state.held, state.queued) == (2, 0)
    assert upkeep.workflows["wf"]["queued"] == 1  # as read at the start of the pass
    # A queue left with free slots (the release that should have handed them on was
    # lost) is handed on at the next pass.
    await redis_client.zrem(keys.concurrency(state.digest)[0], "lost|0", "next|0")
    await slots.acquire("wf", "k", 2, [("late|0", slot_score(0, T))], T)  # taken at once
    await redis_client.zrem(keys.concurrency(state.digest)[0], "late|0")
    await redis_client.zadd(keys.concurrency(state.digest)[1], {"late|0": slot_score(0, T)})
    await upkeep.tick()
    assert upkeep.handed_on == 1
    assert "admit|late||0" in await _timers(redis_client, keys)


async def test_a_slot_whose_run_is_not_there_yet_is_kept_until_long_after(
    redis_client: Redis, key_prefix: str
) -> None:
    """A slot is taken before its run's first commit, which a stalled replica may make
    late: freeing it as lost would let a second run in beside the first."""
    slots, keys = _slots(redis_client, key_prefix)
    await slots.acquire("wf", "k", 1, [("ghost|0", 1)], now_ms() - GRACE_MS)
    patient = KeyUpkeep(redis_client, keys, slots, _Runs(), "r1")  # type: ignore[arg-type]
    await patient.tick()
    assert patient.freed == 0
    [state] = await slots.known()
    assert state.held == 1
    hasty = KeyUpkeep(redis_client, keys, slots, _Runs(), "r1", missing_ms=GRACE_MS)  # type: ignore[arg-type]
    await hasty.tick()
    assert hasty.freed == 1


async def test_a_slot_taken_for_a_round_the_run_has_not_committed_yet_is_kept(
    redis_client: Redis, key_prefix: str
) -> None:
    """An operator's retry takes the next round's slot before the commit that reopens
    the run; a replica stalled in between leaves the stored run ended, at the round
    before. The slot is not lost: freeing it would admit the next run in the queue while
    the stalled replica's commit reopens this one beside it. The slot of a round the run
    has moved past is."""
    slots, keys = _slots(redis_client, key_prefix)
    await slots.acquire("wf", "k", 2, [("retried|1", 1), ("over|0", 2)], now_ms() - GRACE_MS)
    store = _Runs(_run("retried", WorkflowStatus.CANCELLED), _run("over", WorkflowStatus.FAILED))
    store.states["over"].round = 1  # retried already, its round-0 slot left behind
    upkeep = KeyUpkeep(redis_client, keys, slots, store, "r1")  # type: ignore[arg-type]
    await upkeep.tick()
    assert upkeep.freed == 1
    [state] = await slots.known()
    assert state.held == 1
    assert [m for m, _ in await slots.holders(state.digest)] == ["retried|1"]
