"""The peer: the same 1- and 3-step chains as Celery chains (Redis broker and backend).

A Celery worker (``--pool prefork --concurrency 2``) runs in a child process; this process
keeps a bounded number of chains in flight, polling the result backend for the chains'
final results in bulk (``backend.get_many``, one MGET per poll) and topping up as they
finish, in a thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import time

from celery import Celery, chain

from benchmarks.celery_app import ECHO_TASK, make_app
from benchmarks.common import Measure, Profile, tag
from benchmarks.procs import Child
from benchmarks.stage import Stage

__all__ = ["run_celery"]

POLL_S = 0.005
MAX_WARMUP_S = 30.0
WORKER_CONCURRENCY = 2


def _submit(app: Celery, steps: int, n: int) -> str:
    first = app.signature(ECHO_TASK, args=({"n": n},))
    rest = [app.signature(ECHO_TASK) for _ in range(steps - 1)]
    return str(chain(first, *rest).apply_async().id)


def closed_loop(
    app: Celery, steps: int, in_flight: int, warmup_s: float, measure_s: float, drain_s: float
) -> tuple[int, float, int]:
    """Chains completed in the window, the window's length, and failures (blocking).

    As in `benchmarks.common.closed_loop`, the window opens after ``warmup_s`` and once as
    many chains as are in flight have completed (the steady state), at the latest after
    ``MAX_WARMUP_S``.
    """
    backend = app.backend
    pending: set[str] = set()
    n = total = completed = failures = 0
    start = time.monotonic()
    opened = closed = float("inf")
    while True:
        now = time.monotonic()
        if opened == float("inf") and now >= start + warmup_s:
            if total >= in_flight or now >= start + MAX_WARMUP_S:
                opened, closed = now, now + measure_s
        if now >= closed and (not pending or now >= closed + drain_s):
            break
        while len(pending) < in_flight and now < closed:
            pending.add(_submit(app, steps, n))
            n += 1
        for task_id, meta in backend.get_many(
            set(pending), interval=POLL_S, max_iterations=1, no_ack=True
        ):
            pending.discard(task_id)
            total += 1
            if meta["status"] != "SUCCESS":
                failures += 1
            elif opened <= time.monotonic() < closed:
                completed += 1
    return completed, measure_s, failures + len(pending)


async def _wait_ready(app: Celery, timeout_s: float) -> None:
    """Until the worker has run one chain (it takes a few seconds to start)."""
    task_id = _submit(app, 1, 0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, meta in app.backend.get_many({task_id}, interval=0.05, max_iterations=1):
            if meta["status"] != "SUCCESS":
                msg = f"celery warm-up chain ended {meta['status']}: {meta.get('result')!r}"
                raise RuntimeError(msg)
            return
        await asyncio.sleep(0.05)
    msg = f"the celery worker did not run a task within {timeout_s}s"
    raise RuntimeError(msg)


async def run_celery(
    stage: Stage,
    profile: Profile,
    chains: tuple[int, ...] = (1, 3),
    out: list[Measure] | None = None,
) -> list[Measure]:
    """Chains/s and steps/s of Celery chains at saturation, repeated (appended to ``out``)."""
    queue = tag("celery")
    env = {"BENCH_CELERY_REDIS": stage.celery_redis_url, "BENCH_CELERY_QUEUE": queue}
    worker = Child(
        "celery",
        ["-m", "celery", "-A", "benchmarks.celery_app", "worker", "--pool", "prefork",
         "--concurrency", str(WORKER_CONCURRENCY), "--loglevel", "WARNING", "-Q", queue,
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        stage.workdir, env=env, protocol=False,
    )  # fmt: skip
    app = make_app(stage.celery_redis_url, queue)
    measures: list[Measure] = [] if out is None else out
    note = f"prefork, concurrency {WORKER_CONCURRENCY}, {profile.celery_in_flight} in flight"
    await worker.start()
    try:
        await _wait_ready(app, 60.0)
        for steps in chains:
            chains_s = Measure(f"celery.chain{steps}.chains_per_s", "chains/s", note=note)
            steps_s = Measure(f"celery.chain{steps}.steps_per_s", "steps/s", note=note)
            measures += [chains_s, steps_s]
            for _ in range(profile.repeat):
                completed, window, failed = await asyncio.to_thread(
                    closed_loop, app, steps, profile.celery_in_flight,
                    profile.warmup_s, profile.measure_s, profile.drain_s,
                )  # fmt: skip
                if completed == 0 or failed:
                    msg = f"celery chain{steps}: {completed} completed, {failed} failed"
                    raise RuntimeError(msg)
                chains_s.values.append(round(completed / window, 1))
                steps_s.values.append(round(completed / window * steps, 1))
    finally:
        app.close()
        await worker.stop()
    return measures
