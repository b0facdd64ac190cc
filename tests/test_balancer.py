"""The balancer's strategies, and that every one skips ineligible instances."""

from __future__ import annotations

from collections import Counter

import pytest

from mediator.core.balancer import Balancer, Instance, NoInstance, Strategy


def fleet(n: int, **overrides: object) -> list[Instance]:
    return [Instance(id=f"i{k}", **overrides) for k in range(n)]  # type: ignore[arg-type]


def test_round_robin_takes_each_instance_in_turn() -> None:
    balancer = Balancer("x")
    picks = [balancer.choose(fleet(3)).id for _ in range(9)]
    assert Counter(picks) == {"i0": 3, "i1": 3, "i2": 3}
    assert picks[:3] != picks[1:4]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_every_strategy_skips_down_draining_and_open_breakers(strategy: Strategy) -> None:
    instances = [
        Instance("down", up=False),
        Instance("draining", draining=True),
        Instance("unroutable", partitions=()),
        Instance("tripped"),
        Instance("good"),
    ]
    balancer = Balancer("x", strategy)
    picks = {
        balancer.choose(instances, key=f"k{n}", blocked=lambda i: i == "tripped").id
        for n in range(50)
    }
    assert picks == {"good"}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_no_eligible_instance_is_a_clear_error(strategy: Strategy) -> None:
    with pytest.raises(NoInstance, match="no eligible instance of service 'pay' \\(2 known"):
        Balancer("pay", strategy).choose(fleet(2, up=False), key="k")


def test_weighted_spreads_in_proportion_and_smoothly() -> None:
    instances = [
        Instance("a", weight=5),
        Instance("b", weight=1),
        Instance("c", weight=1),
    ]
    balancer = Balancer("x", Strategy.WEIGHTED)
    picks = [balancer.choose(instances).id for _ in range(700)]
    counts = Counter(picks)
    assert abs(counts["a"] - 500) <= 3 and abs(counts["b"] - 100) <= 3
    for start in range(0, 700, 35):  # even over every short run, not in bursts
        window = Counter(picks[start : start + 35])
        assert 22 <= window["a"] <= 28, window


def test_least_loaded_prefers_spare_capacity() -> None:
    instances = [
        Instance("busy", load=8, capacity=10),
        Instance("idle", load=1, capacity=10),
        Instance("small", load=1, capacity=2),
    ]
    balancer = Balancer("x", Strategy.LEAST_LOADED)
    assert {balancer.choose(instances).id for _ in range(5)} == {"idle"}


def test_least_loaded_shares_ties_evenly_whichever_instance_is_busier() -> None:
    # A busier instance listed before two equal ones must not tilt the ties towards
    # the one that happens to follow it.
    for busy in range(3):
        instances = [Instance(f"i{k}", load=5.0 if k == busy else 0.0) for k in range(3)]
        balancer = Balancer("x", Strategy.LEAST_LOADED)
        picks = Counter(balancer.choose(instances).id for _ in range(300))
        assert sorted(picks.values()) == [150, 150], (busy, picks)


def test_consistent_hash_keeps_keys_in_place_and_moves_few_when_one_leaves() -> None:
    balancer = Balancer("x", Strategy.CONSISTENT_HASH)
    five = fleet(5)
    before = {f"order-{n}": balancer.choose(five, key=f"order-{n}").id for n in range(1000)}
    again = {k: balancer.choose(five, key=k).id for k in before}
    assert again == before
    four = [i for i in five if i.id != "i2"]
    after = {k: balancer.choose(four, key=k).id for k in before}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k, v in before.items() if v == "i2"}
    assert 100 < len(moved) < 320  # about a fifth of the keys


def test_least_loaded_counts_what_was_sent_since_the_last_report() -> None:
    instances = fleet(3, capacity=4)
    balancer = Balancer("x", Strategy.LEAST_LOADED)
    extra: Counter[str] = Counter()
    for _ in range(12):
        extra[balancer.choose(instances, extra=extra).id] += 1
    assert extra == {"i0": 4, "i1": 4, "i2": 4}


def test_least_loaded_with_many_instances_samples_two_and_avoids_the_loaded() -> None:
    instances = [Instance(f"i{k}", load=10.0 if k < 500 else 0.0) for k in range(1000)]
    balancer = Balancer("x", Strategy.LEAST_LOADED)
    picks = Counter(balancer.choose(instances).id for _ in range(4000))
    loaded = sum(n for i, n in picks.items() if int(i[1:]) < 500)
    assert loaded < 4000 * 0.3  # two samples: a loaded pick needs both loaded (~1/4)
    assert len(picks) > 600  # spread, not herded onto one minimum


def test_the_same_list_is_prepared_once_and_a_new_list_is_seen() -> None:
    balancer = Balancer("x")
    first = fleet(3)
    assert {balancer.choose(first).id for _ in range(6)} == {"i0", "i1", "i2"}
    second = [*first[:2], Instance("i2", up=False)]
    assert {balancer.choose(second).id for _ in range(6)} == {"i0", "i1"}
