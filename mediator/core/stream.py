"""The transition stream (pure): what one commit changed in a run, as `TransitionEvent`s
(`events.enabled`). Derived from the stored state before and after the commit rather
than from the engine's paths, so every way a run moves (replies, timers, controls,
refusals, hand-ons, operators' retries) is reported the same way, and exactly what was
committed is."""

from __future__ import annotations

from typing import Any

from mediator.core.state import Failure, StepState, StepStatus, WorkflowState
from topics.events import TransitionEvent, WorkflowStatus

__all__ = ["transition_fields", "transitions"]

#: The event a step (or a compensation) reaching a status is reported as.
_STEP_KINDS = {
    StepStatus.COMPLETED: "completed",
    StepStatus.FAILED: "failed",
    StepStatus.RETRYING: "retrying",
    StepStatus.PARKED: "parked",
    StepStatus.QUEUED: "queued",
    StepStatus.WAITING: "waiting",
    StepStatus.SKIPPED: "skipped",
    StepStatus.PENDING: "reset",
}


def transition_fields(
    before: WorkflowState | None, after: WorkflowState, now_ms: int
) -> list[dict[str, Any]]:
    """The events of the commit from `before` (None: the run starts) to `after` (its new
    revision): the run's own first, then its steps' in plan order, then compensations.

    Each is a `TransitionEvent`'s fields as plain JSON values, ``None`` ones left out:
    what `mediator.codec.encode` writes of the model, built without the model (the
    commit path writes several per step; tests hold the two to the same output)."""
    found: list[dict[str, Any]] = []
    if before is None:
        found.append({"kind": "run_started"})
    elif before.status is not after.status:
        if after.status is WorkflowStatus.COMPENSATING:
            found.append({"kind": "run_compensating"})
        elif before.terminal and not after.terminal:
            found.append({"kind": "run_reopened"})
    if (before is None or before.queued_ms is None) and after.queued_ms is not None:
        found.append({"kind": "run_queued"})
    elif before is not None and before.queued_ms is not None and after.queued_ms is None:
        if not after.terminal:
            found.append({"kind": "run_admitted"})
    if before is not None and (before.paused_ms is None) != (after.paused_ms is None):
        found.append({"kind": "run_paused" if after.paused_ms is not None else "run_resumed"})
    old_steps = before.steps if before is not None else {}
    for sid, step in after.steps.items():
        found += _changed("step", sid, old_steps.get(sid), step)
    old_undos = (before.compensations or {}) if before is not None else {}
    for sid, undo in (after.compensations or {}).items():
        found += _changed("undo", sid, old_undos.get(sid), undo)
    if after.terminal and (
        before is None or not before.terminal or before.finished_ms != after.finished_ms
    ):
        found.append({"kind": "run_finished", "error": after.error})
    return _events(after, found, now_ms)


def _events(after: WorkflowState, found: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """The events `found` in the commit that made `after`, each with the run's fields."""
    head = {
        "type": "transition",
        "schema_version": 1,
        "workflow_id": after.workflow_id,
        "request_id": after.request_id,
        "workflow": after.workflow,
        "version": after.version,
        "rev": after.rev,
        "status": after.status.value,
        "at_ms": now_ms,
    }
    events = []
    for n, fields in enumerate(found):
        event = {"event_id": f"{after.workflow_id}:{after.rev}:{n}", **head}
        for name, value in fields.items():
            if value is not None:
                event[name] = _error(value) if name == "error" else value
        events.append(event)
    return events


def transitions(
    before: WorkflowState | None, after: WorkflowState, now_ms: int
) -> list[TransitionEvent]:
    """`transition_fields` as the contract's models."""
    return [TransitionEvent.model_validate(f) for f in transition_fields(before, after, now_ms)]


def _changed(what: str, sid: str, old: StepState | None, new: StepState) -> list[dict[str, Any]]:
    """The event of one step (or compensation) whose status or attempt changed."""
    if old is not None and old.status is new.status and old.attempt == new.attempt:
        return []
    if old is None and new.status is StepStatus.PENDING:
        return []
    found = _undone_before(sid, old, new) if what == "undo" else []
    if new.status is StepStatus.RUNNING:
        kind = "sent"
    else:
        kind = _STEP_KINDS.get(new.status, new.status.value)
    fields: dict[str, Any] = {
        "kind": f"{what}_{kind}",
        "step": sid,
        "attempt": new.attempt or None,
        "step_status": new.status.value,
    }
    if new.status in (StepStatus.FAILED, StepStatus.RETRYING) and new.error:
        fields["error"] = new.error
    return [*found, fields]


def _undone_before(sid: str, old: StepState | None, new: StepState) -> list[dict[str, Any]]:
    """The completion of a compensation's attempt that the same commit followed with the
    undo of the step's work at another service (`saga.owed`): reported before it."""
    if old is None or old.status is not StepStatus.RUNNING or new.attempt <= old.attempt:
        return []
    done = next((h for h in new.history or () if h.get("attempt") == old.attempt), None)
    if done is None or done.get("error"):
        return []
    return [{"kind": "undo_completed", "step": sid, "attempt": old.attempt,
             "step_status": StepStatus.COMPLETED.value}]  # fmt: skip


def _error(failure: Failure) -> dict[str, Any]:
    """A step's or run's failure as an `ErrorInfo`'s fields."""
    error = {
        "message": str(failure.get("message", "")),
        "code": str(failure.get("code") or "error"),
        "retryable": bool(failure.get("retryable")),
    }
    if (step := failure.get("step")) is not None:
        error["step"] = step
    return error
