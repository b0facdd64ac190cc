"""Concurrency keys (pure): a workflow's ``concurrency: {key, limit}`` lets at most
`limit` runs with the same key value (a customer, a tenant) be in progress at once.

A run of such a workflow starts *queued* (an operator's retry reopens it queued too):
nothing is dispatched, and the transition names its key (`Transition.admission`). Before
the commit, the runtime asks Redis for one of the key's slots (`mediator.storage.slots`,
one script call per key per batch): granted, `Engine.admit` dispatches in the same
transition; refused, the run waits in its key's queue (higher ``priority`` first, then
oldest first). When a run of the key ends, its slot passes to the queue's head, whose
``admit`` timer then falls due. Keys are independent queues, each behind its own limit
only, so one hot key's backlog delays no other key. The run's deadline keeps running
while it waits; a cancel or the deadline ends it in the queue.

A step's ``concurrency`` does the same for the step's attempts, across runs: an attempt
over its key's limit is held back before the commit (`queued`, in the key's queue rather
than its service's), and its ``unpark`` timer falls due when an attempt of its key ends
and hands it the slot. `StepState.key` keeps the key the attempt holds a slot under.
"""

from __future__ import annotations

from typing import Any

from mediator.core.expressions import ExpressionError
from mediator.core.state import StepStatus, WorkflowState
from mediator.core.timers import SetTimer
from mediator.core.transition import Transition, context
from mediator.core.workflow import Concurrency, Step, Workflow

__all__ = [
    "HOLDING",
    "admit_timer",
    "claims",
    "hold",
    "key_of",
    "key_value",
    "run_member",
    "step_key",
]

#: Step statuses of an attempt that holds its key's slot, or waits in its key's queue.
HOLDING = frozenset({StepStatus.RUNNING, StepStatus.QUEUED, StepStatus.PARKED})


def key_of(workflow: Workflow, state: WorkflowState) -> str:
    """The run's value of its workflow's concurrency key: a string or number from the
    request. `ExpressionError` when the expression gives anything else (null, an object)."""
    assert workflow.concurrency is not None
    values = context(state, state.steps)
    return key_value(workflow.concurrency, values, f"workflow {workflow.name!r}")


def step_key(step: Step, values: dict[str, Any]) -> str | None:
    """The value of `step`'s concurrency key for the run's `values` (None: the step has
    none). `ExpressionError` as `key_of`."""
    if step.concurrency is None:
        return None
    return key_value(step.concurrency, values, f"step {step.id!r}")


def key_value(limit: Concurrency, values: dict[str, Any], what: str) -> str:
    """A concurrency key rendered: a string or a number, as a string."""
    value = limit.key.render(values)
    if isinstance(value, bool) or value is None or value == "" or isinstance(value, dict | list):
        msg = f"concurrency key of {what} gave {value!r}: it must give a string or a number"
        raise ExpressionError(msg)
    return str(value)


def hold(transition: Transition, now_ms: int) -> Transition:
    """The run waits for one of its key's slots: nothing is dispatched until it is
    admitted (at once, if the runtime gets a slot for it before the commit)."""
    state = transition.state
    state.queued_ms = now_ms
    transition.admission = state.concurrency_key
    return transition


def admit_timer(state: WorkflowState) -> SetTimer:
    """The timer that admits the queued run `state` (named by its round: a retry that
    queues the run again waits for another)."""
    return SetTimer("admit", state.workflow_id, 0, "", state.round)


def run_member(workflow_id: str, round_: int) -> str:
    """How a run (in its round) is named in its key's sets (a step's attempt is named by
    its command id)."""
    return f"{workflow_id}|{round_}"


def claims(state: WorkflowState) -> dict[str, tuple[str, str]]:
    """The slots the stored run `state` holds or waits for, by member: (scope, key
    value), the scope being the workflow's name for the run's own key and
    ``<workflow>.<step>`` for a keyed step's attempt (in flight, or waiting to go). A
    run that ended claims none."""
    if state.terminal:
        return {}
    found = {}
    if state.concurrency_key is not None:
        member = run_member(state.workflow_id, state.round)
        found[member] = (state.workflow, state.concurrency_key)
    for sid, step in state.steps.items():
        if step.key is not None and step.command_id and step.status in HOLDING:
            found[step.command_id] = (f"{state.workflow}.{sid}", step.key)
    return found
