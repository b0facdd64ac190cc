"""Load balancing: pick the service instance a command goes to. Pure, no I/O.

Strategies, per service:

- ``round_robin``: each eligible instance in turn.
- ``weighted``: smooth weighted round-robin (nginx's algorithm) by instance weight.
- ``least_loaded``: the lowest load / capacity, ties broken in turn.
- ``consistent_hash``: rendezvous hashing on a request key, so the same key keeps going
  to the same instance while it is eligible, and only its keys move when one leaves.

Every strategy skips instances that are down, draining, or whose circuit breaker is open.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Balancer", "Instance", "NoInstance", "Strategy"]


class Strategy(StrEnum):
    """How a service's commands are spread over its instances."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_LOADED = "least_loaded"
    CONSISTENT_HASH = "consistent_hash"


@dataclass(frozen=True, slots=True)
class Instance:
    """What the registry knows of one instance when a command is routed."""

    id: str
    inbox: str
    up: bool = True
    draining: bool = False
    load: float = 0.0
    capacity: int = 1
    weight: int = 1


class NoInstance(LookupError):
    """No eligible instance: all are down, draining or behind an open breaker."""

    def __init__(self, service: str, considered: int):
        self.service, self.considered = service, considered
        super().__init__(
            f"no eligible instance of service {service!r} "
            f"({considered} known, all down, draining or with an open circuit breaker)"
        )


class Balancer:
    """Chooses instances for one service. Holds only the strategy's rotation state."""

    def __init__(self, service: str, strategy: Strategy = Strategy.ROUND_ROBIN) -> None:
        self.service = service
        self.strategy = strategy
        self._turn = 0
        self._current: dict[str, int] = {}

    def choose(
        self,
        instances: Sequence[Instance],
        *,
        key: str | None = None,
        blocked: Callable[[str], bool] | None = None,
    ) -> Instance:
        """The instance the next command goes to; raises `NoInstance` if none is eligible."""
        eligible = [
            i
            for i in instances
            if i.up and not i.draining and not (blocked is not None and blocked(i.id))
        ]
        if not eligible:
            raise NoInstance(self.service, len(instances))
        if self.strategy is Strategy.CONSISTENT_HASH and key is not None:
            return max(eligible, key=lambda i: _score(key, i.id))
        if self.strategy is Strategy.WEIGHTED:
            return self._weighted(eligible)
        if self.strategy is Strategy.LEAST_LOADED:
            lowest = min(i.load / i.capacity for i in eligible)
            eligible = [i for i in eligible if i.load / i.capacity == lowest]
        self._turn += 1
        return eligible[self._turn % len(eligible)]

    def _weighted(self, eligible: Sequence[Instance]) -> Instance:
        total = 0
        best: Instance | None = None
        current = self._current
        for instance in eligible:
            weight = max(instance.weight, 0)
            total += weight
            value = current.get(instance.id, 0) + weight
            current[instance.id] = value
            if best is None or value > current[best.id]:
                best = instance
        assert best is not None
        current[best.id] -= total
        return best


def _score(key: str, instance_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
