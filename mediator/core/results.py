"""What a run reports: its result event, built from its state (pure)."""

from __future__ import annotations

from typing import Any

from mediator.core.state import Failure, StepState, WorkflowState
from topics.events import AttemptSummary, ErrorInfo, ResultEvent, StepSummary

__all__ = ["history_of", "result_of"]

_ERROR_FIELDS = ("message", "code", "retryable", "step")


def result_of(state: WorkflowState) -> ResultEvent:
    """The result event of a finished run (also used to re-send it for a duplicate request)."""
    finished_ms = state.finished_ms or state.updated_ms
    # Unique per round: a run re-opened by a retry may end again within the millisecond.
    rounds = f".r{state.round}" if state.round else ""
    return ResultEvent(
        result_id=f"{state.workflow_id}{rounds}@{finished_ms}",
        request_id=state.request_id,
        workflow_id=state.workflow_id,
        workflow=state.workflow,
        status=state.status,
        output=state.output,
        error=ErrorInfo.model_validate(state.error) if state.error else None,
        steps={sid: _summary(step) for sid, step in state.steps.items()},
        compensations={sid: _summary(undo) for sid, undo in (state.compensations or {}).items()},
        started_ms=state.created_ms,
        finished_ms=finished_ms,
        trace_id=state.trace_id,
    )


def history_of(step: StepState) -> list[dict[str, Any]]:
    """`step`'s earlier attempts, and the one that just ended."""
    entry: dict[str, Any] = {"attempt": step.attempt}
    for name in ("started_ms", "finished_ms", "error", "instance"):
        value = getattr(step, name)
        if value is not None:
            entry[name] = value
    return [*(step.history or ()), entry]


def _summary(step: StepState) -> StepSummary:
    return StepSummary(
        status=step.status.value,
        attempts=step.attempt,
        duration_ms=step.finished_ms - step.started_ms
        if step.finished_ms is not None and step.started_ms is not None
        else None,
        error=_error_info(step.error),
        history=[_attempt(h) for h in step.history or ()],
        service=step.via,
        instance=step.instance,
    )


def _attempt(entry: dict[str, Any]) -> AttemptSummary:
    return AttemptSummary.model_validate({**entry, "error": _error_info(entry.get("error"))})


def _error_info(error: Failure | None) -> ErrorInfo | None:
    if not error:
        return None
    return ErrorInfo.model_validate({k: v for k, v in error.items() if k in _ERROR_FIELDS})
