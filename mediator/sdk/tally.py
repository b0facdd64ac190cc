"""What a service instance says about itself in its heartbeats: the figures since the last
one (commands answered, errors, mean latency), ready to be put in a `HealthEvent`. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Tally"]


@dataclass
class Tally:
    """Commands answered and how, since the last heartbeat."""

    answered: int = 0
    errors: int = 0
    _latency_total_ms: float = field(default=0.0, repr=False)

    def record(self, latency_ms: float, *, error: bool) -> None:
        """One command answered after ``latency_ms`` of work; ``error`` if it failed."""
        self.answered += 1
        self.errors += error
        self._latency_total_ms += latency_ms

    def take(self) -> tuple[int, int, float | None]:
        """(answered, errors, mean latency in ms or None) since the last take; resets."""
        answered, errors = self.answered, self.errors
        mean = round(self._latency_total_ms / answered, 3) if answered else None
        self.answered = self.errors = 0
        self._latency_total_ms = 0.0
        return answered, errors, mean
