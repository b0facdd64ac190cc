"""Which steps wait in their service's parked queue: pure, no I/O.

A step whose service's breaker is open waits as ``parked``, named in its service's parked
queue by the ``unpark`` timer that will release it (`mediator.core.timers`). The queue
holds exactly the steps parked now: a commit adds the steps the transition parked (a step
released by its timer and parked again at once, the breaker still open, goes back in under
the same name, in the place it had: the store keeps a released step's score) and removes
the ones that stopped being parked by any other way (their timeout, the run ending), so a
step parks once per attempt at most and a finished run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

from mediator.core.state import StepStatus, WorkflowState, touched
from mediator.core.timers import Fired, SetTimer
from mediator.core.workflow import Workflow

__all__ = ["parked", "parking_delta"]


def parked(
    workflow: Workflow | None,
    state: WorkflowState | None,
    only: Collection[str] | None = None,
) -> set[tuple[str, str]]:
    """(service, unpark timer name) of every step of `state` parked now (of the steps
    `only` names, if given). A step waits in its own service's queue, or, queued after it
    was rerouted, in its fallback's (`via`)."""
    if state is None or workflow is None or state.terminal:
        return set()
    found = set()
    wid = state.workflow_id
    steps = state.steps
    for sid in steps if only is None else only:
        step = steps.get(sid)
        if step is None:
            continue
        if step.status in (StepStatus.PARKED, StepStatus.QUEUED) and sid in workflow.steps:
            name = SetTimer("unpark", wid, 0, sid, step.attempt).member
            found.add((step.via or workflow.steps[sid].service, name))
    return found


def parking_delta(
    workflow: Workflow | None,
    before: WorkflowState | None,
    after: WorkflowState,
    queued: Iterable[tuple[str, str]] = (),
    only: Collection[str] | Literal[False] | None = False,
) -> list[tuple[str, str, str]]:
    """What a commit from `before` to `after` changes in the parked queues: ``("-",
    service, name)`` for steps no longer parked (released by their timer, which took them
    out already, or moved on otherwise), ``("+", service, name)`` for the steps the
    transition parked (`queued`: the engine's `Transition.parked`) that are still parked
    when it ends (adding one already queued changes nothing). `only`: `touched` of
    `before` and `after`, when the caller has it already."""
    queued = list(queued)
    if only is False:
        only = touched(before, after)
    if only is not None:  # the steps that changed, and those the transition parked
        only = {*only, *(fired.step for _, name in queued if (fired := Fired.parse(name)))}
    old, new = parked(workflow, before, only), parked(workflow, after, only)
    added = sorted(set(queued) & new)
    return [("-", *m) for m in sorted(old - new)] + [("+", *m) for m in added]
