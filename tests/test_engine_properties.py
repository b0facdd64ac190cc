"""Property tests: random DAGs driven by replies in random order, with duplicates and stale
replies mixed in, must run every step once, in dependency order, within `max_parallel`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.core.engine import Engine, PublishResult, SendCommand, Transition
from mediator.core.state import SATISFIED, StepStatus
from mediator.core.workflow import Workflow, parse_workflows
from topics.events import CommandEvent, ErrorInfo, ReplyEvent, ReplyStatus, RequestEvent
from topics.events import WorkflowStatus as WS

ENGINE = Engine(replies_topic="r")
WID = "wf-p"
SETTINGS = settings(max_examples=200, deadline=None)

# Conditions on the payload flag: None always runs; the other two are complementary.
CONDITIONS = (None, "payload.flag", "!(payload.flag)")


@dataclass(frozen=True)
class Case:
    workflow: Workflow
    flag: bool
    expected_skipped: frozenset[str]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    count = draw(st.integers(min_value=1, max_value=25))
    flag = draw(st.booleans())
    steps: list[dict[str, Any]] = []
    skipped: set[str] = set()
    for index in range(count):
        step_id = f"s{index}"
        deps = (
            draw(st.lists(st.integers(0, index - 1), unique=True, max_size=min(index, 4)))
            if index
            else []
        )
        when = draw(st.sampled_from(CONDITIONS)) if draw(st.integers(0, 3)) == 0 else None
        step: dict[str, Any] = {
            "id": step_id,
            "service": f"svc{index % 3}",
            "action": "act",
            "depends_on": [f"s{d}" for d in deps],
            "input": {"me": "workflow.id", "deps": [f"steps.s{d}" for d in deps]},
        }
        if when is not None:
            step["when"] = when
            if (when == "payload.flag") != flag:
                skipped.add(step_id)
        steps.append(step)
    # Shuffle the written order: the engine must not rely on it.
    steps = draw(st.permutations(steps))
    max_parallel = draw(st.integers(0, 4))
    document = {"name": "prop", "max_parallel": max_parallel, "steps": steps}
    [workflow] = parse_workflows(document)
    return Case(workflow, flag, frozenset(skipped))


def _reply(
    command: CommandEvent, status: ReplyStatus = ReplyStatus.OK, **fields: Any
) -> ReplyEvent:
    output = {"step": command.step} if status is ReplyStatus.OK else None
    return ReplyEvent(
        command_id=command.command_id,
        workflow_id=command.workflow_id,
        step=command.step,
        attempt=command.attempt,
        status=status,
        output=output,
        **fields,
    )


def _stale(command: CommandEvent, kind: int) -> ReplyEvent:
    reply = _reply(command)
    change: dict[str, Any] = [
        {"attempt": 2, "command_id": f"{WID}.{command.step}.2"},
        {"command_id": f"other.{command.step}.1"},
        {"step": "unknown_step"},
        {"attempt": 3},
    ][kind]
    return reply.model_copy(update=change)


class Simulation:
    """Feeds replies to the engine and checks invariants after every transition."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.workflow = case.workflow
        self.now = 1_000
        self.dispatched: Counter[str] = Counter()
        self.results: list[PublishResult] = []
        self.outstanding: dict[str, CommandEvent] = {}
        self.applied: list[ReplyEvent] = []
        request = RequestEvent(request_id="req-p", workflow="prop", payload={"flag": case.flag})
        transition = ENGINE.start(self.workflow, request, WID, self.now)
        self.state = transition.state
        self._check(transition)

    def _check(self, transition: Transition, replied: str | None = None) -> None:
        state = transition.state
        for effect in transition.effects:
            if isinstance(effect, SendCommand):
                command = effect.command
                step = self.workflow.steps[command.step]
                assert not self.results, "command sent after the result"
                assert command.command_id == f"{WID}.{command.step}.1"
                for dep in step.depends_on:
                    assert state.steps[dep].status in SATISFIED, (command.step, dep)
                    # Finished before this event, completed by its reply, or skipped in it.
                    before = self.state.steps[dep].status
                    now = state.steps[dep].status
                    assert before in SATISFIED or dep == replied or now is StepStatus.SKIPPED
                # The input sees each completed dependency's output; a skipped one has none.
                assert command.input == {
                    "me": WID,
                    "deps": [
                        {"step": d} if state.steps[d].status is StepStatus.COMPLETED else None
                        for d in step.depends_on
                    ],
                }
                self.dispatched[command.step] += 1
                self.outstanding[command.step] = command
            else:
                self.results.append(effect)
        running = sum(1 for s in state.steps.values() if s.status is StepStatus.RUNNING)
        if self.workflow.max_parallel:
            assert running <= self.workflow.max_parallel
        if not state.terminal:
            assert self.outstanding, "stuck: nothing running and not finished"
            assert running == len(self.outstanding)
        self.state = state

    def deliver(self, reply: ReplyEvent) -> Transition:
        self.now += 1
        transition = ENGINE.apply_reply(self.workflow, self.state, reply, self.now)
        assert transition is not None
        self.outstanding.pop(reply.step)
        self.applied.append(reply)
        self._check(transition, reply.step)
        return transition

    def ignored(self, reply: ReplyEvent) -> None:
        assert ENGINE.apply_reply(self.workflow, self.state, reply, self.now + 1) is None

    def noise(self, data: st.DataObject) -> None:
        """Sometimes replay an applied reply, or send a stale one; both must be ignored."""
        choice = data.draw(st.integers(0, 5))
        if choice == 0 and self.applied:
            self.ignored(data.draw(st.sampled_from(self.applied)))
        elif choice == 1 and self.outstanding:
            command = self.outstanding[data.draw(st.sampled_from(sorted(self.outstanding)))]
            self.ignored(_stale(command, data.draw(st.integers(0, 3))))
        elif choice == 2:
            pending = [s for s, v in self.state.steps.items() if v.status is StepStatus.PENDING]
            if pending:
                step = data.draw(st.sampled_from(pending))
                self.ignored(
                    ReplyEvent(
                        command_id=f"{WID}.{step}.1",
                        workflow_id=WID,
                        step=step,
                        attempt=1,
                        status=ReplyStatus.OK,
                    )
                )

    def pick(self, data: st.DataObject) -> CommandEvent:
        return self.outstanding[data.draw(st.sampled_from(sorted(self.outstanding)))]


@SETTINGS
@given(case=cases(), data=st.data())
def test_random_dags_complete_in_dependency_order(case: Case, data: st.DataObject) -> None:
    sim = Simulation(case)
    while not sim.state.terminal:
        sim.noise(data)
        sim.deliver(_reply(sim.pick(data)))
        sim.noise(data)

    assert sim.state.status is WS.COMPLETED
    assert len(sim.results) == 1
    result = sim.results[0].result
    assert result.status is WS.COMPLETED
    skipped = {s for s, v in sim.state.steps.items() if v.status is StepStatus.SKIPPED}
    assert skipped == case.expected_skipped
    runnable = set(case.workflow.steps) - skipped
    assert sim.dispatched == Counter(dict.fromkeys(runnable, 1))
    assert all(sim.state.steps[s].status is StepStatus.COMPLETED for s in runnable)
    assert result.output == {s: {"step": s} for s in runnable}
    assert {s: v.status for s, v in result.steps.items()} == {
        s: "skipped" if s in skipped else "completed" for s in case.workflow.steps
    }
    assert not sim.outstanding
    # After the end, every reply ever applied is a duplicate.
    for reply in sim.applied:
        sim.ignored(reply)


@SETTINGS
@given(case=cases(), data=st.data())
def test_an_error_reply_fails_the_run_once(case: Case, data: st.DataObject) -> None:
    runnable = len(case.workflow.steps) - len(case.expected_skipped)
    if runnable == 0:
        return
    fail_at = data.draw(st.integers(0, runnable - 1))
    sim = Simulation(case)
    for _ in range(fail_at):
        sim.noise(data)
        sim.deliver(_reply(sim.pick(data)))
    assert not sim.state.terminal
    victim = sim.pick(data)
    error = ErrorInfo(message="boom", code="broken")
    others = [c for s, c in sim.outstanding.items() if s != victim.step]
    transition = sim.deliver(_reply(victim, ReplyStatus.ERROR, error=error))

    assert not any(isinstance(e, SendCommand) for e in transition.effects)
    assert len(sim.results) == 1
    result = sim.results[0].result
    assert result.status is WS.FAILED
    assert result.error is not None
    assert (result.error.step, result.error.code, result.error.message) == (
        victim.step,
        "broken",
        "boom",
    )
    assert sim.state.status is WS.FAILED
    assert sim.state.steps[victim.step].status is StepStatus.FAILED
    assert sum(sim.dispatched.values()) == fail_at + 1 + len(others)
    assert max(sim.dispatched.values()) == 1
    # Whatever arrives afterwards changes nothing and sends nothing.
    for command in others:
        sim.ignored(_reply(command))
        sim.ignored(_reply(command, ReplyStatus.ERROR, error=error))
    for reply in sim.applied:
        sim.ignored(reply)
