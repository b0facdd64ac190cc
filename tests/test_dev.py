"""`mediator dev`, the README's first command, run as a user runs it: a real process with
its embedded broker and Redis, a flaky shipping service, and its live output read back."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

#: Below the suite's per-test timeout, so a run that hangs fails with what it printed.
DEV_TIMEOUT_S = 150


@pytest.mark.slow
@pytest.mark.integration  # `mediator dev` starts the embedded servers
def test_mediator_dev_shows_retries_a_breaker_cycle_parking_and_compensation() -> None:
    try:
        run = subprocess.run(
            [sys.executable, "-m", "mediator", "dev", "--requests", "40"],
            capture_output=True,
            text=True,
            timeout=DEV_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        printed = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        logged = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(
            f"mediator dev did not finish within {DEV_TIMEOUT_S} s; it printed:\n"
            f"{printed[-4000:]}\nstderr:\n{logged[-4000:]}"
        )
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    # Every order gets exactly one result.
    numbers = [int(n) for n in re.findall(r"^\[\s*(\d+)\] order order-\d+ ", out, re.M)]
    assert sorted(numbers) == list(range(1, 41)), out
    assert re.search(r"^done: 40 results .*redis says running 0,", out, re.M), out
    # The parts start side by side and say so as each comes up.
    for part in ("service shipping", "service payment", "mediator", "client"):
        assert re.search(rf"^  {part} up \(\d+\.\d s\)$", out, re.M), out
    # The shipping outage: the breaker opens, steps park, it closes and the backlog drains.
    lines = out.splitlines()
    opened = next(i for i, line in enumerate(lines) if "breaker shipping OPEN" in line)
    closed = next(i for i, line in enumerate(lines) if "breaker shipping closed" in line)
    assert opened < closed, out
    assert any(re.search(r"parked shipping: \d+ steps? waiting", line) for line in lines), out
    assert any("parked shipping: drained" in line for line in lines[opened:]), out
    # Retries are visible per result, and a failed order is compensated.
    assert re.search(r"attempts: (.*, )?ship x\d", out), out
    assert re.search(r"failed .*\(compensated: .*\)", out), out
    # Large orders wait for an approval, which the demo reviewer gives: those under the
    # card limit go on to ship.
    waiting = re.findall(r"^  \? (order-\d+) \(([\d.]+)\) waits for approval", out, re.M)
    assert waiting, out
    under = [n for n, amount in waiting if float(amount) <= 900]
    assert any(re.search(rf"{n} completed ", out) for n in under) or not under, out


@pytest.mark.slow
@pytest.mark.integration  # `mediator dev --redis cluster` starts an embedded cluster
def test_mediator_dev_runs_on_an_embedded_redis_cluster() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mediator", "dev", "--redis", "cluster", "--requests", "20"],
        capture_output=True,
        text=True,
        timeout=DEV_TIMEOUT_S,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.search(
        r"^kafka .* redis  cluster (127\.0\.0\.1:\d+, ){5}127\.0\.0\.1:\d+$", out, re.M
    )
    assert re.search(r"^done: 20 results .*redis says running 0,", out, re.M), out
