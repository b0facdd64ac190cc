"""Circuit breakers per service instance, which the balancer routes around.

A service's own breaker (`mediator.runtime.breakers`) stops commands to the whole service;
these stop them to one instance that keeps failing while its siblings are fine (a bad
host, a broken deploy of one pod). Each replica keeps its own, from the outcomes of the
commands whose replies and timeouts it applies: an instance is one of many, so a breaker
that opens a little later on another replica costs a few commands, not correctness.

- **closed**: consecutive failures (timeouts, retryable errors) are counted; a success
  resets the count. At `failure_threshold` it opens.
- **open**: the balancer skips the instance for `recovery_ms`.
- **half-open**: then one command goes to it as a probe; a success closes the breaker, a
  failure opens it again. A probe with no outcome within `recovery_ms` lets another go.

When every instance of a service is blocked the balancer has nothing to choose, and the
command goes to the service's topic where its key falls (the service breaker decides
whether the service as a whole is to be spared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["InstanceBreakers", "Policy"]

#: Per service: (failure_threshold, recovery_ms).
Policy = Callable[[str], tuple[int, int]]


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    open_until: int = 0  # ms; 0: closed
    probe_until: int = 0  # ms; a probe is out until then


class InstanceBreakers:
    """One breaker per (service, instance), fed with outcomes, asked before routing."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._breakers: dict[str, dict[str, _Breaker]] = {}
        #: Services with at least one breaker not closed: only they pay for the check.
        self._tripped: set[str] = set()

    def record(self, service: str, instance: str, ok: bool, now_ms: int) -> str | None:
        """Feed one outcome; what changed (``opened``, ``closed``) or None."""
        breakers = self._breakers.setdefault(service, {})
        breaker = breakers.get(instance)
        if breaker is None:
            if ok:
                return None
            breaker = breakers[instance] = _Breaker()
        if ok:
            was_open = breaker.open_until > 0
            self.forget(service, instance)
            return "closed" if was_open else None
        threshold, recovery_ms = self.policy(service)
        breaker.failures += 1
        breaker.probe_until = 0
        if breaker.open_until or breaker.failures >= threshold:
            # A failed probe, or the threshold reached: open (again) for the recovery time.
            reopened = breaker.open_until > 0
            breaker.open_until = now_ms + recovery_ms
            self._tripped.add(service)
            return None if reopened else "opened"
        return None

    def blocked(self, service: str, now_ms: int) -> Callable[[str], bool] | None:
        """The balancer's `blocked` check for `service` now; None when nothing is open."""
        if service not in self._tripped:
            return None
        breakers = self._breakers.get(service, {})
        recovery_ms = self.policy(service)[1]

        def check(instance: str) -> bool:
            breaker = breakers.get(instance)
            if breaker is None or not breaker.open_until:
                return False
            if now_ms < breaker.open_until or now_ms < breaker.probe_until:
                return True
            breaker.probe_until = now_ms + recovery_ms  # half-open: this one is the probe
            return False

        return check

    def open(self, service: str, now_ms: int) -> list[str]:
        """The instances of `service` whose breakers are open (not yet probing) now."""
        breakers = self._breakers.get(service, {})
        return sorted(i for i, b in breakers.items() if b.open_until and now_ms < b.open_until)

    def forget(self, service: str, instance: str) -> None:
        """Close `instance`'s breaker (it answered, left or died: a restart starts with a
        closed breaker)."""
        breakers = self._breakers.get(service, {})
        breakers.pop(instance, None)
        if not any(b.open_until for b in breakers.values()):
            self._tripped.discard(service)
