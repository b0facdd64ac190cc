"""Who a run answers to (pure): the parent step a child run reports to, the effects
that pass between a parent and its child runs, and the ids that tie them together
(`mediator.core.children` has the whole story)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mediator.core.counters import wf
from mediator.core.ids import workflow_id_for
from mediator.core.state import Failure, StepState, StepStatus, WorkflowState
from mediator.core.workflow import CHILD_PREFIX, Step
from topics.events import ErrorInfo, ParentRef, ReplyEvent, ReplyStatus, WorkflowStatus

if TYPE_CHECKING:
    from mediator.core.transition import Transition

__all__ = [
    "COMPENSATED",
    "CancelChild",
    "ReplyToParent",
    "child_run_id",
    "depth",
    "give_up",
    "is_child_service",
    "orphaned",
    "owed_reply",
    "parent_ref",
]

#: The error code of a run undone because its parent compensated it: it ends
#: ``cancelled``, as a cancelled run does.
COMPENSATED = "compensated"

#: Error codes that say how a run ended rather than what went wrong in a step: passed to
#: the parent prefixed (``child_cancelled``), so that the parent's step failing is not
#: taken for the parent itself being cancelled or past its own deadline.
_RUN_CODES = frozenset({"cancelled", COMPENSATED, "deadline_exceeded"})


def _child_code(code: str) -> str:
    return f"child_{code}" if code in _RUN_CODES else code


@dataclass(frozen=True, slots=True)
class CancelChild:
    """Cancel the child run `run` (published as a ``cancel`` control): its parent stopped
    waiting for it. `control_id` is derived from the attempt, so it is applied once."""

    run: str
    control_id: str
    reason: str
    #: Undo the child instead (a ``compensate`` control, answering no one): it completed
    #: after its parent stopped waiting for it, and its work is not wanted.
    undo: bool = False


@dataclass(frozen=True, slots=True)
class ReplyToParent:
    """Publish a child run's outcome to the parent step (or compensation) waiting for it."""

    reply: ReplyEvent


def child_run_id(command_id: str) -> str:
    """The run id of the child started by the command `command_id` of a `workflow` step."""
    return workflow_id_for(command_id)


def is_child_service(service: str) -> bool:
    """Whether `service` stands for child runs (``workflow.<name>``)."""
    return service.startswith(CHILD_PREFIX)


def depth(state: WorkflowState) -> int:
    """How many parents `state`'s run has (0: none)."""
    return int(state.parent["depth"]) if state.parent else 0


def give_up(transition: Transition, step: Step, step_state: StepState, why: str) -> None:
    """The run stops waiting for the child run of `step`'s current attempt: cancel it,
    unless the step leaves it to finish (``on_cancel: abandon``)."""
    child = step.child
    if child is None or child.on_cancel != "cancel" or step_state.command_id is None:
        return
    state = transition.state
    transition.effects.append(
        CancelChild(
            child_run_id(step_state.command_id),
            f"{step_state.command_id}.cancel",
            f"parent run {state.workflow_id} (step {step.id!r}): {why}",
        )
    )
    transition.count(wf(state.workflow, "children_cancelled"))


def owed_reply(state: WorkflowState, now_ms: int) -> ReplyEvent | None:
    """What a child run that just ended tells the step waiting for it: its parent's step
    (its output, or its error), or the parent's compensation that asked it to undo itself
    (whether the undoing succeeded). None for a run without a parent."""
    target = state.undo_reply or state.parent
    if target is None:
        return None
    status = state.status
    if state.undo_reply is not None:
        ok = status is not WorkflowStatus.COMPENSATION_FAILED
    else:
        ok = status is WorkflowStatus.COMPLETED
    error = None
    if not ok:
        failure: Failure = state.error or {"message": "no error recorded"}
        error = ErrorInfo(
            message=f"child run {state.workflow_id} ({state.workflow}) ended {status.value}: "
            f"{failure.get('message', '')}",
            code=_child_code(failure.get("code") or status.value),
            retryable=bool(failure.get("retryable")),
            step=target["step"],
        )
    return ReplyEvent(
        command_id=target["command_id"],
        workflow_id=target["workflow_id"],
        step=target["step"],
        attempt=target["attempt"],
        status=ReplyStatus.OK if ok else ReplyStatus.ERROR,
        output=state.output if ok and state.undo_reply is None else None,
        error=error,
        service=CHILD_PREFIX + state.workflow,
        trace_id=state.trace_id,
        replied_ms=now_ms,
    )


def parent_ref(state: WorkflowState, step: str, attempt: int, command_id: str) -> ParentRef:
    """Where the child run of `step`'s `attempt` (command `command_id`) answers."""
    return ParentRef(
        workflow_id=state.workflow_id,
        step=step,
        attempt=attempt,
        command_id=command_id,
        depth=depth(state) + 1,
    )


def orphaned(workflow_id: str, step: Step, step_state: StepState, reply: ReplyEvent) -> bool:
    """Whether `reply` says a child run of `step` completed that the run no longer waits
    for: one of the step's attempts (not its compensation's) that is not the one running,
    or that completed the step: it timed out, was given up or belongs to an earlier round.
    Its work is then undone (unless the step abandons its children)."""
    if reply.status is not ReplyStatus.OK or step.child is None:
        return False
    if step.child.on_cancel != "cancel":
        return False
    attempt = reply.command_id.removeprefix(f"{workflow_id}.{step.id}.")
    if not attempt.isdigit():
        return False  # not a forward attempt of this step (a compensation's reply)
    current = step_state.command_id == reply.command_id
    return not (current and step_state.status in (StepStatus.RUNNING, StepStatus.COMPLETED))
