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
"""

from __future__ import annotations

from mediator.core.expressions import ExpressionError
from mediator.core.state import WorkflowState
from mediator.core.timers import SetTimer
from mediator.core.transition import Transition, context
from mediator.core.workflow import Workflow

__all__ = ["admit_timer", "hold", "key_of"]


def key_of(workflow: Workflow, state: WorkflowState) -> str:
    """The run's value of its workflow's concurrency key: a string or number from the
    request. `ExpressionError` when the expression gives anything else (null, an object)."""
    assert workflow.concurrency is not None
    value = workflow.concurrency.key.render(context(state, state.steps))
    if isinstance(value, bool) or value is None or value == "" or isinstance(value, dict | list):
        msg = (
            f"concurrency key of workflow {workflow.name!r} gave {value!r}: it must give "
            "a string or a number"
        )
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
