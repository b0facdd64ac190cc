"""In-process latency samples (the mediator's own overhead), kept bounded."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["Samples", "percentile"]


def percentile(values: Iterable[float], q: float) -> float | None:
    """The `q`-th percentile (0..100) by nearest rank, or None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Samples:
    """The last `size` observations of one measure."""

    def __init__(self, size: int = 100_000) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float, times: int = 1) -> None:
        """Record `value` (`times` times: one per message of a batch)."""
        for _ in range(times):
            self.values.append(value)

    def summary(self) -> dict[str, float | int | None]:
        """Count, p50 and p99."""
        return {
            "count": len(self.values),
            "p50": percentile(self.values, 50),
            "p99": percentile(self.values, 99),
        }

    def clear(self) -> None:
        """Forget every sample."""
        self.values.clear()
