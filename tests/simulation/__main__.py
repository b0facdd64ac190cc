"""Run simulation seeds: ``python -m tests.simulation [--seed N] [--count M] [--history]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter

from tests.simulation.schedule import run_seed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--count", type=int, default=1, help="how many seeds (default 1)")
    parser.add_argument("--steps", type=int, default=150, help="random actions per seed")
    parser.add_argument("--history", action="store_true", help="print every seed's history")
    parser.add_argument("--log", action="store_true", help="show the mediator's log")
    parser.add_argument("--stats", action="store_true", help="how often each path was taken")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.log else logging.CRITICAL)
    failed = 0
    started = time.perf_counter()
    coverage: Counter[str] = Counter()
    for seed in range(args.seed, args.seed + args.count):
        outcome = asyncio.run(run_seed(seed, args.steps))
        if outcome.problems or args.history:
            print(outcome.report())
        failed += bool(outcome.problems)
        coverage += outcome.coverage
    if args.stats:
        for name, count in sorted(coverage.items()):
            print(f"{name:>24} {count}")
    elapsed = time.perf_counter() - started
    print(f"{args.count} seeds, {failed} failed, {elapsed:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
