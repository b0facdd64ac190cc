"""Which commands are in flight on which service instance: pure, no I/O.

A step attempt routed to an instance is *in flight* there until the step moves on (a
reply, a timeout, a reroute, the run ending). Each is named by a member string,
``service|instance|workflow_id|step|attempt``, kept in its shard's routed index in Redis
with the transition that routed it, and removed with the one that moved it on. A shard's
index is a sorted set with every score 0, so the commands of one instance are one
lexicographic range: when the instance is marked down, that range becomes ``reroute``
timers (`mediator.core.timers`), and the engine sends each still-current attempt again,
elsewhere.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

from mediator.core.state import StepStatus, WorkflowState, touched
from mediator.core.workflow import Workflow

__all__ = ["in_flight", "instance_prefix", "member", "routing_delta"]

SEP = "|"


def member(service: str, instance: str, workflow_id: str, step: str, attempt: int) -> str:
    """The routed-index member of one step attempt in flight on one instance."""
    return SEP.join((service, instance, workflow_id, step, str(attempt)))


def instance_prefix(service: str, instance: str) -> str:
    """What every member of `instance`'s commands starts with."""
    return f"{service}{SEP}{instance}{SEP}"


def in_flight(
    workflow: Workflow | None,
    state: WorkflowState | None,
    only: Collection[str] | None = None,
) -> set[str]:
    """The members of `state`'s step attempts running on a known instance (of the steps
    `only` names, if given)."""
    if state is None or workflow is None or state.terminal:
        return set()
    members = set()
    steps = state.steps
    for sid in steps if only is None else only:
        step = steps.get(sid)
        if step is None:
            continue
        if step.status is StepStatus.RUNNING and step.instance and sid in workflow.steps:
            service = step.via or workflow.steps[sid].service
            members.add(member(service, step.instance, state.workflow_id, sid, step.attempt))
    return members


def routing_delta(
    workflow: Workflow | None,
    before: WorkflowState | None,
    after: WorkflowState,
    only: Collection[str] | Literal[False] | None = False,
) -> list[tuple[str, str]]:
    """What a commit from `before` to `after` changes in the routed index: ``("+", m)``
    for attempts newly in flight on an instance, ``("-", m)`` for those that left.
    `only`: `touched` of `before` and `after`, when the caller has it already."""
    if only is False:
        only = touched(before, after)  # only the steps that changed can change the index
    old, new = in_flight(workflow, before, only), in_flight(workflow, after, only)
    return [("-", m) for m in sorted(old - new)] + [("+", m) for m in sorted(new - old)]
