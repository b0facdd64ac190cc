"""Log lines of what happened to runs, with the run's fields (`mediator.logs.run_fields`):
a step attempt that failed or timed out (INFO), a run that failed (WARNING), steps that
succeeded and runs that completed (DEBUG). Logger ``mediator.runs``."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mediator.core.metrics import FAILED
from mediator.core.state import Failure
from mediator.core.transition import Transition
from mediator.logs import run_fields

__all__ = ["log_runs"]

log = logging.getLogger("mediator.runs")


def log_runs(transitions: Iterable[Transition]) -> None:
    """Log the step outcomes and run ends of committed transitions."""
    if not log.isEnabledFor(logging.INFO):
        return
    debug = log.isEnabledFor(logging.DEBUG)
    for transition in transitions:
        state = transition.state
        for seen in transition.observed:
            if seen.kind == "wf":
                if seen.outcome in FAILED:
                    error: Failure | dict[str, str] = state.error or {}
                    log.warning(
                        "workflow %s (%s) %s after %d ms: %s",
                        state.workflow_id,
                        state.workflow,
                        seen.outcome,
                        seen.ms,
                        error.get("message", "no reason"),
                        extra=run_fields(state, code=error.get("code")),
                    )
                elif debug:
                    log.debug(
                        "workflow %s (%s) %s after %d ms",
                        state.workflow_id,
                        state.workflow,
                        seen.outcome,
                        seen.ms,
                        extra=run_fields(state),
                    )
                continue
            what = "compensation of step" if seen.undo else "step"
            fields = run_fields(
                state,
                step=seen.step,
                attempt=seen.attempt,
                service=seen.name,
                instance=seen.instance,
            )
            if seen.outcome == "ok":
                if debug:
                    log.debug(
                        "%s %s attempt %d of %s done by %s in %d ms",
                        what,
                        seen.step,
                        seen.attempt,
                        state.workflow_id,
                        seen.name,
                        seen.ms,
                        extra=fields,
                    )
                continue
            steps = state.compensations if seen.undo else state.steps
            step = (steps or {}).get(seen.step or "")
            error = (step.error if step is not None else None) or {}
            fields["code"] = error.get("code", seen.outcome)
            log.info(
                "%s %s attempt %d of %s: %s from %s after %d ms: %s",
                what,
                seen.step,
                seen.attempt,
                state.workflow_id,
                seen.outcome,
                seen.name,
                seen.ms,
                error.get("message", seen.outcome),
                extra=fields,
            )
