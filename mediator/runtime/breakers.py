"""Circuit breakers, one per service, shared by every replica through Redis.

Each breaker is a pybreaker `CircuitBreaker` (its state machine, thresholds, listeners)
over a `MirrorStorage`: an in-memory copy of the breaker's hash in Redis. pybreaker only
ever touches the mirror, so it never blocks the event loop; the runtime does the I/O:

- `record` feeds a batch's outcomes (successes, and failures: timeouts and retryable
  errors) through pybreaker, then writes the mirror back with a compare-and-set on the
  hash's version (``breaker.lua``). If another replica changed the breaker meanwhile,
  the mirror is reloaded from what Redis returned and the same outcomes are fed again, so
  failures are counted across every replica and a threshold is crossed exactly once.
- `gate` says, from the mirror, whether a command may go: ``send`` (closed), ``park``
  (open, or half-open with the probe out) or ``probe`` (open past its recovery timeout).
- `take_probe` moves an open breaker to half-open through the same compare-and-set:
  exactly one replica wins it, and that replica sends the one probe command.
- `refresh` reloads every mirror (a replica learns of breakers others opened within
  ``refresh_ms``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import pybreaker
from redis.asyncio import Redis

from mediator.errors import StateUnavailable
from mediator.runtime.stats import BreakerStats
from mediator.settings import BreakerSettings
from mediator.storage.breakers import BreakerHashes
from mediator.storage.connection import text
from mediator.storage.keys import Keys

__all__ = ["Breakers", "Gate", "MirrorStorage"]

log = logging.getLogger("mediator.breakers")

Gate = Literal["send", "park", "probe"]

_CAS_ROUNDS = 8


class MirrorStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage, held in memory and mirrored to and from a Redis hash."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._state: str = pybreaker.STATE_CLOSED
        self._counter = 0
        self._success = 0
        self._opened_at: datetime | None = None
        #: The hash's version this mirror was read at (the compare-and-set guard).
        self.version = 0
        #: While half-open: until when (ms) the probe sent is awaited.
        self.probe_until_ms = 0

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state

    def increment_counter(self) -> None:
        self._counter += 1

    def reset_counter(self) -> None:
        self._counter = 0

    def increment_success_counter(self) -> None:
        self._success += 1

    def reset_success_counter(self) -> None:
        self._success = 0

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def success_counter(self) -> int:
        return self._success

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value

    @property
    def opened_ms(self) -> int:
        return int(self._opened_at.timestamp() * 1000) if self._opened_at else 0

    def fields(self) -> tuple[str, int, int, int, int]:
        """What is written to Redis (and compared to see whether feeding changed it)."""
        return (self._state, self._counter, self._success, self.opened_ms, self.probe_until_ms)

    def as_fields(self) -> dict[str, Any]:
        """`fields` by name, as the breaker's hash in Redis holds them."""
        state, counter, success, opened, probe = self.fields()
        return {
            "state": state,
            "counter": counter,
            "success": success,
            "opened_ms": opened,
            "probe_until_ms": probe,
        }

    def load(self, raw: dict[Any, Any]) -> None:
        """Take the values of the breaker's hash (HGETALL) as they are in Redis."""
        doc = {text(k): text(v) for k, v in raw.items()}
        self.version = int(doc.get("version", 0))
        self._state = doc.get("state", pybreaker.STATE_CLOSED)
        self._counter = int(doc.get("counter", 0))
        self._success = int(doc.get("success", 0))
        opened = int(doc.get("opened_ms", 0))
        self._opened_at = datetime.fromtimestamp(opened / 1000, UTC) if opened else None
        self.probe_until_ms = int(doc.get("probe_until_ms", 0))


class _Failure(Exception):
    """What a failed command looks like to pybreaker."""


def _fail() -> None:
    raise _Failure


def _succeed() -> None:
    return None


class _Transitions(pybreaker.CircuitBreakerListener):
    """Collects state changes until they are known to have been written to Redis."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str]] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else "none"
        self.changes.append((cb.name or "", old, new_state.name))


class Breakers:
    """Every service's breaker, as seen by this replica."""

    def __init__(
        self, redis: Redis, keys: Keys, settings: BreakerSettings, replica: str = ""
    ) -> None:
        self.hashes = BreakerHashes(redis, keys)
        self.settings = settings
        self.replica = replica
        self._breakers: dict[str, pybreaker.CircuitBreaker] = {}
        self._storages: dict[str, MirrorStorage] = {}
        self._listener = _Transitions()
        self.stats = BreakerStats()
        #: Called with (service, old state, new state) for each transition this replica
        #: made (so each is reported once, by the replica that made it).
        self.on_change: list[Callable[[str, str, str], None]] = []
        #: Services this replica knows are in `Keys.parked_services`.
        self._parking: set[str] = set()
        #: Per service, bumped when a write of its breaker starts and when it ends (odd:
        #: one is in flight). A refresh loads only what no write overlapped.
        self._writes: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def breaker(self, service: str) -> tuple[pybreaker.CircuitBreaker, MirrorStorage]:
        """The breaker of `service` (created closed the first time it is named)."""
        cb = self._breakers.get(service)
        if cb is None:
            policy = self.settings.policy(service)
            storage = MirrorStorage(service)
            cb = pybreaker.CircuitBreaker(
                fail_max=policy.failure_threshold,
                reset_timeout=policy.recovery_timeout_ms / 1000,
                success_threshold=policy.success_threshold,
                listeners=[self._listener],
                state_storage=storage,
                name=service,
            )
            self._breakers[service] = cb
            self._storages[service] = storage
        return cb, self._storages[service]

    def gate(self, service: str, now_ms: int) -> Gate:
        """May a command go to `service` now? From this replica's mirror."""
        if not self.settings.enabled:
            return "send"
        _, storage = self.breaker(service)
        state = storage.state
        if state == pybreaker.STATE_CLOSED:
            return "send"
        if state == pybreaker.STATE_OPEN:
            policy = self.settings.policy(service)
            due = storage.opened_ms + policy.recovery_timeout_ms
            return "probe" if now_ms >= due else "park"
        return "probe" if now_ms >= storage.probe_until_ms else "park"

    def state(self, service: str) -> str:
        """``closed``, ``open`` or ``half-open`` (this replica's view)."""
        return self.breaker(service)[1].state

    async def take_probe(self, service: str, now_ms: int, hold_ms: int) -> bool:
        """Try to move `service`'s breaker to half-open and hold its one probe for
        `hold_ms`; True for the one replica that wins (it then sends one command). When
        Redis cannot take the write, the mirror is as it was and the failure is raised."""
        for _ in range(_CAS_ROUNDS):
            if self.gate(service, now_ms) != "probe":
                return False
            cb, storage = self.breaker(service)
            before = {"version": storage.version, **storage.as_fields()}
            cb.half_open()
            storage.probe_until_ms = now_ms + hold_ms
            try:
                won = await self._write(service)
            except StateUnavailable:
                self._load(service, before)
                raise
            if won:
                self.stats.probes += 1
                log.info("breaker of %s: half-open, probe sent", service)
                return True
        return False

    async def note_parking(self, service: str) -> None:
        """`service` is about to have a step parked: list it among the services whose
        parked queues are drained (before the step is committed as parked, so none is
        ever parked where no upkeep looks)."""
        if service in self._parking:
            return
        await self.hashes.note_parking(service)
        self._parking.add(service)

    async def parking_services(self) -> set[str]:
        """Every service that ever had a step parked."""
        found = await self.hashes.parking_services()
        self._parking |= found
        return found

    async def record(self, outcomes: Iterable[tuple[str, bool]]) -> None:
        """Feed command outcomes (service, succeeded) to the breakers and share them."""
        if not self.settings.enabled:
            return
        by_service: dict[str, list[bool]] = {}
        for service, ok in outcomes:
            by_service.setdefault(service, []).append(ok)
        for service, results in by_service.items():
            for _ in range(_CAS_ROUNDS):
                cb, storage = self.breaker(service)
                before = storage.fields()
                for ok in results:
                    if ok and storage.state == pybreaker.STATE_CLOSED and not storage.counter:
                        continue  # changes nothing: skip pybreaker's call on the hot path
                    _feed(cb, ok)
                if storage.fields() == before or await self._write(service):
                    break
            else:
                log.warning("breaker of %s: outcomes not recorded after retries", service)

    async def reset(self, service: str) -> None:
        """Close `service`'s breaker now (an operator's reset)."""
        for _ in range(_CAS_ROUNDS):
            cb, storage = self.breaker(service)
            cb.close()
            storage.probe_until_ms = 0
            if await self._write(service):
                log.warning("breaker of %s: reset to closed by an operator", service)
                return
        msg = f"breaker of {service} kept changing; reset not applied"
        raise StateUnavailable(msg)

    async def refresh(self, services: Iterable[str] = ()) -> None:
        """Reload the mirrors of `services` and of every breaker seen so far."""
        names = sorted({*self._breakers, *services})
        if not names:
            return
        writes = [self._writes.get(name, 0) for name in names]
        raws = await self.hashes.read(names)
        for name, raw, before in zip(names, raws, writes, strict=True):
            # A read that a write of this replica overlapped may be older than what was
            # written: the write leaves the mirror as it should be. Otherwise Redis is
            # taken as it is, even at a lower version (it lost the hash and began again).
            if raw and before % 2 == 0 and self._writes.get(name, 0) == before:
                self._load(name, raw)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every breaker this replica knows: state, failures counted, when it opened."""
        return {
            name: {
                "state": storage.state,
                "failures": storage.counter,
                "opened_ms": storage.opened_ms or None,
                "probe_until_ms": storage.probe_until_ms or None,
            }
            for name, storage in sorted(self._storages.items())
        }

    async def _write(self, service: str) -> bool:
        """Compare-and-set the mirror into Redis. False after a conflict (the mirror then
        holds what Redis has)."""
        _, storage = self.breaker(service)
        expected, written = storage.version, storage.as_fields()
        # What was fed is this write's: a refresh during it must not take it back.
        changes, self._listener.changes = self._listener.changes, []
        self._writes[service] = self._writes.get(service, 0) + 1
        try:
            version, held = await self.hashes.compare_and_set(
                service, expected, storage.fields(), self.replica
            )
        except StateUnavailable:
            self.stats.errors += 1
            self._listener.changes.clear()
            raise
        finally:
            self._writes[service] += 1
        if held is None:
            if (storage.version, storage.as_fields()) != (expected, written):
                # Something loaded the mirror while this write was in flight: it holds
                # what was just written.
                self._load(service, {"version": version, **written})
            storage.version = version
            self._listener.changes = changes
            self._announce()
            return True
        self.stats.conflicts += 1
        self._listener.changes.clear()
        self._load(service, held)
        return False

    def _load(self, service: str, raw: dict[Any, Any]) -> None:
        cb, storage = self.breaker(service)
        storage.load(raw)
        held = {"version": storage.version, **storage.as_fields()}
        # pybreaker notices the state changed elsewhere on its next look (and, entering
        # closed, resets the counter): let it, then put back what Redis holds.
        _ = cb.state
        self._listener.changes.clear()
        storage.load(held)

    def _announce(self) -> None:
        for service, old, new in self._listener.changes:
            if new == pybreaker.STATE_OPEN:
                self.stats.opened += 1
            elif new == pybreaker.STATE_CLOSED:
                self.stats.closed += 1
            elif new == pybreaker.STATE_HALF_OPEN:
                self.stats.half_opened += 1
            level = logging.WARNING if new == pybreaker.STATE_OPEN else logging.INFO
            log.log(level, "breaker of %s: %s -> %s", service, old, new)
            for callback in self.on_change:
                callback(service, old, new)
        self._listener.changes.clear()


def _feed(cb: pybreaker.CircuitBreaker, ok: bool) -> None:
    try:
        cb.call(_succeed if ok else _fail)
    except (_Failure, pybreaker.CircuitBreakerError):
        pass
