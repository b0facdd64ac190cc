"""Property tests of faults on the pure engine: random DAGs with compensations, retries
and timeouts, driven by replies, errors, timers, duplicates and an operator's cancel in
random order. Every run must end once, with one result; compensations must run in
reverse dependency order; nothing but compensations may be sent once compensation began,
and nothing at all after the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.core.engine import Engine, PublishResult, Transition
from mediator.core.state import StepStatus
from mediator.core.timers import Fired, SetTimer
from mediator.core.workflow import Workflow, parse_workflows
from topics.events import (
    CommandEvent,
    ControlAction,
    ControlEvent,
    ErrorInfo,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
)
from topics.events import WorkflowStatus as WS

ENGINE = Engine(replies_topic="r")
WID = "wf-s"
SETTINGS = settings(max_examples=300, deadline=None)
FINAL = frozenset({StepStatus.COMPLETED, StepStatus.FAILED})


@st.composite
def workflows(draw: st.DrawFn) -> Workflow:
    count = draw(st.integers(min_value=1, max_value=10))
    steps: list[dict[str, Any]] = []
    for index in range(count):
        deps = (
            draw(st.lists(st.integers(0, index - 1), unique=True, max_size=min(index, 3)))
            if index
            else []
        )
        step: dict[str, Any] = {
            "id": f"s{index}",
            "service": "svc",
            "action": "act",
            "depends_on": [f"s{d}" for d in deps],
            "retry": {"max_attempts": draw(st.integers(1, 3)), "backoff": "10ms"},
        }
        if draw(st.booleans()):
            step["timeout"] = "1s"
        if draw(st.integers(0, 2)):
            step["compensate"] = {
                "action": "undo",
                "retry": {"max_attempts": draw(st.integers(1, 3)), "backoff": "10ms"},
                **({"timeout": "1s"} if draw(st.booleans()) else {}),
            }
        steps.append(step)
    timeout = {"timeout": "1m"} if draw(st.booleans()) else {}
    [workflow] = parse_workflows({"name": "saga", "steps": steps, **timeout})
    return workflow


def _descendants(workflow: Workflow, step: str) -> set[str]:
    found: set[str] = set()
    todo = list(workflow.dependants[step])
    while todo:
        sid = todo.pop()
        if sid not in found:
            found.add(sid)
            todo += workflow.dependants[sid]
    return found


@dataclass
class Sim:
    workflow: Workflow
    now: int = 1_000
    outstanding: dict[str, CommandEvent] = field(default_factory=dict)
    timers: dict[str, SetTimer] = field(default_factory=dict)
    results: list[PublishResult] = field(default_factory=list)
    applied: list[ReplyEvent] = field(default_factory=list)
    undo_order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        request = RequestEvent(request_id="req-s", workflow="saga", payload={})
        transition = ENGINE.start(self.workflow, request, WID, self.now)
        self.state = transition.state
        self._check(transition)

    def _check(self, transition: Transition) -> None:  # noqa: C901 - one list of invariants
        before = self.state
        state = transition.state
        for name in transition.cleared:
            self.timers.pop(name, None)
        for timer in transition.timers:
            self.timers[timer.member] = timer
        for effect in transition.effects:
            if isinstance(effect, PublishResult):
                self.results.append(effect)
                continue
            command = effect.command
            assert not self.results, "a command was sent after the result"
            undo = ".undo." in command.command_id
            if undo:
                self.undo_order.append(command.step)
                # Every compensable descendant that completed was compensated first.
                for later in _descendants(self.workflow, command.step):
                    if self.workflow.steps[later].compensate is None:
                        continue
                    assert state.steps[later].status is not StepStatus.RUNNING
                    if state.steps[later].status is StepStatus.COMPLETED:
                        undone = (state.compensations or {}).get(later)
                        assert undone is not None and undone.status in FINAL, (command.step, later)
            else:
                assert state.status is WS.RUNNING, "a forward command while compensating"
            self.outstanding[command.command_id] = command
        assert len(self.results) <= 1
        if state.terminal:
            assert len(self.results) == 1
            assert not self.timers, f"timers left after the end: {sorted(self.timers)}"
            undos = state.compensations or {}
            failed = any(u.status is StepStatus.FAILED for u in undos.values())
            assert (state.status is WS.COMPENSATION_FAILED) == failed
            for sid, step in state.steps.items():
                if step.status is StepStatus.COMPLETED and state.status is not WS.COMPLETED:
                    if self.workflow.steps[sid].compensate is not None:
                        assert sid in undos, f"completed step {sid} was not compensated"
        elif before.status is WS.COMPENSATING:
            assert state.status is WS.COMPENSATING
        self.state = state

    def step(self, transition: Transition | None) -> bool:
        if transition is None:
            return False
        self._check(transition)
        return True

    def reply(self, command: CommandEvent, status: ReplyStatus, retryable: bool) -> bool:
        self.now += 1
        error = None
        if status is ReplyStatus.ERROR:
            error = ErrorInfo(message="no", retryable=retryable)
        reply = ReplyEvent(
            command_id=command.command_id,
            workflow_id=WID,
            step=command.step,
            attempt=command.attempt,
            status=status,
            output={"by": command.command_id} if status is ReplyStatus.OK else None,
            error=error,
        )
        done = self.step(ENGINE.apply_reply(self.workflow, self.state, reply, self.now))
        self.outstanding.pop(command.command_id, None)
        if done:
            self.applied.append(reply)
        return done

    def fire(self, name: str) -> bool:
        self.now += 1
        fired = Fired.parse(name)
        assert fired is not None
        done = self.step(ENGINE.apply_timer(self.workflow, self.state, fired, self.now))
        self.timers.pop(name, None)  # a stale timer is removed by the runtime
        return done

    def cancel(self) -> bool:
        control = ControlEvent(
            control_id="c1", action=ControlAction.CANCEL, workflow_id=WID, issued_ms=self.now
        )
        return self.step(ENGINE.apply_control(self.workflow, self.state, control, self.now))


@SETTINGS
@given(workflow=workflows(), data=st.data())
def test_faulty_runs_end_once_and_compensate_in_reverse_order(
    workflow: Workflow, data: st.DataObject
) -> None:
    sim = Sim(workflow)
    for _ in range(500):
        if sim.state.terminal:
            break
        choice = data.draw(st.integers(0, 9))
        if choice == 0 and sim.applied:  # a duplicate changes nothing
            again = data.draw(st.sampled_from(sim.applied))
            assert ENGINE.apply_reply(workflow, sim.state, again, sim.now) is None
        elif choice == 1:
            sim.cancel()
        elif choice <= 3 and sim.timers:
            sim.fire(data.draw(st.sampled_from(sorted(sim.timers))))
        elif sim.outstanding:
            command = sim.outstanding[data.draw(st.sampled_from(sorted(sim.outstanding)))]
            outcome = data.draw(st.integers(0, 5))
            status = ReplyStatus.OK if outcome >= 2 else ReplyStatus.ERROR
            sim.reply(command, status, retryable=outcome == 1)
        elif sim.timers:
            sim.fire(data.draw(st.sampled_from(sorted(sim.timers))))
        else:
            # Nothing in flight and no timer: only a step without a timeout that was
            # given up can leave a run like this, and then it must be finished.
            stuck = f"stuck in {sim.state.status}: {sim.state.steps}"
            raise AssertionError(stuck)
    assert sim.state.terminal, "did not finish within 500 events"
    [published] = sim.results
    assert published.result.status is sim.state.status
    # After the end every event is ignored: nothing more is sent.
    for command in list(sim.outstanding.values()):
        assert not sim.reply(command, ReplyStatus.OK, retryable=False)
    assert not sim.cancel()
