"""Pydantic models of every event on the wire.

All events are JSON objects with a ``type`` tag and a ``schema_version``. Timestamps are
integer milliseconds since the Unix epoch (``*_ms``). Unknown fields are rejected, so a
producer that drifts from the contract gets a dead letter naming the field rather than
silent data loss.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EVENT_MODELS",
    "SCHEMA_VERSION",
    "TERMINAL",
    "AlertEvent",
    "AlertState",
    "AttemptSummary",
    "CommandEvent",
    "ControlAction",
    "ControlEvent",
    "DeadLetter",
    "ErrorInfo",
    "Event",
    "HealthEvent",
    "HealthStatus",
    "MarkEvent",
    "ParentRef",
    "ReplyEvent",
    "ReplyStatus",
    "RequestEvent",
    "ResultEvent",
    "StepSummary",
    "TransitionEvent",
    "WorkflowStatus",
]

SCHEMA_VERSION = 1

#: A Kafka topic name: what `reply_to` fields must look like.
TOPIC_NAME = r"^[A-Za-z0-9._-]{1,249}$"
#: Service and instance names: letters, digits and ``._:@-``, up to 200 characters. They
#: become Redis keys, routed-index members (``|``-separated) and metric labels.
NAME = r"^[A-Za-z0-9_][A-Za-z0-9._:@-]{0,199}$"

Identifier = str
JsonObject = dict[str, Any]


class WorkflowStatus(StrEnum):
    """Lifecycle of one workflow run."""

    RUNNING = "running"
    #: A step failed for good, the deadline passed or an operator cancelled: completed
    #: steps are being compensated; the result follows when that is done.
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    #: An operator cancelled the run (and its compensations, if any, succeeded).
    CANCELLED = "cancelled"
    #: A compensation failed for good: something may not have been undone. Ops look here.
    COMPENSATION_FAILED = "compensation_failed"

    @classmethod
    def terminal(cls) -> frozenset[WorkflowStatus]:
        """Statuses a workflow never leaves."""
        return TERMINAL


#: Statuses a workflow never leaves.
TERMINAL = frozenset(
    {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.CANCELLED,
        WorkflowStatus.COMPENSATION_FAILED,
    }
)


class ReplyStatus(StrEnum):
    """Outcome of one command as reported by a service."""

    OK = "ok"
    ERROR = "error"


class HealthStatus(StrEnum):
    """What a service instance says about itself in a heartbeat."""

    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


class Event(BaseModel):
    """Base of every event: frozen, strict about unknown fields, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1


class ErrorInfo(BaseModel):
    """What went wrong, in a shape any language can produce."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message: str
    code: str = "error"
    retryable: bool = False
    step: str | None = None


class ParentRef(BaseModel):
    """The step of another run that a run answers: the parent of a child run (on its
    request), or the compensation of a child step (on a `compensate` control). The run
    publishes its outcome to it as a `ReplyEvent` with this `command_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workflow_id: Identifier
    step: str
    attempt: int = Field(ge=1)
    command_id: Identifier
    depth: int = Field(
        default=1, ge=1, le=1000, description="How many parents the run has (1: a child)."
    )


class RequestEvent(Event):
    """A client asks the mediator to run a workflow. Key: ``request_id``."""

    type: Literal["request"] = "request"
    request_id: Identifier = Field(min_length=1, max_length=200)
    workflow: str = Field(min_length=1, max_length=200)
    payload: JsonObject = Field(default_factory=dict)
    reply_to: str | None = Field(
        default=None,
        pattern=TOPIC_NAME,
        description="Topic for the result; defaults to mediator.results.",
    )
    trace_id: str | None = None
    created_ms: int | None = None
    version: int | None = Field(
        default=None, ge=1, description="Run this version of the workflow; default: the latest."
    )
    parent: ParentRef | None = Field(
        default=None,
        description="Set by the mediator on a child run's request: the parent's step that "
        "waits for it. Accepted only from the mediator (signed with its client key).",
    )
    priority: int = Field(
        default=0,
        ge=0,
        le=9,
        description="Where the run goes in its concurrency key's queue, if it has to wait "
        "for a slot: higher first, then oldest first.",
    )


class CommandEvent(Event):
    """The mediator asks a service to perform one step. Key: ``workflow_id``."""

    type: Literal["command"] = "command"
    command_id: Identifier = Field(
        description="Unique per step attempt (and per round and compensation); deduplicate on it."
    )
    workflow_id: Identifier
    request_id: Identifier
    workflow: str
    step: str
    service: str
    action: str
    attempt: int = Field(ge=1)
    input: Any = None
    reply_to: str = Field(
        pattern=TOPIC_NAME, description="Topic the ReplyEvent must be published to."
    )
    deadline_ms: int | None = Field(
        default=None, description="After this instant the mediator no longer waits for it."
    )
    trace_id: str | None = None
    sent_ms: int
    instance: str | None = Field(
        default=None,
        description="The registered instance it was routed to (published to a partition that "
        "instance owns); None when the service's consumer group alone decides.",
    )
    idempotency_key: Identifier | None = Field(
        default=None,
        description="The same for every attempt, reroute and hand-on of this step in one round "
        "of its run (a new one after an operator's retry, and for its compensation): a service "
        "that does the work once per key is effect-once across retries.",
    )


class ReplyEvent(Event):
    """A service reports the outcome of a command. Key: ``workflow_id``."""

    type: Literal["reply"] = "reply"
    command_id: Identifier
    workflow_id: Identifier
    step: str
    attempt: int = Field(ge=1)
    status: ReplyStatus
    output: Any = None
    error: ErrorInfo | None = None
    service: str | None = Field(default=None, pattern=NAME)
    instance: str | None = Field(default=None, pattern=NAME)
    trace_id: str | None = None
    replied_ms: int | None = None


class AttemptSummary(BaseModel):
    """One earlier attempt of a step: when it ran and why it failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempt: int
    started_ms: int | None = None
    finished_ms: int | None = None
    error: ErrorInfo | None = None
    instance: str | None = Field(default=None, description="The instance it was routed to.")


class StepSummary(BaseModel):
    """One step's outcome as reported in a result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: str
    attempts: int = 0
    duration_ms: int | None = None
    error: ErrorInfo | None = Field(default=None, description="Why the last attempt failed.")
    history: list[AttemptSummary] = Field(
        default_factory=list, description="The attempts before the last, oldest first."
    )
    service: str | None = Field(
        default=None, description="Set when the last attempt went to a fallback service."
    )
    instance: str | None = Field(
        default=None, description="The instance that ran (or was sent) the last attempt."
    )


class ResultEvent(Event):
    """The outcome of a workflow. Key: ``request_id``.

    Results leave through an at-least-once outbox, so a consumer may see one twice:
    ``result_id`` is the same for every copy of one result, so key deduplication on it.
    """

    type: Literal["result"] = "result"
    result_id: Identifier | None = Field(
        default=None, description="Stable across re-sends of this result: deduplicate on it."
    )
    request_id: Identifier
    workflow_id: Identifier | None = None
    workflow: str
    status: WorkflowStatus
    output: Any = None
    error: ErrorInfo | None = None
    steps: dict[str, StepSummary] = Field(default_factory=dict)
    compensations: dict[str, StepSummary] = Field(
        default_factory=dict,
        description="The compensations that ran (step id -> how its undo ended), if any.",
    )
    started_ms: int | None = None
    finished_ms: int
    trace_id: str | None = None


class HealthEvent(Event):
    """A heartbeat from one service instance. Key: ``instance``."""

    type: Literal["health"] = "health"
    service: str = Field(pattern=NAME)
    instance: str = Field(pattern=NAME)
    status: HealthStatus = HealthStatus.UP
    load: float = Field(
        default=0.0, ge=0.0, le=1e6, allow_inf_nan=False, description="In-flight commands."
    )
    capacity: int = Field(default=1, ge=1, le=1_000_000, description="Commands it can run at once.")
    inbox: str | None = Field(
        default=None, pattern=TOPIC_NAME, description="Topic addressed to this instance."
    )
    partitions: list[Annotated[int, Field(ge=0, le=100_000)]] = Field(
        default_factory=list,
        max_length=10_000,
        description="The partitions of its service topic this instance owns now (its "
        "consumer group's assignment); commands routed to it go to one of them.",
    )
    weight: float = Field(
        default=1.0,
        gt=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Its share under `weighted`.",
    )
    interval_ms: int = Field(
        default=1000,
        ge=10,
        le=600_000,
        description="How often it heartbeats (at most every 10 minutes); the registry's TTL "
        "follows.",
    )
    answered: int = Field(
        default=0, ge=0, le=10**9, description="Commands answered since the last one."
    )
    errors: int = Field(default=0, ge=0, le=10**9, description="Of those, error replies.")
    latency_ms: float | None = Field(
        default=None,
        ge=0.0,
        le=1e9,
        allow_inf_nan=False,
        description="Their mean time in the handler.",
    )
    version: str | None = None
    ts_ms: int
    boot: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9]{1,32}$",
        description="Random per process start: a heartbeat of an earlier start of the same "
        "instance id (replayed, or late) is not taken for this one's.",
    )
    seq: int | None = Field(
        default=None, ge=0, description="Counts this boot's heartbeats: one not newer is stale."
    )


class MarkEvent(Event):
    """A marker the mediator writes into every partition of the health topic (no service
    sends one): Redis's time `t_ms`, read before it was sent. Whoever has read it has read
    every heartbeat that partition got before then, so silence up to `t_ms` is evidence
    that an instance stopped, not that the mediator fell behind. Consumers of the health
    topic other than the mediator skip these. Key: ``mediator-mark``."""

    type: Literal["mark"] = "mark"
    t_ms: int
    replica: str | None = None


class ControlAction(StrEnum):
    """What an operator asks of the mediator."""

    #: Stop a running run: compensate its completed steps, then end it `cancelled`.
    CANCEL = "cancel"
    #: Run a failed or cancelled run again from its unfinished steps, keeping completed
    #: outputs (steps whose work was compensated run again).
    RETRY = "retry"
    #: Close a service's circuit breaker now; its parked commands drain.
    RESET_BREAKER = "reset_breaker"
    #: Route no new command to one instance of a service (`service`, `instance`) while
    #: those in flight finish; it stays drained until it leaves or is marked down.
    DRAIN = "drain"
    #: Route commands to a drained instance again.
    UNDRAIN = "undrain"
    #: Hold a running (or compensating) run: no command, retry or compensation is sent
    #: until it is resumed; replies to commands in flight are still applied.
    PAUSE = "pause"
    #: Let a paused run go on: what fell due or became ready meanwhile is sent.
    RESUME = "resume"
    #: Deliver the signal `signal` (with `payload`) to a run: the step waiting on it
    #: completes with the payload; if none waits yet, the run keeps it for the first that
    #: will.
    SIGNAL = "signal"
    #: Undo a completed run (its completed steps' compensations, in reverse) and reply to
    #: `reply` when done: what a parent sends the child run of a step it compensates.
    COMPENSATE = "compensate"
    #: Sent by the mediator for a `wait` step with a correlation `key`: signals `signal`
    #: sent for `key` go to the run `workflow_id` from now on (and those kept, at once).
    SUBSCRIBE = "subscribe"


class ControlEvent(Event):
    """An operator's command to the mediator. Key: the workflow id or the service."""

    type: Literal["control"] = "control"
    control_id: Identifier = Field(min_length=1, max_length=200)
    action: ControlAction
    workflow_id: Identifier | None = None
    service: str | None = None
    instance: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=2000)
    operator: str | None = None
    issued_ms: int
    pause_deadline: bool = Field(
        default=False,
        description="With `pause`: the run's deadline stops counting until it is resumed.",
    )
    signal: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$",
        description="With `signal`: the signal's name (what a `wait` step waits for).",
    )
    payload: dict[str, Any] | None = Field(
        default=None, description="With `signal`: the output of the step it completes."
    )
    key: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="With `signal`, instead of `workflow_id`: the correlation key a `wait` step "
        "computed (the run waiting on it gets the signal); with `subscribe`: the key.",
    )
    reply: ParentRef | None = Field(
        default=None,
        description="With `compensate`: the parent's compensation that waits for the outcome.",
    )


class TransitionEvent(Event):
    """One transition of a run or of one of its steps, as committed (with `events.enabled`,
    on ``mediator.events``, key: the workflow id). Published through the outbox with the
    commit that made it: at least once, in commit order per run; `event_id` is stable
    (``<workflow_id>:<rev>:<n>``), so a consumer deduplicates on it, and `rev` orders a
    run's events (a projection applies an event only if its `rev` is newer)."""

    type: Literal["transition"] = "transition"
    event_id: Identifier
    workflow_id: Identifier
    request_id: Identifier
    workflow: str
    version: int
    rev: int = Field(ge=1, description="The run's revision this transition committed.")
    kind: Literal[
        "run_started",
        "run_compensating",
        "run_finished",
        "run_reopened",
        "run_paused",
        "run_resumed",
        "run_queued",
        "run_admitted",
        "step_sent",
        "step_completed",
        "step_failed",
        "step_retrying",
        "step_parked",
        "step_queued",
        "step_waiting",
        "step_skipped",
        "step_reset",
        "undo_sent",
        "undo_completed",
        "undo_failed",
        "undo_retrying",
    ]
    status: WorkflowStatus = Field(description="The run's status after the transition.")
    step: str | None = None
    attempt: int | None = None
    step_status: str | None = Field(
        default=None, description="The step's (or its compensation's) status after it."
    )
    error: ErrorInfo | None = None
    at_ms: int


class DeadLetter(Event):
    """A message the mediator rejected, kept with the reason so it can be replayed."""

    type: Literal["dead_letter"] = "dead_letter"
    reason: str
    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    value: str = Field(description="The original value, decoded as UTF-8 with replacement.")
    headers: dict[str, str] = Field(default_factory=dict)
    rejected_ms: int
    code: str | None = Field(
        default=None, description="Machine-readable reason: invalid, too_large, undeliverable, ..."
    )
    size: int | None = Field(default=None, description="The original value's size in bytes.")
    truncated: bool = Field(
        default=False, description="True when `value` is only an excerpt of the original."
    )


class AlertState(StrEnum):
    """Whether an alert started or stopped."""

    FIRING = "firing"
    RESOLVED = "resolved"


class AlertEvent(Event):
    """An alert rule crossed its threshold for a service (``firing``), or no longer does
    (``resolved``). Published once per change, never repeated while it holds. Key:
    ``alert_id``: the rule and the service, the same for its firing and its resolve."""

    type: Literal["alert"] = "alert"
    alert_id: str
    state: AlertState
    severity: Literal["info", "warning", "critical"]
    metric: str
    service: str
    value: float | None = Field(description="The measure when evaluated (ms or a share).")
    threshold: float = Field(description="The rule's limit (ms or a share).")
    message: str
    window_ms: int
    since_ms: int = Field(description="When it started firing.")
    ts_ms: int


EVENT_MODELS: dict[str, type[Event]] = {
    "AlertEvent": AlertEvent,
    "RequestEvent": RequestEvent,
    "CommandEvent": CommandEvent,
    "ControlEvent": ControlEvent,
    "ReplyEvent": ReplyEvent,
    "ResultEvent": ResultEvent,
    "HealthEvent": HealthEvent,
    "MarkEvent": MarkEvent,
    "DeadLetter": DeadLetter,
    "TransitionEvent": TransitionEvent,
}
