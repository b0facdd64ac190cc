"""The second peer: the same 1- and 3-step chains as DBOS workflows, their state in
PostgreSQL (a durable-execution library, as Temporal is a durable-execution server).

Each measurement runs `benchmarks.dbos_app` in its own process against the PostgreSQL
given by ``BENCH_DBOS_URL`` (default: this machine's, ``postgresql://postgres@127.0.0.1:
5432/mediator_bench_dbos``; DBOS creates the database). Two settings of the same
PostgreSQL, side by side: as installed (every commit flushed to disk before it returns),
and with ``synchronous_commit = off`` for the benchmark's database (commits flushed in
the background, as the suite's Redis keeps its data: in memory, no fsync), which is the
comparison of like with like. Skipped, saying why, when DBOS is not installed
(``pip install dbos``) or PostgreSQL cannot be reached.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import orjson

from benchmarks.common import Measure, Profile

__all__ = ["run_dbos"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/mediator_bench_dbos"
IN_FLIGHT = 200  # DBOS's rate was flat from 50 to 200 here; 10 gave less
ROOT = Path(__file__).resolve().parent.parent
#: (name, synchronous_commit of the benchmark's database)
MODES = (("dbos", "on"), ("dbos_async_commit", "off"))


async def run_dbos(profile: Profile, out: list[Measure], chains: tuple[int, ...] = (1, 3)) -> None:
    """``<mode>.chain<n>.chains_per_s`` for each mode and chain length, alternating."""
    if importlib.util.find_spec("dbos") is None:
        print("dbos: DBOS is not installed (pip install dbos): section skipped")
        return
    url = os.environ.get("BENCH_DBOS_URL", DEFAULT_URL)
    measures = {
        (mode, steps): Measure(
            f"{mode}.chain{steps}.chains_per_s", "chains/s",
            note=f"synchronous_commit {setting}, {IN_FLIGHT} in flight, steps in-process",
        )
        for mode, setting in MODES
        for steps in chains
    }  # fmt: skip
    out += measures.values()
    for _ in range(profile.repeat):
        for steps in chains:
            for mode, setting in MODES:
                await _set_commit(url, setting)
                result = await _measure(url, steps, profile)
                if not result["completed"] or result["failed"]:
                    msg = f"{mode} chain{steps}: {result}"
                    raise RuntimeError(msg)
                measures[mode, steps].values.append(
                    round(result["completed"] / result["window_s"], 1)
                )
    await _set_commit(url, "on")


async def _measure(url: str, steps: int, profile: Profile) -> dict[str, float]:
    args = [url, str(steps), str(IN_FLIGHT), str(profile.warmup_s), str(profile.measure_s)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.dbos_app", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        msg = f"dbos app exited {proc.returncode}: {stderr.decode()[-2000:]}"
        raise RuntimeError(msg)
    result: dict[str, float] = orjson.loads(stdout.splitlines()[-1])
    return result


async def _set_commit(url: str, setting: str) -> None:
    """``synchronous_commit`` of the benchmark's database (new sessions take it)."""
    import psycopg

    base, _, database = url.rpartition("/")
    async with await psycopg.AsyncConnection.connect(f"{base}/postgres", autocommit=True) as db:
        found = await db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if await found.fetchone() is None:
            await db.execute(f'CREATE DATABASE "{database}"')
        await db.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = {setting}')
