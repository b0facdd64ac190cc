"""Every script call and multi-key command the mediator makes keeps its keys in one hash
slot, as a Redis Cluster requires: checked on the commands the simulation's replicas send
(commits, timers, the outbox, parking, flow control, concurrency keys, registry, breakers,
signals, children) over seeded histories."""

from __future__ import annotations

import asyncio

from tests.simulation.schedule import run_seed
from tests.slots_audit import audited


def test_no_command_of_the_simulated_replicas_spans_hash_slots() -> None:
    async def run() -> None:
        for seed in range(20):
            outcome = await run_seed(seed)
            assert not outcome.problems, outcome.report()

    with audited() as audit:
        asyncio.run(run())
    assert audit.scripts > 1000, audit  # the audit saw the scripts run
    assert audit.crossslot == [], sorted(set(audit.crossslot))[:20]


def test_the_audit_sees_keys_in_two_slots() -> None:
    from tests.slots_audit import Audit

    audit = Audit()
    audit.check(("EVALSHA", "sha", 2, "med:{s1}:timers", "med:{s1}:outbox"))
    audit.check(("DEL", "med:{s1}:timers", "med:limit:{pay}:inflight"))
    audit.check(("GET", "anything"))
    assert audit.crossslot == [("DEL", ("med:{s1}:timers", "med:limit:{pay}:inflight"))]
