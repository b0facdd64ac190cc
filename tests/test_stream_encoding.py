"""The transition stream's events are written without building their models (the commit
path writes several per step): what it writes must be exactly what the contract's
`TransitionEvent` accepts and what `mediator.codec.encode` writes of it."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.codec import encode, encode_plain
from mediator.core.state import StepState, StepStatus, WorkflowState
from mediator.core.stream import transition_fields
from topics.events import TransitionEvent, WorkflowStatus

failures = st.none() | st.fixed_dictionaries(
    {"message": st.text(max_size=20)},
    optional={
        "code": st.sampled_from(["timeout", "declined", ""]),
        "retryable": st.booleans(),
        "step": st.sampled_from(["a", "b"]),
    },
)


def states_of(statuses: list[StepStatus]) -> st.SearchStrategy[StepState]:
    return st.builds(
        lambda status, attempt, error: StepState(status, attempt=attempt, error=error),
        st.sampled_from(statuses),
        st.integers(0, 4),
        failures,
    )


steps = states_of(list(StepStatus))
#: What a compensation goes through (it is never skipped, parked, queued or waiting).
UNDO = [StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.COMPLETED, StepStatus.FAILED]
undos = states_of(UNDO)
runs = st.fixed_dictionaries(
    {
        "status": st.sampled_from(list(WorkflowStatus)),
        "steps": st.dictionaries(st.sampled_from(["a", "b", "c"]), steps, max_size=3),
        "undos": st.none() | st.dictionaries(st.sampled_from(["a", "b"]), undos, max_size=2),
        "paused": st.none() | st.just(5),
        "queued": st.none() | st.just(6),
        "finished": st.none() | st.integers(1, 3),
        "error": failures,
    }
)


def state(run: dict[str, Any], rev: int) -> WorkflowState:
    return WorkflowState(
        workflow_id="wf-1",
        request_id="req-1",
        workflow="order",
        version=2,
        status=run["status"],
        payload={},
        created_ms=1,
        updated_ms=1,
        steps=run["steps"],
        compensations=run["undos"],
        paused_ms=run["paused"],
        queued_ms=run["queued"],
        finished_ms=run["finished"],
        error=run["error"],
        rev=rev,
    )


@settings(max_examples=300, deadline=None)
@given(st.none() | runs, runs)
def test_events_written_plain_are_the_models_bytes_apart_from_key_order(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> None:
    base = state(before, 3) if before is not None else None
    events = transition_fields(base, state(after, 4), 1000)
    for n, fields in enumerate(events):
        model = TransitionEvent.model_validate(fields)  # the contract accepts it as it is
        plain = encode_plain(fields)
        assert plain is not None
        assert orjson.loads(plain) == orjson.loads(encode(model))
        assert model.event_id == f"wf-1:4:{n}"
