"""The engine's counters, as typed keys: what happened to which service or workflow.

A transition counts events (`Transition.count`) under a `CounterKey`; the key becomes a
field of the shard's counters hash in Redis (`str(key)`: ``svc:<service>:<what>``,
``wf:<name>:<what>``, or a bare ``<what>`` for counts that belong to neither) only where
it is written, so nothing downstream parses names back apart.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["QUEUED", "QUEUED_BY_KEY", "REROUTED", "STEPS_SKIPPED", "CounterKey", "svc", "wf"]


class CounterKey(NamedTuple):
    """One counter: its kind (``svc``, ``wf``, or "" for neither), series and event."""

    kind: Literal["svc", "wf", ""]
    name: str
    what: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}:{self.what}" if self.kind else self.what


def svc(service: str, what: str) -> CounterKey:
    """An event of `service` (commands sent, answered, timed out, parked, ...)."""
    return CounterKey("svc", service, what)


def wf(name: str, what: str) -> CounterKey:
    """An event of the workflow `name` (runs started, finished, compensated, ...)."""
    return CounterKey("wf", name, what)


#: Commands a flow-control limit held in their service's queue (this replica's stats).
QUEUED = CounterKey("", "", "steps:queued")
#: Step attempts a concurrency key held in its queue (this replica's stats).
QUEUED_BY_KEY = CounterKey("", "", "steps:queued_by_key")

#: Steps skipped because their `when` was false.
STEPS_SKIPPED = CounterKey("", "", "steps:skipped")
#: Commands sent to a step's fallback instead of its breaker-blocked service.
REROUTED = CounterKey("", "", "rerouted")
