"""What every part of the runtime shares: the consumed record's shape, what one call
produces besides its commits, and the runtime's collaborators and counters (set by
`mediator.runtime.batches.Runtime`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mediator.core.engine import Engine, Transition
from mediator.core.expressions import Template
from mediator.core.signing import Keyring, Operators, Signatures
from mediator.core.state import WorkflowState
from mediator.core.timers import Fired
from mediator.core.workflow import Workflow
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.messages import Message
from mediator.runtime.metrics import Samples
from mediator.runtime.ports import Publisher, StateStore
from mediator.runtime.recording import Recorder
from mediator.runtime.registry import Registry
from mediator.runtime.routing import Router
from mediator.runtime.stats import RuntimeStats
from mediator.runtime.tracing import Tracing
from mediator.settings import FlowControlSettings, LimitsSettings
from mediator.storage.cache import StateCache
from mediator.storage.catalog import DefinitionStore
from mediator.storage.correlation import Correlations
from mediator.storage.keys import Keys
from mediator.storage.limits import Limits
from mediator.storage.slots import Slots
from mediator.storage.store import Claimed, Commit
from topics.events import (
    ControlEvent,
    DeadLetter,
    ReplyEvent,
    RequestEvent,
)
from topics.names import Topics

__all__ = [
    "MAX_CONFLICT_RETRIES",
    "BatchOutput",
    "CompiledSource",
    "Event",
    "Pending",
    "Record",
    "RuntimeContext",
    "Start",
]

MAX_CONFLICT_RETRIES = 8

#: What advances a workflow: a service's reply, one of its timers falling due, or an
#: operator's control (cancel, retry).
Event = ReplyEvent | Fired | ControlEvent


class Record(Protocol):
    """The parts of a consumed Kafka record the runtime reads (aiokafka's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(slots=True)
class Pending:
    """A workflow being advanced within one batch."""

    base: WorkflowState
    transition: Transition
    workflow: Workflow | None
    #: The events it applied, for the audit log (none: the run was abandoned).
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class BatchOutput:
    """What one call produces besides its commits: messages published directly (not
    through the outbox), dead letters, and deployment-wide counts. One per call, never
    shared: the requests and replies subscribers run concurrently on one runtime."""

    direct: list[Message] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    #: Timers (shard, name) that fired and changed nothing: removed after the batch.
    stale_timers: set[tuple[int, str]] = field(default_factory=set)
    #: The timers this call applies, as claimed (their leases: see `Claimed`).
    claimed: dict[tuple[int, str], Claimed] = field(default_factory=dict)
    #: Replies signed with a shared key that name no service (by `id`), with their
    #: records: a shared key must not answer for a service with keys of its own.
    shared: dict[int, Record] = field(default_factory=dict)
    #: Those of `shared` found forged: skipped on every pass (a conflict recomputes).
    forged: set[int] = field(default_factory=set)
    #: What became of each control (by id): applied, or refused and why; recorded in
    #: Redis after the batch, where the operator's command line waits for it.
    controls: dict[str, tuple[bool, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CompiledSource:
    """A signal source (`SignalSource`) with its expressions compiled."""

    event: str
    key: Template
    payload: Template | None


@dataclass(slots=True)
class Start:
    """A request about to start a run."""

    request: RequestEvent
    workflow: Workflow
    transition: Transition  # its state carries the request's fingerprint and origin
    commit: Commit | None = None
    messages: list[Message] = field(default_factory=list)


class RuntimeContext:
    """The runtime's collaborators and counters; each part of it is a subclass."""

    cache: StateCache
    _stamp_prefix: str
    _stamps: Iterator[int]
    recorder: Recorder | None
    tracing: Tracing | None
    replica: str
    definitions: DefinitionStore
    store: StateStore
    keys: Keys
    dispatcher: Publisher
    topics: Topics
    limits: LimitsSettings
    engine: Engine
    breakers: Breakers | None
    registry: Registry | None
    signatures: Signatures | None
    controls_signed: bool
    operators: Operators | None
    requests_signed: str
    clients: Keyring | None
    request_signer: tuple[str, Keyring] | None
    correlations: Correlations | None
    signal_sources: dict[str, CompiledSource]
    flow: FlowControlSettings
    events: bool
    limiter: Limits | None
    per_instance: bool
    slots: Slots | None
    _releases: dict[str, list[str]]
    _release_task: asyncio.Task[None] | None
    _place_checks: set[asyncio.Task[None]]
    control_signer: tuple[str, Keyring] | None
    overhead: Samples
    boundaries: list[Boundary]
    stats: RuntimeStats
    router: Router | None
    timer_lag: Samples
    on_timer_set: Callable[[Mapping[int, int]], None] | None
