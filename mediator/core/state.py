"""The state of one workflow run, as the engine sees it and as Redis stores it.

Plain slots dataclasses, treated as values: nothing changes a state it was given. The
engine forks the state it is handed (`fork`) and changes only its private copy; step
states are replaced, never changed, so a step whose state object is the same in two
states did not change between them: what a commit writes is the run's header
(`dumps_header`) and the steps that changed (`dumps_step`), not the whole run. `dumps`
gives the whole run as one JSON document, as runs were stored before. Default-valued
fields are left out so a finished three-step workflow stays well under a kilobyte.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import KW_ONLY, dataclass, field
from enum import StrEnum
from typing import Any, NotRequired, TypedDict, TypeVar

import orjson

from topics.events import TERMINAL, WorkflowStatus

_T = TypeVar("_T", "StepState", "WorkflowState")

__all__ = [
    "StepState",
    "StepStatus",
    "WorkflowState",
    "dumps",
    "dumps_header",
    "dumps_step",
    "evolve",
    "fork",
    "loads",
    "touched",
]


class StepStatus(StrEnum):
    """Lifecycle of one step within a run."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    #: An attempt failed retryably; the next one is due when its retry timer fires.
    RETRYING = "retrying"
    #: The step's service has its circuit breaker open: the command waits in the
    #: service's parked queue and goes out when the breaker closes (or the step times out).
    PARKED = "parked"
    #: A `wait` step: it waits for its signal (or its timeout).
    WAITING = "waiting"
    #: Held by its service's flow-control limit (`flow_control.services`): the command
    #: waits in the service's queue and goes out, oldest first, when capacity frees; its
    #: timeout starts when it is sent.
    QUEUED = "queued"


#: A dependant may start once each of its dependencies is in one of these.
SATISFIED = frozenset({StepStatus.COMPLETED, StepStatus.SKIPPED})


class Failure(TypedDict):
    """What went wrong with a step or a run, as the state holds it (the fields of the
    contract's `ErrorInfo`): a message for people, a code for programs, whether a retry may
    cure it, and the step it happened in."""

    message: str
    code: NotRequired[str]
    retryable: NotRequired[bool]
    step: NotRequired[str | None]


def failure_of(error: Any) -> Failure:
    """A `Failure` from the contract's `ErrorInfo` (a reply's error)."""
    failure = Failure(message=error.message, code=error.code, retryable=error.retryable)
    if error.step is not None:
        failure["step"] = error.step
    return failure


@dataclass(slots=True)
class StepState:
    """Where one step stands."""

    status: StepStatus = StepStatus.PENDING
    _: KW_ONLY
    attempt: int = 0
    command_id: str | None = None
    output: Any = None
    error: Failure | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    instance: str | None = None
    #: The attempts before the current one: ``{attempt, started_ms, finished_ms, error}``.
    history: list[dict[str, Any]] | None = None
    #: Attempts made before the current round (an operator's retry starts a new round;
    #: attempt numbers go on, so every command id stays unique).
    base: int = 0
    #: The fallback service the current attempt was rerouted to, if it was. For a
    #: compensation of work done at more than one service: the service it undoes now.
    via: str | None = None
    #: The step's concurrency key value the current attempt holds (or waits for) a slot
    #: under (`Step.concurrency`).
    key: str | None = None
    #: The services attempts that went out in this round were sent to, comma-separated,
    #: the latest last; kept only for a step undone once attempted
    #: (`Compensation.attempted`).
    sent: str | None = None


@dataclass(slots=True, kw_only=True)
class WorkflowState:
    """Where one workflow run stands. `rev` is the compare-and-set version in Redis."""

    workflow_id: str
    request_id: str
    workflow: str
    version: int
    status: WorkflowStatus
    payload: dict[str, Any]
    created_ms: int
    updated_ms: int
    steps: dict[str, StepState] = field(default_factory=dict)
    reply_to: str | None = None
    trace_id: str | None = None
    deadline_ms: int | None = None
    finished_ms: int | None = None
    output: Any = None
    error: Failure | None = None
    rev: int = 0
    #: What the request asked for (a hash of workflow name and payload): a request id
    #: reused for something else is told so, not given this run's result.
    fingerprint: str | None = None
    #: ``topic/partition/offset`` of the request record that started the run: the same
    #: record redelivered by Kafka is not a new publish and gets no second result.
    origin: str | None = None
    #: The span id of the client's span the request came from (its ``traceparent``): the
    #: parent of the run's span.
    trace_parent: str | None = None
    #: Compensations started (step id -> the compensation's own attempt state), once the
    #: run failed or was cancelled and completed steps are being undone.
    compensations: dict[str, StepState] | None = None
    #: How many times an operator's retry re-opened the run: every id a service can
    #: deduplicate on (idempotency keys, the deadline's timer) is unique per round.
    round: int = 0
    #: The ids of the operators' controls applied to the run (the latest few): a control
    #: delivered again (a rebalance, a rewind) finds its id here and changes nothing.
    controls: list[str] | None = None
    #: Attempts of each step's compensation made in earlier rounds: a compensation's
    #: attempt numbers go on across rounds, as a step's do, so its command ids and timer
    #: names are never reused.
    undo_base: dict[str, int] | None = None
    #: Which commit wrote this revision (unique per commit, set by the store): `rev`
    #: alone would match again after a Redis failover that lost the writes past it, so a
    #: state cached before the loss could commit over the older state that took its place.
    stamp: str | None = None
    #: The client whose key signed the request that started the run (signed requests).
    client: str | None = None
    #: When an operator paused the run (None while it is not paused): no command, retry
    #: or compensation goes out until it is resumed; replies are still applied.
    paused_ms: int | None = None
    #: The timers that fell due while the run was paused, as ``[kind, step, attempt]``
    #: (a retry, an unpark, a reroute, a compensation's retry): set again on resume.
    held: list[list[Any]] | None = None
    #: What was left of the run's deadline when a pause stopped its clock.
    deadline_left_ms: int | None = None
    #: Signals that came before a step waited on them, oldest first, as ``{id, event,
    #: payload, at_ms}``: the first step that waits on one takes it (`core.signals`).
    inbox: list[dict[str, Any]] | None = None
    #: The step of the parent run this child run answers (`topics.events.ParentRef`'s
    #: fields): its outcome is published to it as a reply when the run ends.
    parent: dict[str, Any] | None = None
    #: The parent's compensation a `compensate` control asked this (completed) run to
    #: answer: told the outcome when the undoing ends, in place of `parent`.
    undo_reply: dict[str, Any] | None = None
    #: The run's value of its workflow's concurrency key (`Workflow.concurrency`): it
    #: holds one of the key's slots from when it is admitted until it ends.
    concurrency_key: str | None = None
    #: Since when the run waits in its concurrency key's queue (None: admitted, or no
    #: limit): nothing is dispatched until a slot frees and an ``admit`` timer fires.
    queued_ms: int | None = None
    #: The request's priority (0-9, higher first; None: 0): orders its key's queue.
    priority: int | None = None

    @property
    def terminal(self) -> bool:
        """True once the run completed or failed."""
        return self.status in TERMINAL

    @property
    def condition(self) -> str:
        """The run's status, and whether it is paused or queued: ``running, paused``."""
        if self.paused_ms is not None:
            return f"{self.status.value}, paused"
        if self.queued_ms is not None:
            return f"{self.status.value}, queued"
        return self.status.value


def touched(before: WorkflowState | None, after: WorkflowState) -> Collection[str] | None:
    """The ids of the steps whose state differs between `before` and `after` (step states
    are replaced, never changed: a step whose state object is the same did not change),
    including steps only one of them has; None when that says too little (no `before`, or
    the run started or stopped being finished: every step counts as touched)."""
    if before is None or before.terminal != after.terminal:
        return None
    old, new = before.steps, after.steps
    found = [sid for sid, step in new.items() if old.get(sid) is not step]
    if len(old) != len(new) or any(sid not in old for sid in found):
        found += [sid for sid in old if sid not in new]
    return found


def evolve(obj: _T, **changes: Any) -> _T:
    """A copy of a state with some fields changed (`dataclasses.replace`, but cheaper)."""
    return _COPIERS[type(obj)](obj, changes)  # type: ignore[no-any-return]


def fork(state: WorkflowState) -> WorkflowState:
    """A copy of `state` that may be changed, steps mapping included (step states are shared:
    replace them, never change them)."""
    new: WorkflowState = _COPIERS[WorkflowState](state, _NO_CHANGES)
    new.steps = dict(state.steps)
    return new


def _copier(cls: type) -> Any:
    # Straight-line code per class, as dataclasses itself generates __init__.
    lines = ["def copy(obj, changes):", "    new = new_object(cls)"]
    for name in cls.__dict__["__slots__"]:
        lines.append(f"    new.{name} = changes[{name!r}] if {name!r} in changes else obj.{name}")
    lines.append("    return new")
    namespace: dict[str, Any] = {"cls": cls, "new_object": object.__new__}
    exec("\n".join(lines), namespace)
    return namespace["copy"]


_NO_CHANGES: dict[str, Any] = {}
_COPIERS = {cls: _copier(cls) for cls in (StepState, WorkflowState)}


_STEP_OPTIONAL = (
    "command_id",
    "output",
    "error",
    "started_ms",
    "finished_ms",
    "instance",
    "history",
    "via",
    "key",
    "sent",
)
_WF_OPTIONAL = (
    "stamp",
    "client",
    "reply_to",
    "trace_id",
    "deadline_ms",
    "finished_ms",
    "output",
    "error",
    "fingerprint",
    "origin",
    "trace_parent",
    "controls",
    "undo_base",
    "paused_ms",
    "held",
    "deadline_left_ms",
    "inbox",
    "parent",
    "undo_reply",
    "concurrency_key",
    "queued_ms",
    "priority",
)


def _step_to_dict(step: StepState) -> dict[str, Any]:
    out: dict[str, Any] = {} if step.status is StepStatus.PENDING else {"status": step.status}
    if step.attempt:
        out["attempt"] = step.attempt
    if step.base:
        out["base"] = step.base
    for name in _STEP_OPTIONAL:
        value = getattr(step, name)
        if value is not None:
            out[name] = value
    return out


def dumps(state: WorkflowState) -> bytes:
    """The JSON of `state` as one document (its steps inside, under ``steps``)."""
    doc = _header_doc(state)
    doc["steps"] = {sid: _step_to_dict(step) for sid, step in state.steps.items()}
    return orjson.dumps(doc)


def dumps_header(state: WorkflowState) -> bytes:
    """The JSON of `state` without its steps (stored beside them, one per step)."""
    return orjson.dumps(_header_doc(state))


def dumps_step(step: StepState) -> bytes:
    """The JSON of one step's state."""
    return orjson.dumps(_step_to_dict(step))


def _header_doc(state: WorkflowState) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "workflow_id": state.workflow_id,
        "request_id": state.request_id,
        "workflow": state.workflow,
        "version": state.version,
        "status": state.status,
        "payload": state.payload,
        "created_ms": state.created_ms,
        "updated_ms": state.updated_ms,
        "rev": state.rev,
    }
    for name in _WF_OPTIONAL:
        value = getattr(state, name)
        if value is not None:
            doc[name] = value
    if state.round:
        doc["round"] = state.round
    if state.compensations is not None:
        doc["compensations"] = {
            sid: _step_to_dict(step) for sid, step in state.compensations.items()
        }
    return doc


def loads(blob: bytes | str, steps: Mapping[str, bytes | str] | None = None) -> WorkflowState:
    """Rebuild a `WorkflowState` from `dumps` output, or from `dumps_header` output and
    the `dumps_step` output of each step (`steps`, by step id)."""
    doc = orjson.loads(blob)
    raw = doc.pop("steps", None) or {}
    if steps is not None:
        raw = {sid: orjson.loads(step) for sid, step in steps.items()}
    steps_ = _steps(raw)
    if "compensations" in doc:
        doc["compensations"] = _steps(doc["compensations"])
    doc["status"] = WorkflowStatus(doc["status"])
    return WorkflowState(steps=steps_, **doc)


def _steps(raw_steps: dict[str, Any]) -> dict[str, StepState]:
    return {
        sid: StepState(**{**raw, "status": StepStatus(raw.get("status", "pending"))})
        for sid, raw in raw_steps.items()
    }
