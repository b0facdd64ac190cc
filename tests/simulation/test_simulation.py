"""The deterministic simulation in CI: a thousand seeded histories of two replicas under
faults keep every invariant, take every fault path, and replay exactly.

``MEDIATOR_SIM_SEEDS`` sets how many seeds (default 1,000, spread over the machine's
cores); a failing seed is printed with its whole history and the command that replays it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from tests.simulation.schedule import Outcome, run_seed

SEEDS = int(os.environ.get("MEDIATOR_SIM_SEEDS", "1000"))
WORKERS = max(1, min(4, os.cpu_count() or 1))

#: Paths a thousand seeds must have taken, or the simulation stopped exercising them.
FAULT_PATHS = (
    "conflicts",  # two replicas committed the same run: compare-and-set
    "redelivered",  # a request delivered again after a rewind or rebalance
    "ignored_replies",  # duplicate, late and reordered replies
    "ignored_controls",  # controls delivered again, or that do not apply
    "stale_timers",  # timers that fired after their step moved on
    "fenced",  # a replica stalled past its outbox lease
    "resent_by_sweeper",  # outbox entries another replica took over
    "breakers_opened",
    "breaker_probes",
    "parked",
    "rerouted",  # to a fallback, while a breaker was open...
    "queued_on_fallback",  # ...and queued there by the fallback's flow-control limit
    "real_deaths_handed_on",  # a killed instance's work sent elsewhere
    "undone",  # compensations
    "retries_asked",  # operators' retries: new rounds
    "failovers",  # Redis losing its latest writes
    "redriven",  # replies `recover` published again for runs rolled back
    "paused",  # runs an operator paused...
    "held",  # ...a retry, unpark, reroute or undo retry falling due meanwhile
    "signalled",  # a wait completed by a signal that came while it waited...
    "signal_kept",  # ...one that came first, kept by the run...
    "kept_signal_taken",  # ...and taken by the wait when it started
    "child_runs",  # runs started by a parent's step...
    "children_cancelled",  # ...cancelled when the parent stopped waiting...
    "compensate_requested",  # ...undone when the parent compensated the step
    "run_queued",  # runs that waited for their concurrency key's slot...
    "step_queued_by_key",  # ...and steps for theirs
)


def _run_seeds(seeds: range) -> list[Outcome]:
    async def run() -> list[Outcome]:
        return [await run_seed(seed) for seed in seeds]

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_seeded_histories_keep_every_invariant() -> None:
    chunks = [range(start, SEEDS, WORKERS) for start in range(WORKERS)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WORKERS, mp_context=context) as pool:
        outcomes = [o for batch in pool.map(_run_seeds, chunks) for o in batch]
    assert len(outcomes) == SEEDS
    failed = sorted((o for o in outcomes if o.problems), key=lambda o: o.seed)
    assert not failed, (
        f"{len(failed)} of {SEEDS} seeds broke an invariant "
        f"(seeds {[o.seed for o in failed[:20]]}); the first:\n{failed[0].report()}"
    )
    taken: Counter[str] = Counter()
    for outcome in outcomes:
        taken += outcome.coverage
    missing = [path for path in FAULT_PATHS if not taken[path]]
    assert not missing, f"no seed took these paths: {missing}; taken: {dict(taken)}"


def test_a_seed_replays_exactly() -> None:
    first, again = _run_seeds(range(7, 8)), _run_seeds(range(7, 8))
    assert first[0].history == again[0].history
    assert first[0].coverage == again[0].coverage
