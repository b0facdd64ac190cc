"""The balancer's strategies, and that every one skips ineligible instances."""

from __future__ import annotations

from collections import Counter

import pytest

from mediator.core.balancer import Balancer, Instance, NoInstance, Strategy


def fleet(n: int, **overrides: object) -> list[Instance]:
    return [Instance(id=f"i{k}", inbox=f"svc.x.i{k}", **overrides) for k in range(n)]  # type: ignore[arg-type]


def test_round_robin_takes_each_instance_in_turn() -> None:
    balancer = Balancer("x")
    picks = [balancer.choose(fleet(3)).id for _ in range(9)]
    assert Counter(picks) == {"i0": 3, "i1": 3, "i2": 3}
    assert picks[:3] != picks[1:4]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_every_strategy_skips_down_draining_and_open_breakers(strategy: Strategy) -> None:
    instances = [
        Instance("down", "a", up=False),
        Instance("draining", "b", draining=True),
        Instance("tripped", "c"),
        Instance("good", "d"),
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
        Instance("a", "a", weight=5),
        Instance("b", "b", weight=1),
        Instance("c", "c", weight=1),
    ]
    balancer = Balancer("x", Strategy.WEIGHTED)
    picks = [balancer.choose(instances).id for _ in range(70)]
    assert Counter(picks) == {"a": 50, "b": 10, "c": 10}
    assert "aaaaa" not in "".join(picks[:7])  # smooth: a is interleaved, not bunched


def test_least_loaded_prefers_spare_capacity() -> None:
    instances = [
        Instance("busy", "a", load=8, capacity=10),
        Instance("idle", "b", load=1, capacity=10),
        Instance("small", "c", load=1, capacity=2),
    ]
    balancer = Balancer("x", Strategy.LEAST_LOADED)
    assert {balancer.choose(instances).id for _ in range(5)} == {"idle"}


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
