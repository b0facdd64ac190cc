"""Per-instance breakers: open after consecutive failures, skipped by the balancer while
open, one probe when the recovery time is over, closed by its success."""

from __future__ import annotations

import pytest

from mediator.core.balancer import Balancer, Instance, NoInstance, Strategy
from mediator.core.instance_breakers import InstanceBreakers

SERVICE = "inventory"


def breakers() -> InstanceBreakers:
    return InstanceBreakers(lambda service: (3, 1000))


def test_consecutive_failures_open_it_and_a_success_in_between_resets_the_count() -> None:
    b = breakers()
    assert b.blocked(SERVICE, 0) is None  # nothing tripped: no check at all
    assert [b.record(SERVICE, "i-1", False, 0) for _ in range(2)] == [None, None]
    assert b.record(SERVICE, "i-1", True, 0) is None
    assert [b.record(SERVICE, "i-1", False, 10) for _ in range(3)] == [None, None, "opened"]
    blocked = b.blocked(SERVICE, 20)
    assert blocked is not None and blocked("i-1") and not blocked("i-2")
    assert b.open(SERVICE, 20) == ["i-1"]


def test_after_the_recovery_time_one_probe_goes_and_its_outcome_decides() -> None:
    b = breakers()
    for _ in range(3):
        b.record(SERVICE, "i-1", False, 0)
    check = b.blocked(SERVICE, 1000)
    assert check is not None
    assert not check("i-1")  # the probe
    assert check("i-1")  # only one
    assert b.record(SERVICE, "i-1", False, 1100) is None  # the probe failed: open again
    check = b.blocked(SERVICE, 1500)
    assert check is not None and check("i-1")
    check = b.blocked(SERVICE, 2100)
    assert check is not None and not check("i-1")
    assert b.record(SERVICE, "i-1", True, 2200) == "closed"
    assert b.blocked(SERVICE, 2300) is None


def test_a_probe_that_never_answers_lets_another_go() -> None:
    b = breakers()
    for _ in range(3):
        b.record(SERVICE, "i-1", False, 0)
    check = b.blocked(SERVICE, 1000)
    assert check is not None and not check("i-1") and check("i-1")
    check = b.blocked(SERVICE, 2001)
    assert check is not None and not check("i-1")


def test_the_balancer_routes_around_an_open_instance_and_has_none_when_all_are() -> None:
    b = breakers()
    fleet = [Instance(f"i-{n}", (n,), True, False, 0.0, 8, 1.0) for n in range(3)]
    balancer = Balancer(SERVICE, Strategy.ROUND_ROBIN)
    for _ in range(3):
        b.record(SERVICE, "i-1", False, 0)
    picks = {balancer.choose(fleet, blocked=b.blocked(SERVICE, 10)).id for _ in range(30)}
    assert picks == {"i-0", "i-2"}
    for instance in ("i-0", "i-2"):
        for _ in range(3):
            b.record(SERVICE, instance, False, 0)
    with pytest.raises(NoInstance):
        balancer.choose(fleet, blocked=b.blocked(SERVICE, 10))
    b.forget(SERVICE, "i-0")
    assert balancer.choose(fleet, blocked=b.blocked(SERVICE, 10)).id == "i-0"
