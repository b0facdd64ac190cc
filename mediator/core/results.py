"""What a run reports: its result event, built from its state (pure)."""

from __future__ import annotations

from typing import Any

from mediator.core.state import Failure, StepState, WorkflowState
from topics.events import AttemptSummary, ErrorInfo, ResultEvent, StepSummary

__all__ = ["history_of", "result_fields", "result_of"]

_ERROR_FIELDS = ("message", "code", "retryable", "step")
_ERROR_KEYS = frozenset(_ERROR_FIELDS)
_ATTEMPT_FIELDS = frozenset({"attempt", "started_ms", "finished_ms", "error", "instance"})


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


def result_fields(state: WorkflowState) -> dict[str, Any]:
    """The JSON fields of `result_of(state)`, as `mediator.codec.encode` writes them
    (``None`` fields left out), built without the models: the commit path writes one per
    finished run. A stored value the models would not take as it is (a failure with a
    field of the wrong type, or a field the engine sets that a hand-edited store holds as
    another type) goes through them, so it is refused or coerced exactly as before."""
    try:
        return _plain_result(state)
    except _NotPlain:
        return result_of(state).model_dump(mode="json", exclude_none=True)


class _NotPlain(Exception):
    """A value the models would have to check or coerce."""


def _plain_result(state: WorkflowState) -> dict[str, Any]:
    finished_ms = _int(state.finished_ms or state.updated_ms)
    rounds = f".r{state.round}" if state.round else ""
    fields: dict[str, Any] = {
        "schema_version": 1,
        "type": "result",
        "result_id": f"{state.workflow_id}{rounds}@{finished_ms}",
        "request_id": _str(state.request_id),
        "workflow_id": _str(state.workflow_id),
        "workflow": _str(state.workflow),
        "status": state.status.value,
    }
    if state.output is not None:
        fields["output"] = state.output
    if state.error:
        if type(state.error) is not dict or not state.error.keys() <= _ERROR_KEYS:
            raise _NotPlain
        fields["error"] = _plain_error(state.error)
    fields["steps"] = {sid: _plain_summary(step) for sid, step in state.steps.items()}
    fields["compensations"] = {
        sid: _plain_summary(undo) for sid, undo in (state.compensations or {}).items()
    }
    fields["started_ms"] = _int(state.created_ms)
    fields["finished_ms"] = finished_ms
    if state.trace_id is not None:
        fields["trace_id"] = _str(state.trace_id)
    return fields


def _plain_summary(step: StepState) -> dict[str, Any]:
    out: dict[str, Any] = {"status": step.status.value, "attempts": _int(step.attempt)}
    if step.finished_ms is not None and step.started_ms is not None:
        out["duration_ms"] = _int(step.finished_ms) - _int(step.started_ms)
    if step.error:
        out["error"] = _plain_error(step.error)
    out["history"] = [_plain_attempt(entry) for entry in step.history or ()]
    if step.via is not None:
        out["service"] = _str(step.via)
    if step.instance is not None:
        out["instance"] = _str(step.instance)
    return out


def _plain_attempt(entry: Any) -> dict[str, Any]:
    if type(entry) is not dict or not entry.keys() <= _ATTEMPT_FIELDS:
        raise _NotPlain
    out: dict[str, Any] = {"attempt": _int(entry.get("attempt"))}
    for name in ("started_ms", "finished_ms"):
        if (value := entry.get(name)) is not None:
            out[name] = _int(value)
    if error := entry.get("error"):
        out["error"] = _plain_error(error)
    if (instance := entry.get("instance")) is not None:
        out["instance"] = _str(instance)
    return out


def _plain_error(error: Any) -> dict[str, Any]:
    """`ErrorInfo`'s fields of a stored failure (its other keys left out)."""
    if type(error) is not dict:
        raise _NotPlain
    message, code = error.get("message"), error.get("code", "error")
    retryable, step = error.get("retryable", False), error.get("step")
    if type(message) is not str or type(code) is not str or type(retryable) is not bool:
        raise _NotPlain
    out: dict[str, Any] = {"message": message, "code": code, "retryable": retryable}
    if step is not None:
        out["step"] = _str(step)
    return out


def _int(value: Any) -> int:
    if type(value) is not int:
        raise _NotPlain
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise _NotPlain
    return value


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
