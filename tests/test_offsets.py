"""Offsets a worker may commit while its commands finish out of order."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mediator.sdk.offsets import OffsetTracker


def test_an_offset_is_committable_only_after_every_earlier_one() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    for offset in (10, 11, 12):
        t.add("p0", offset)
    t.done("p0", 12)
    t.done("p0", 11)
    assert t.committable() == {} and len(t) == 1
    t.done("p0", 10)
    assert t.committable() == {"p0": 13}
    assert t.committable() == {} and len(t) == 0


def test_partitions_are_independent_and_can_be_chosen() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    t.add("a", 0)
    t.add("b", 5)
    t.done("a", 0)
    t.done("b", 5)
    assert t.committable(["b"]) == {"b": 6}
    assert t.committable() == {"a": 1}


def test_a_dropped_partition_is_forgotten_and_late_completions_ignored() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    for offset in (0, 1, 2):
        t.add("a", offset)
    t.done("a", 1)
    t.drop(["a"])
    assert len(t) == 0
    t.done("a", 0)  # a command of the lost partition finishing afterwards
    assert t.committable() == {} and len(t) == 0
    # Owned again, from the committed offset: the same offsets are tracked afresh.
    t.add("a", 0)
    t.done("a", 0)
    assert t.committable() == {"a": 1}


def test_completions_twice_or_of_committed_offsets_change_nothing() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    t.add("a", 0)
    t.add("a", 1)
    t.done("a", 0)
    t.done("a", 0)
    assert len(t) == 1
    assert t.committable() == {"a": 1}
    t.done("a", 0)
    assert len(t) == 1 and t.committable() == {}


@given(st.integers(1, 60), st.integers(0, 2**32))
def test_any_completion_order_commits_exactly_the_done_prefix(n: int, seed: int) -> None:
    rng = random.Random(seed)
    t: OffsetTracker[int] = OffsetTracker()
    for offset in range(n):
        t.add(0, offset)
    order = list(range(n))
    rng.shuffle(order)
    done: set[int] = set()
    committed = 0
    for offset in order:
        t.done(0, offset)
        done.add(offset)
        ready = t.committable().get(0)
        prefix = 0
        while prefix in done:
            prefix += 1
        if ready is not None:
            assert ready > committed
            committed = ready
        assert committed == prefix
        assert len(t) == n - len(done)
