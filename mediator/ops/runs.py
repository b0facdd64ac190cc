"""Runs as ops see them, read from Redis: a filtered list (status, workflow name, time,
request id) and one run in full (its steps and attempts, the definition's DAG, its
audit log). Shared by ``mediator workflows`` and the dashboard."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.core.lineage import child_run_id
from mediator.core.progress import command_id
from mediator.core.results import history_of, result_of
from mediator.core.state import Failure, WorkflowState
from mediator.errors import StateUnavailable
from mediator.storage.commit import state_of
from mediator.storage.connection import text
from mediator.storage.errors import REDIS_ERRORS
from mediator.storage.keys import Keys, workflow_id_for

__all__ = [
    "APPLIES_TO",
    "STATUS_INDEX",
    "RunFilter",
    "list_runs",
    "runs_for",
    "show_run",
]

#: The index each status is kept in: live runs in ``running``; every finished end but
#: ``completed`` in ``failed``.
STATUS_INDEX = {
    "running": "running",
    "compensating": "running",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "compensation_failed": "failed",
}


@dataclass(frozen=True, slots=True)
class RunFilter:
    """What bulk operations choose runs by, beyond status and workflow (`list_runs`):
    the definition's version, the error code a run ended with, and the step it failed in."""

    version: int | None = None
    error_code: str | None = None
    step: str | None = None

    def matches(self, state: WorkflowState) -> bool:
        """Whether `state` passes every filter given."""
        error: Failure | dict[str, Any] = state.error or {}
        if self.version is not None and state.version != self.version:
            return False
        if self.error_code is not None and error.get("code") != self.error_code:
            return False
        return self.step is None or error.get("step") == self.step


#: Which runs each bulk action applies to: (statuses, paused or not, or either).
APPLIES_TO: dict[str, tuple[tuple[str, ...], bool | None]] = {
    "cancel": (("running",), None),
    "retry": (("failed", "cancelled"), None),
    "pause": (("running", "compensating"), False),
    "resume": (("running", "compensating"), True),
}


async def runs_for(
    redis: Redis,
    keys: Keys,
    action: str,
    workflow: str | None = None,
    status: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    where: RunFilter | None = None,
) -> list[str]:
    """The runs a bulk `action` (cancel, retry, pause, resume) chosen by these filters
    applies to, as Redis has them now (the CLI's and the dashboard's bulk operations).
    `ValueError` for a status the action does not apply to."""
    statuses, paused = APPLIES_TO[action]
    if status is not None:
        if status not in statuses:
            msg = f"{action} applies to runs {', '.join(statuses)}, not {status}"
            raise ValueError(msg)
        statuses = (status,)
    rows = await list_runs(
        redis,
        keys,
        status=statuses[0] if len(statuses) == 1 else None,
        workflow=workflow,
        since_ms=since_ms,
        until_ms=until_ms,
        paused=paused,
        where=where,
        limit=100_000,
    )
    return [r["workflow_id"] for r in rows if r["status"] in statuses]


async def list_runs(
    redis: Redis,
    keys: Keys,
    *,
    status: str | None = None,
    workflow: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    request_id: str | None = None,
    paused: bool | None = None,
    where: RunFilter | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs matching every filter given (`paused`: only those paused, or only those not),
    newest first (by last update, or by start when filtered by workflow name), at most
    `limit`. Raises `StateUnavailable`."""
    try:
        if request_id is not None:
            ids = [workflow_id_for(request_id)]
        else:
            ids = await _candidates(
                redis, keys, status, workflow, since_ms, until_ms, limit, paused
            )
        runs = []
        for state in await _states(redis, keys, ids):
            if state is None:
                continue
            if status is not None and state.status.value != status:
                continue
            if workflow is not None and state.workflow != workflow:
                continue
            if paused is not None and (state.paused_ms is not None) != paused:
                continue
            if where is not None and not where.matches(state):
                continue
            runs.append(_row(state))
            if len(runs) >= limit:
                break
        return runs
    except REDIS_ERRORS as exc:
        msg = f"cannot read runs from Redis: {exc}"
        raise StateUnavailable(msg) from exc


async def _candidates(
    redis: Redis,
    keys: Keys,
    status: str | None,
    workflow: str | None,
    since_ms: int | None,
    until_ms: int | None,
    limit: int,
    paused: bool | None = None,
) -> list[str]:
    """Workflow ids from the indexes, newest first; over-fetched when a status within a
    shared index (``cancelled`` among ``failed``) is filtered after loading."""
    low = since_ms if since_ms is not None else "-inf"
    high = until_ms if until_ms is not None else "+inf"
    if workflow is not None:
        indexes = [keys.name_index(s, workflow) for s in range(keys.shards)]
    else:
        chosen = (
            [STATUS_INDEX.get(status, status)] if status else ["running", "completed", "failed"]
        )
        indexes = [keys.status_index(s, i) for s in range(keys.shards) for i in chosen]
    fetch = limit * 4 if status or workflow or paused is not None else limit
    fetch = max(fetch, limit)
    async with redis.pipeline(transaction=False) as pipe:
        for index in indexes:
            pipe.zrevrangebyscore(index, high, low, start=0, num=fetch, withscores=True)
        rows = await pipe.execute()
    merged = heapq.merge(*([(-score, text(wid)) for wid, score in row] for row in rows))
    seen: dict[str, None] = {}
    for _, wid in merged:
        seen.setdefault(wid, None)
        if len(seen) >= fetch:
            break
    return list(seen)


async def _states(redis: Redis, keys: Keys, ids: list[str]) -> list[WorkflowState | None]:
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for wid in ids:
            pipe.hgetall(keys.workflow(wid))
        hashes = await pipe.execute()
    return [state_of(wid, fields) for wid, fields in zip(ids, hashes, strict=True)]


def _row(state: WorkflowState) -> dict[str, Any]:
    error: Failure | dict[str, str] = state.error or {}
    return {
        "workflow_id": state.workflow_id,
        "request_id": state.request_id,
        "workflow": state.workflow,
        "version": state.version,
        "status": state.status.value,
        "created_ms": state.created_ms,
        "updated_ms": state.updated_ms,
        "finished_ms": state.finished_ms,
        "paused_ms": state.paused_ms,
        "steps": {sid: step.status.value for sid, step in state.steps.items()},
        "error": error.get("message"),
    }


async def show_run(redis: Redis, keys: Keys, workflow_id: str) -> dict[str, Any] | None:
    """One run in full, or None when Redis has no such run: its summary, every step with
    its attempts, compensations, the definition's steps (for its DAG) and the audit log."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.workflow(workflow_id))
            pipe.xrange(keys.audit(workflow_id))
            fields, audit = await pipe.execute()
        state = state_of(workflow_id, fields)
        if state is None:
            return None
        definition = await redis.get(keys.definition(state.workflow, state.version))
    except REDIS_ERRORS as exc:
        msg = f"cannot read run {workflow_id} from Redis: {exc}"
        raise StateUnavailable(msg) from exc
    result = result_of(state).model_dump(mode="json", exclude_none=True)
    spec = orjson.loads(definition).get("spec", {}) if definition else {}
    return {
        **_row(state),
        "payload": state.payload,
        "output": state.output,
        "error": state.error,
        "trace_id": state.trace_id,
        "deadline_ms": state.deadline_ms,
        "result": result,
        # The step of the run this one is a child of, and the child runs of its steps.
        "parent": state.parent,
        "children": _children(state, spec),
        # Every attempt of each step that started one: the timeline.
        "attempts": {sid: history_of(step) for sid, step in state.steps.items() if step.attempt},
        # Every attempt of each compensation (undo) that started one.
        "undo_attempts": {
            sid: history_of(undo)
            for sid, undo in (state.compensations or {}).items()
            if undo.attempt
        },
        "definition": {
            "steps": [
                {
                    "id": step.get("id"),
                    "service": step.get("service"),
                    "action": step.get("action"),
                    "depends_on": list(step.get("depends_on") or []),
                    "compensate": bool(step.get("compensate")),
                    "wait": (step.get("wait") or {}).get("event"),
                    "workflow": step.get("workflow"),
                }
                for step in spec.get("steps", [])
            ]
        },
        "audit": [
            {"id": text(entry_id), **orjson.loads(fields[b"e"])} for entry_id, fields in audit
        ],
    }


def _children(state: WorkflowState, spec: dict[str, Any]) -> dict[str, list[str]]:
    """The child runs each `workflow` step of `state` started, one per attempt, oldest
    first (their ids derive from the attempts' command ids)."""
    found: dict[str, list[str]] = {}
    for step in spec.get("steps", []):
        sid = step.get("id")
        step_state = state.steps.get(sid) if step.get("workflow") else None
        if step_state is not None and step_state.attempt:
            found[sid] = [
                child_run_id(command_id(state.workflow_id, sid, n))
                for n in range(1, step_state.attempt + 1)
            ]
    return found
