"""Circuit breakers shared through a real Redis: pybreaker's state machine on each
replica's mirror, written back with compare-and-set."""

from __future__ import annotations

import asyncio
import logging

import pybreaker
import pytest
import redis.exceptions
from redis.asyncio import Redis

from mediator.runtime.breakers import Breakers
from mediator.runtime.parking import BreakerUpkeep
from mediator.settings import BackoffSettings, BreakerSettings
from mediator.storage.keys import Keys
from tests.helpers import wait_for

NOW = 1_700_000_000_000


def two_replicas(redis_client: Redis, key_prefix: str, **policy: object) -> list[Breakers]:
    settings = BreakerSettings.model_validate({"failure_threshold": 3, **policy})
    keys = Keys(key_prefix, 4)
    return [Breakers(redis_client, keys, settings, replica=name) for name in ("r1", "r2")]


async def test_failures_are_counted_across_replicas(redis_client: Redis, key_prefix: str) -> None:
    first, second = two_replicas(redis_client, key_prefix)
    await first.record([("pay", False)])
    await second.record([("pay", False)])
    assert first.state("pay") == second.state("pay") == "closed"
    await first.record([("pay", False)])  # the third failure, seen across both
    assert first.state("pay") == "open"
    await second.refresh(["pay"])
    assert second.state("pay") == "open"
    assert second.gate("pay", NOW) == "park"
    raw = await redis_client.hgetall(Keys(key_prefix, 4).breaker("pay"))
    assert raw[b"state"] == b"open"
    assert first.stats.opened == 1
    assert second.stats.conflicts == 1  # its second write found the first's count


async def test_a_success_resets_the_count(redis_client: Redis, key_prefix: str) -> None:
    first, second = two_replicas(redis_client, key_prefix)
    await first.record([("pay", False), ("pay", False)])
    await second.refresh(["pay"])  # replicas refresh every `refresh_ms`
    await second.record([("pay", True)])
    await first.record([("pay", False)])
    assert first.state("pay") == "closed"
    assert first.breaker("pay")[1].counter == 1


async def test_exactly_one_replica_wins_the_probe(redis_client: Redis, key_prefix: str) -> None:
    first, second = two_replicas(redis_client, key_prefix, recovery_timeout="1s")
    await first.record([("pay", False)] * 3)
    await second.refresh(["pay"])
    opened = first.breaker("pay")[1].opened_ms
    later = opened + 1_001
    assert first.gate("pay", later) == second.gate("pay", later) == "probe"
    won = await asyncio.gather(
        first.take_probe("pay", later, 5_000), second.take_probe("pay", later, 5_000)
    )
    assert sorted(won) == [False, True]
    assert first.state("pay") == second.state("pay") == pybreaker.STATE_HALF_OPEN
    assert first.gate("pay", later + 10) == second.gate("pay", later + 10) == "park"
    # The probe succeeds: closed everywhere.
    winner, loser = (first, second) if won[0] else (second, first)
    await winner.record([("pay", True)])
    await loser.refresh(["pay"])
    assert loser.state("pay") == "closed"
    assert loser.gate("pay", later) == "send"


async def test_a_failed_probe_opens_again_and_an_unanswered_one_expires(
    redis_client: Redis, key_prefix: str
) -> None:
    first, second = two_replicas(redis_client, key_prefix, recovery_timeout="1s")
    await first.record([("pay", False)] * 3)
    later = first.breaker("pay")[1].opened_ms + 1_001
    assert await first.take_probe("pay", later, 2_000)
    await second.refresh(["pay"])
    assert second.gate("pay", later + 1_999) == "park"
    assert second.gate("pay", later + 2_000) == "probe"  # no answer in time: another may go
    await first.record([("pay", False)])
    assert first.state("pay") == "open"


async def test_reset_closes_for_everyone(redis_client: Redis, key_prefix: str) -> None:
    first, second = two_replicas(redis_client, key_prefix)
    await first.record([("pay", False)] * 3)
    await second.reset("pay")
    await first.refresh(["pay"])
    assert first.state("pay") == "closed"
    assert first.breaker("pay")[1].counter == 0


async def test_per_service_overrides(redis_client: Redis, key_prefix: str) -> None:
    [first, _] = two_replicas(
        redis_client, key_prefix, services={"fragile": {"failure_threshold": 1}}
    )
    await first.record([("fragile", False), ("sturdy", False)])
    assert first.state("fragile") == "open"
    assert first.state("sturdy") == "closed"


async def test_disabled_breakers_always_send(redis_client: Redis, key_prefix: str) -> None:
    [first, _] = two_replicas(redis_client, key_prefix, enabled=False)
    await first.record([("pay", False)] * 10)
    assert first.gate("pay", NOW) == "send"


def test_breaker_settings_survive_a_dump_and_reload() -> None:
    # Replicas started as processes get their settings as a dumped file: durations must
    # come back as the same milliseconds, not be read again as seconds.
    settings = BreakerSettings.model_validate(
        {"recovery_timeout": "10s", "services": {"pay": {"recovery_timeout": 3}}}
    )
    again = BreakerSettings.model_validate(settings.model_dump(mode="json"))
    assert again == settings
    assert again.policy("pay").recovery_timeout_ms == 3_000
    assert again.recovery_timeout_ms == 10_000


async def test_upkeep_sorts_a_redis_stall_as_transient(
    redis_client: Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Redis timeout in the upkeep is transient: a warning and a backoff, not a traceback.
    [first, _] = two_replicas(redis_client, key_prefix)

    async def stalled(*_: object) -> set[bytes]:
        msg = "Timeout reading from 127.0.0.1:6379"
        raise redis.exceptions.TimeoutError(msg)

    upkeep = BreakerUpkeep(redis_client, Keys(key_prefix, 4), first, list, "r1")
    monkeypatch.setattr(first.hashes.redis, "smembers", stalled)
    upkeep.backoff = BackoffSettings(initial_ms=5, max_ms=10)
    caplog.set_level(logging.WARNING, logger="mediator")
    upkeep.start()
    await wait_for(lambda: upkeep.failures >= 2, what="two failed rounds")
    await upkeep.stop()

    assert upkeep.failures >= 2
    assert all(r.levelno == logging.WARNING for r in caplog.records), caplog.text
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            "breaker upkeep: Redis unavailable while listing services with parked steps: Timeout"
        )
    )


async def test_a_refresh_read_before_a_write_does_not_undo_it(
    redis_client: Redis, key_prefix: str
) -> None:
    # A refresh reads the hash; a write lands; the refresh's older read then reaches the
    # mirror while the write is still returning. The count written must hold: the
    # third failure opens the breaker (it was left at two in Redis: never opened).
    [first, _] = two_replicas(redis_client, key_prefix)
    await first.record([("pay", False)])
    key = Keys(key_prefix, 4).breaker("pay")
    stale = await redis_client.hgetall(key)
    write = first.hashes.compare_and_set

    async def landing_with_a_stale_refresh(*args: object) -> object:
        done = await write(*args)  # type: ignore[arg-type]
        first._load("pay", stale)
        return done

    first.hashes.compare_and_set = landing_with_a_stale_refresh  # type: ignore[method-assign]
    await first.record([("pay", False)])
    first.hashes.compare_and_set = write  # type: ignore[method-assign]
    assert first.breaker("pay")[1].counter == 2
    assert first.stats.opened == 0
    reads = first.hashes.read

    async def overtaken(names: list[str]) -> list[object]:
        # The refresh reads the count of two; the third failure is written before the
        # read comes back.
        raws = await reads(names)
        await first.record([("pay", False)])
        return raws

    first.hashes.read = overtaken  # type: ignore[method-assign]
    await first.refresh(["pay"])  # what a write overtook is not taken back
    first.hashes.read = reads  # type: ignore[method-assign]
    assert first.state("pay") == "open"
    assert (await redis_client.hgetall(key))[b"state"] == b"open"
    assert first.stats.opened == 1


async def test_a_refresh_takes_a_hash_redis_began_again(
    redis_client: Redis, key_prefix: str
) -> None:
    # Redis lost the hash (restarted empty) after this replica's mirror reached version
    # 4; another replica then opened the breaker, at a lower version. That is
    # what Redis holds: a refresh takes it, so commands to `pay` park here too.
    first, second = two_replicas(redis_client, key_prefix)
    for _ in range(2):
        await first.record([("pay", False)])
        await first.record([("pay", True)])
    assert first.breaker("pay")[1].version == 4
    await redis_client.delete(Keys(key_prefix, 4).breaker("pay"))
    await second.record([("pay", False)] * 3)
    assert second.state("pay") == "open"
    await first.refresh(["pay"])
    assert first.state("pay") == "open"
    assert first.gate("pay", NOW) == "park"
