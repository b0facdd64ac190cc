"""Waiting for signals (pure): a `wait` step sends nothing; it waits for a signal of its
name, delivered to its run by an operator's ``signal`` control (the CLI, the SDK, the
dashboard), and completes with the signal's payload as its output.

A step may take only the signals its `match` holds for; it may also be reached by a
correlation key it computes from the run (`key`: a payment id, an order number), for
senders that do not know the run: starting to wait subscribes the run to the key
(`Subscribe`, a ``subscribe`` control), and signals sent for the key before that are kept
in Redis and handed over then (`mediator.storage.correlation`).

A signal that comes before any step waits on it is kept with the run (its ``inbox``, at
most `MAX_INBOX`, each for `INBOX_TTL_MS`) and taken by the first step that waits on one
of that name. A step's timeout counts from when it starts waiting; when it passes the
attempt fails with ``timeout``, and the step's `retry` (a new wait) or the run's saga
takes over, as for any step.
"""

from __future__ import annotations

from typing import Any

from mediator.core.expressions import ExpressionError
from mediator.core.state import StepState, StepStatus, WorkflowState
from mediator.core.timers import SetTimer
from mediator.core.transition import Subscribe, Transition, context, timer_name
from mediator.core.workflow import Step, Workflow

__all__ = [
    "INBOX_TTL_MS",
    "MAX_INBOX",
    "correlation_key",
    "deliver",
    "keep",
    "matches",
    "start_wait",
    "waiting_step",
]

#: Signals a run keeps for steps that do not wait yet.
MAX_INBOX = 16
#: How long a kept signal waits for its step.
INBOX_TTL_MS = 7 * 24 * 3_600_000


def waiting_step(
    workflow: Workflow, state: WorkflowState, event: str, payload: dict[str, Any] | None
) -> str | None:
    """The first step (in plan order) waiting on the signal `event` whose `match` takes
    `payload`, if any."""
    for sid in workflow.order:
        step = workflow.steps[sid]
        if (
            state.steps[sid].status is StepStatus.WAITING
            and step.wait == event
            and matches(step, state, payload)
        ):
            return sid
    return None


def matches(step: Step, state: WorkflowState, payload: dict[str, Any] | None) -> bool:
    """Whether the `wait` step `step` takes a signal with `payload`: its `match` holds on
    it (``event``) and the run. A `match` that cannot be evaluated on it does not."""
    if step.wait_match is None:
        return True
    values = context(state, state.steps)
    values["event"] = payload or {}
    try:
        return step.wait_match.holds(values)
    except ExpressionError:
        return False


def correlation_key(step: Step, state: WorkflowState) -> str | None:
    """The correlation key of the `wait` step `step` for `state` (None: it has none, or
    its expression gives nothing: only signals to the run reach it then)."""
    if step.wait_key is None:
        return None
    try:
        key = step.wait_key.render(context(state, state.steps))
    except ExpressionError:
        return None
    if key is None or isinstance(key, dict | list) or key == "":
        return None
    return str(key).lower() if isinstance(key, bool) else str(key)


def start_wait(
    transition: Transition,
    step: Step,
    now_ms: int,
    attempt: int,
    history: list[dict[str, Any]] | None,
    base: int,
) -> StepState:
    """`attempt` of the `wait` step `step` begins: completed at once by a signal the run
    kept for it, else waiting (with its timeout timer, if it has one)."""
    state = transition.state
    kept = _take(state, step, now_ms)
    if kept is not None:
        return StepState(
            StepStatus.COMPLETED,
            attempt=attempt,
            output=kept.get("payload") or {},
            started_ms=now_ms,
            finished_ms=now_ms,
            history=history,
            base=base,
            instance=kept.get("by"),
        )
    if step.timeout_ms:
        transition.timers.append(
            SetTimer("timeout", state.workflow_id, step.timeout_ms, step.id, attempt)
        )
    key = correlation_key(step, state)
    if key is not None:  # signals sent for the key reach this run from now on
        transition.effects.append(Subscribe(step.wait or "", key, step.id, attempt))
    return StepState(
        StepStatus.WAITING, attempt=attempt, started_ms=now_ms, history=history, base=base
    )


def deliver(
    workflow: Workflow,
    transition: Transition,
    sid: str,
    payload: dict[str, Any] | None,
    now_ms: int,
    by: str | None,
) -> None:
    """Complete the waiting step `sid` with `payload` (`by`: who sent the signal)."""
    state = transition.state
    waiting = state.steps[sid]
    if workflow.steps[sid].timeout_ms:
        transition.cleared.append(timer_name("timeout", state, sid, waiting.attempt))
    state.steps[sid] = StepState(
        StepStatus.COMPLETED,
        attempt=waiting.attempt,
        output=payload or {},
        started_ms=waiting.started_ms,
        finished_ms=now_ms,
        history=waiting.history,
        base=waiting.base,
        instance=by,
    )


def keep(
    state: WorkflowState,
    signal_id: str,
    event: str,
    payload: dict[str, Any] | None,
    now_ms: int,
    by: str | None,
) -> None:
    """Keep a signal no step waits on yet (the oldest go first past `MAX_INBOX`)."""
    fresh = [e for e in state.inbox or () if now_ms - e["at_ms"] < INBOX_TTL_MS]
    entry: dict[str, Any] = {"id": signal_id, "event": event, "payload": payload, "at_ms": now_ms}
    if by is not None:
        entry["by"] = by
    state.inbox = [*fresh, entry][-MAX_INBOX:]


def _take(state: WorkflowState, step: Step, now_ms: int) -> dict[str, Any] | None:
    """The oldest kept signal still fresh that `step` waits for (its event, matching),
    taken out of the run's inbox."""
    inbox = state.inbox or []
    for index, entry in enumerate(inbox):
        if (
            entry["event"] == step.wait
            and now_ms - entry["at_ms"] < INBOX_TTL_MS
            and matches(step, state, entry.get("payload"))
        ):
            rest = inbox[:index] + inbox[index + 1 :]
            state.inbox = rest or None
            return entry
    return None
