"""What every benchmark shares: measures, the run profile, a time budget and load loops."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mediator.runtime.metrics import percentile

__all__ = [
    "Budget",
    "LoadResult",
    "Measure",
    "Profile",
    "closed_loop",
    "latency_measures",
    "one_at_a_time",
    "open_loop",
    "percentile",
    "record_latency",
    "run_count",
    "tag",
]


def tag(prefix: str = "b") -> str:
    """A short name no other run uses (topics, key prefixes, groups)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@dataclass
class Measure:
    """One measured quantity: every repetition's value, and their median."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        """The median of the repetitions (None when nothing was measured)."""
        return statistics.median(self.values) if self.values else None

    def to_json(self) -> dict[str, Any]:
        """The measure as it goes into the JSON report."""
        out: dict[str, Any] = {"unit": self.unit, "values": self.values, "median": self.median}
        if self.note:
            out["note"] = self.note
        if self.params:
            out["params"] = self.params
        return out


@dataclass(frozen=True)
class Profile:
    """How long and how hard each phase runs."""

    name: str
    repeat: int
    warmup_s: float
    measure_s: float
    half_load_s: float
    #: Runs kept in flight at saturation, by system.
    floor_in_flight: int
    mediator_in_flight: int
    celery_in_flight: int
    micro_iterations: int
    memory_workflows: int
    budget_s: float
    #: A fresh broker (and services, replica, client) for every repetition.
    fresh_rigs: bool = True
    drain_s: float = 30.0

    @classmethod
    def quick(cls, repeat: int = 1) -> Profile:
        """A fast pass (about a minute) to check that everything works."""
        return cls(
            "quick", repeat, warmup_s=0.5, measure_s=1.5, half_load_s=2.0, floor_in_flight=250,
            mediator_in_flight=300, celery_in_flight=100, micro_iterations=5,
            memory_workflows=100, budget_s=88.0, fresh_rigs=False, drain_s=15.0,
        )  # fmt: skip

    @classmethod
    def full(cls, repeat: int = 3) -> Profile:
        """The suite proper: several repetitions of multi-second phases."""
        return cls(
            "full", repeat, warmup_s=1.5, measure_s=5.0, half_load_s=8.0, floor_in_flight=500,
            mediator_in_flight=1000, celery_in_flight=200, micro_iterations=30,
            memory_workflows=1000, budget_s=30 * 60.0,
        )  # fmt: skip


class Budget:
    """A wall-clock deadline for the whole suite, so no phase can run away with it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    @property
    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.started + self.seconds - time.monotonic())

    @property
    def elapsed(self) -> float:
        """Seconds since the suite started."""
        return time.monotonic() - self.started


@dataclass
class LoadResult:
    """What one load phase did: throughput over the measured window, latencies in ms."""

    completed: int
    window_s: float
    latencies_ms: list[float]
    failures: int = 0
    late_starts: int = 0
    #: What ``probe`` returned as the measured window opened and as it closed.
    probes: tuple[Any, Any] | None = None

    @property
    def rate(self) -> float:
        """Operations completed per second inside the measured window."""
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    def check(self, what: str) -> None:
        """Raise unless something completed and nothing failed."""
        if self.completed == 0 or self.failures:
            msg = f"{what}: {self.completed} completed, {self.failures} failed"
            raise RuntimeError(msg)

    def latency(self, q: float) -> float:
        """The q-th percentile latency in ms (0.0 when nothing completed)."""
        return percentile(self.latencies_ms, q) or 0.0


Operation = Callable[[int], Awaitable[bool]]


async def closed_loop(
    op: Operation,
    *,
    in_flight: int,
    warmup_s: float,
    measure_s: float,
    drain_s: float,
    max_warmup_s: float = 30.0,
    probe: Callable[[], Any] | None = None,
) -> LoadResult:
    """Keep ``in_flight`` operations running; count completions in the measured window.

    ``op(n)`` returns whether operation ``n`` succeeded. Each of ``in_flight`` lanes starts
    its next operation as soon as the previous one finished; the lanes start one after
    another over ``warmup_s``. The window opens after
    ``warmup_s`` and once every lane has completed at least one operation on average (so
    long operations are in their steady state, not in the first wave), but no later than
    ``max_warmup_s``; it stays open ``measure_s``. Then lanes stop starting new work and the
    ones in flight get ``drain_s`` to finish (the rest are cancelled). The window lasts
    ``measure_s``, or two median latencies if that is longer (at most ``3 * measure_s``).
    ``probe()`` (CPU counters, say) is called as the window opens and as it closes.
    """
    loop = asyncio.get_running_loop()
    counter = iter(range(10**12))
    done: list[tuple[float, float]] = []  # (finished at, latency s) of successes
    failures = 0
    stop = False

    async def lane(delay_s: float) -> None:
        nonlocal failures
        # Lanes start spread over the warm-up: started together, they would stay in step
        # (batches keep them so) and complete in waves a short window could miss.
        await asyncio.sleep(delay_s)
        while not stop:
            began = loop.time()
            ok = await op(next(counter))
            if ok:
                finished = loop.time()
                done.append((finished, finished - began))
            else:
                failures += 1

    start = loop.time()
    lanes = [asyncio.create_task(lane(i / in_flight * warmup_s)) for i in range(in_flight)]
    try:
        await asyncio.sleep(warmup_s)
        while len(done) < in_flight and loop.time() < start + max_warmup_s:
            if all(t.done() for t in lanes):
                break
            await asyncio.sleep(0.01)
        opened = loop.time()
        at_open = probe() if probe else None
        # Batching keeps long workflows moving in waves about one latency apart: a window
        # of at least two latencies sees whole waves rather than the gap between two.
        cycle = statistics.median(lat for _, lat in done) if done else 0.0
        await asyncio.sleep(min(max(measure_s, 2 * cycle), 3 * measure_s))
        closed = loop.time()
        at_close = probe() if probe else None
    finally:
        stop = True
        await _finish(lanes, drain_s)
    inside = [lat * 1000 for at, lat in done if opened <= at < closed]
    probes = (at_open, at_close) if probe else None
    return LoadResult(len(inside), closed - opened, inside, failures, probes=probes)


def latency_measures(prefix: str, note: str) -> list[Measure]:
    """``<prefix>.latency_p50`` and ``<prefix>.latency_p99``, in ms."""
    return [Measure(f"{prefix}.latency_p{q}", "ms", note=note) for q in (50, 99)]


def record_latency(measures: list[Measure], result: LoadResult) -> None:
    """Append `result`'s p50 and p99 latency to `latency_measures`' two measures."""
    for measure, q in zip(measures, (50, 99), strict=True):
        measure.values.append(round(result.latency(q), 2))


async def one_at_a_time(op: Operation, profile: Profile, measures: list[Measure]) -> None:
    """Run `op` with one operation in flight for the profile's window; record its latency
    p50/p99 in `latency_measures`' two measures."""
    result = await closed_loop(
        op, in_flight=1, warmup_s=0.2, measure_s=profile.measure_s, drain_s=profile.drain_s
    )
    result.check(measures[0].name.rsplit(".", 1)[0])
    record_latency(measures, result)


async def open_loop(op: Operation, *, rate: float, duration_s: float, drain_s: float) -> LoadResult:
    """Start operations at a constant ``rate`` for ``duration_s``, whatever the latency.

    Latency is measured from each operation's scheduled start, so a generator that falls
    behind does not hide queueing (those starts are counted in ``late_starts``).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    total = max(1, round(rate * duration_s))
    result = LoadResult(0, duration_s, [])

    async def one(n: int, scheduled: float) -> None:
        ok = await op(n)
        if ok:
            result.completed += 1
            result.latencies_ms.append((loop.time() - scheduled) * 1000)
        else:
            result.failures += 1

    tasks = []
    for n in range(total):
        scheduled = start + n / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            result.late_starts += 1
        tasks.append(asyncio.create_task(one(n, scheduled)))
    await _finish(tasks, drain_s)
    result.window_s = max(loop.time() - start, 1e-9)
    return result


async def _finish(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for ``tasks`` up to ``timeout_s``, cancel the stragglers, surface errors.

    A cancelled straggler simply never counts as completed.
    """
    try:
        await asyncio.wait(tasks, timeout=timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


async def run_count(op: Operation, count: int, *, in_flight: int, timeout_s: float) -> int:
    """Run ``op(0..count-1)`` with at most ``in_flight`` at once; how many succeeded."""
    limit = asyncio.Semaphore(in_flight)

    async def one(n: int) -> bool:
        async with limit:
            return await op(n)

    async with asyncio.timeout(timeout_s):
        results = await asyncio.gather(*(one(n) for n in range(count)))
    return sum(results)


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    """Seconds one call of ``fn`` took."""
    began = time.perf_counter()
    await fn()
    return time.perf_counter() - began
