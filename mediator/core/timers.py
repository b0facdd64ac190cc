"""Timers the engine sets, and the backoff between attempts: pure values and arithmetic.

A timer belongs to one run and says what to look at when it falls due:

- ``timeout``: attempt ``attempt`` of ``step`` got no reply in time;
- ``retry``: attempt ``attempt`` of ``step`` failed retryably, so the next one is due;
- ``deadline``: the run's own timeout;
- ``undo_timeout`` / ``undo_retry``: the same as ``timeout`` / ``retry``, for the
  compensation of ``step``;
- ``unpark``: the parked attempt ``attempt`` of ``step`` may go out (its service's breaker
  closed; the parked queue drains by setting these, a bounded number at a time);
- ``reroute``: the instance running attempt ``attempt`` of ``step`` was marked down, so
  the next attempt goes out now, to another instance (`mediator.core.routing`);
- ``admit``: the run, queued behind its concurrency key's limit, got a slot (`attempt` is
  the run's round; `mediator.core.concurrency`).

A timer is named by its *member* string, ``kind|workflow_id|step|attempt``, which is also
its entry in the shard's timer set in Redis. The name is deterministic, so a recomputed
transition sets the same timer again rather than a second one, and a timer that fires for
a step that has moved on is recognised as stale, like a stale reply.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

from mediator.core.workflow import RetryPolicy

__all__ = ["TIMER_KINDS", "Fired", "SetTimer", "retry_delay_ms"]

TimerKind = Literal[
    "timeout", "retry", "deadline", "undo_timeout", "undo_retry", "unpark", "reroute", "admit"
]
TIMER_KINDS: frozenset[str] = frozenset(
    {"timeout", "retry", "deadline", "undo_timeout", "undo_retry", "unpark", "reroute", "admit"}
)


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Effect: call the engine back about this run `delay_ms` from the transition."""

    kind: TimerKind
    workflow_id: str
    delay_ms: int
    step: str = ""
    attempt: int = 0

    @property
    def member(self) -> str:
        """The timer's name (and its member in the shard's timer set)."""
        return f"{self.kind}|{self.workflow_id}|{self.step}|{self.attempt}"


@dataclass(frozen=True, slots=True)
class Fired:
    """Event: a timer fell due."""

    kind: TimerKind
    workflow_id: str
    step: str
    attempt: int
    member: str

    @classmethod
    def parse(cls, member: str) -> Fired | None:
        """The timer named `member`, or None if the name is not one the engine sets."""
        parts = member.split("|")
        if len(parts) != 4 or parts[0] not in TIMER_KINDS or not parts[3].isdigit():
            return None
        kind: TimerKind = parts[0]  # type: ignore[assignment]
        return cls(kind, parts[1], parts[2], int(parts[3]), member)


def retry_delay_ms(policy: RetryPolicy, attempt: int, command_id: str) -> int:
    """The pause after failed attempt `attempt` (1 = the first):
    ``min(max_backoff, backoff * multiplier ** (attempt - 1))``, spread by +/- ``jitter``.

    The jitter is drawn from the attempt's command id, not from a random source, so the
    engine stays pure: recomputing a transition gives the same delay.
    """
    base = min(policy.max_backoff_ms, policy.backoff_ms * policy.multiplier ** (attempt - 1))
    spread = (zlib.crc32(command_id.encode()) % 10_000) / 10_000  # 0 <= spread < 1
    return max(0, round(base * (1 + policy.jitter * (2 * spread - 1))))
