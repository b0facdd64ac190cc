"""Pausing a run (pure): while paused nothing is dispatched (no step, retry, reroute or
compensation); replies to commands in flight are still applied and step timeouts keep
running. Timers that would dispatch something and fall due meanwhile are held with the run
and set again, due at once, when it is resumed. The run's deadline keeps counting unless
the pause stops it, in which case what was left of it counts again from the resume."""

from __future__ import annotations

from mediator.core.counters import wf
from mediator.core.state import WorkflowState, fork
from mediator.core.timers import Fired, SetTimer
from mediator.core.transition import Transition, deadline_timer, forked
from mediator.core.workflow import Workflow
from topics.events import WorkflowStatus

__all__ = ["HELD_TIMERS", "can_pause", "hold", "pause", "resume"]

#: Timers that would dispatch a command: while the run is paused they are held.
HELD_TIMERS = frozenset({"retry", "unpark", "reroute", "undo_retry", "admit"})

#: Statuses a run can be paused in.
_PAUSABLE = frozenset({WorkflowStatus.RUNNING, WorkflowStatus.COMPENSATING})


def can_pause(state: WorkflowState) -> bool:
    """Whether a pause applies to `state`: live and not paused already."""
    return state.paused_ms is None and state.status in _PAUSABLE


def pause(workflow: Workflow, state: WorkflowState, now_ms: int, stop_deadline: bool) -> Transition:
    """An operator's pause: nothing is dispatched until the run is resumed. Steps in
    flight go on (their replies are applied, their timeouts keep running); with
    `stop_deadline`, the run's deadline stops counting until then."""
    state = fork(state)
    transition = Transition(state)
    state.updated_ms = state.paused_ms = now_ms
    if (
        stop_deadline
        and state.deadline_ms is not None
        and state.deadline_ms > now_ms
        and state.status is WorkflowStatus.RUNNING
    ):  # a deadline that fired already (the run compensates for it) is not stopped
        state.deadline_left_ms = max(0, state.deadline_ms - now_ms)
        transition.cleared.append(deadline_timer(state, 0).member)
        state.deadline_ms = None
    transition.count(wf(workflow.name, "paused"))
    return transition


def hold(state: WorkflowState, timer: Fired, now_ms: int) -> Transition:
    """A timer that would dispatch something fell due while the run is paused: kept with
    the run, and set again when it is resumed."""
    transition = forked(state, now_ms, timer)
    held = [timer.kind, timer.step, timer.attempt]
    if held not in (state.held or ()):
        transition.state.held = [*(state.held or ()), held]
    return transition


def resume(workflow: Workflow, state: WorkflowState, now_ms: int) -> Transition:
    """Lift the pause: the held timers set again (due now), the deadline counting again if
    the pause stopped it. Dispatching what became ready is the engine's next move."""
    state = fork(state)
    transition = Transition(state)
    state.updated_ms = now_ms
    state.paused_ms = None
    for kind, step, attempt in state.held or ():
        transition.timers.append(SetTimer(kind, state.workflow_id, 0, step, attempt))
    state.held = None
    if state.deadline_left_ms is not None:
        state.deadline_ms = now_ms + state.deadline_left_ms
        transition.timers.append(deadline_timer(state, state.deadline_left_ms))
        state.deadline_left_ms = None
    transition.count(wf(workflow.name, "resumed"))
    return transition
