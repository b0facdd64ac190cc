"""Child runs (pure): a `workflow` step runs another workflow as a run of its own.

The step's attempt is sent like a service's command, to the service ``workflow.<name>``
with action ``run``, and the runtime publishes it as the child's request: its request id
is the attempt's command id (``<parent run>.<step>.<attempt>``), so the child's run id is
derived from the parent run, the step and the attempt, and a command published twice (an
outbox retry, a replica dying after the send) still starts one child. The child's outcome
comes back as the reply to that command (`owed_reply`, published when the child ends), so
the step's timeout, retries and the parent's compensation treat it as any step.

Compensating a completed child step sends the child a ``compensate`` control (a command
``compensate`` to ``workflow.<name>``, published as that control), which undoes the
child's completed steps in reverse and answers the parent's compensation when done
(`compensate`). A child that completes after its parent stopped waiting for it (the step
timed out, or the parent moved on) is undone the same way, answering no one. A parent that
stops waiting for a child (cancelled, failed, past its
deadline or the step's timeout) cancels it when the step says ``on_cancel: cancel``
(`give_up`).
"""

from __future__ import annotations

from typing import Any

from mediator.core import saga
from mediator.core.counters import wf
from mediator.core.lineage import COMPENSATED, ReplyToParent, owed_reply
from mediator.core.state import WorkflowState, fork
from mediator.core.transition import Transition
from mediator.core.workflow import Workflow
from topics.events import ControlEvent, WorkflowStatus

__all__ = ["compensate"]


def compensate(
    workflow: Workflow, state: WorkflowState, control: ControlEvent, now_ms: int
) -> tuple[Transition, bool]:
    """A parent's ``compensate`` control: undo this run's completed steps and answer
    `control.reply` when done. Returns the transition and whether compensation must be
    driven on from it (the run was completed, or running, and has work to undo)."""
    target: dict[str, Any] | None = control.reply.model_dump() if control.reply else None
    state = fork(state)
    state.updated_ms = now_ms
    transition = Transition(state)
    status = state.status
    if status is WorkflowStatus.COMPENSATING:
        if target is not None:  # undoing already: the newest attempt hears the outcome
            state.undo_reply = target
        return transition, False
    if state.terminal:
        if status is WorkflowStatus.COMPLETED and saga.needed(workflow, state):
            state.status = WorkflowStatus.RUNNING  # reopened to be undone
            state.finished_ms = None
        else:
            # Nothing done is left standing (no step to undo, or the run failed or was
            # cancelled and compensated itself already): say so at once.
            if target is None:
                return transition, False
            previous = state.undo_reply
            state.undo_reply = target
            reply = owed_reply(state, now_ms)
            state.undo_reply = previous
            assert reply is not None
            transition.effects.append(ReplyToParent(reply))
            return transition, False
    if target is not None:
        state.undo_reply = target
    who = f" by {control.operator}" if control.operator else ""
    state.error = {
        "message": f"compensated{who}: {control.reason or 'its parent is compensating'}",
        "code": COMPENSATED,
    }
    transition.count(wf(workflow.name, "compensate_requested"))
    return transition, True
