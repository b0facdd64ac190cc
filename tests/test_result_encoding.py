"""A finished run's result is written without building its models (one per run on the
commit path): what it writes must be exactly what `result_of` and `mediator.codec.encode`
write, and a stored value the models refuse must still be refused."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mediator.codec import encode, encode_plain, headers
from mediator.core.results import result_fields, result_of
from mediator.core.state import StepState, StepStatus, WorkflowState
from mediator.runtime.commits import Commits
from topics.events import ResultEvent, WorkflowStatus
from topics.names import Topics

#: Failures as the engine stores them, and as a hand-edited or older store might hold them.
failures = st.none() | st.fixed_dictionaries(
    {"message": st.text(max_size=10) | st.integers(0, 3)},
    optional={
        "code": st.sampled_from(["timeout", "declined", ""]) | st.none(),
        "retryable": st.booleans() | st.sampled_from([0, 1]),
        "step": st.sampled_from(["a", "b"]) | st.integers(0, 1),
        "stack": st.just("..."),
    },
)
attempts = st.fixed_dictionaries(
    {"attempt": st.integers(1, 3) | st.just(2.0)},
    optional={
        "started_ms": st.integers(0, 9) | st.none(),
        "finished_ms": st.integers(0, 9),
        "error": failures,
        "instance": st.sampled_from(["i-1", "i-2"]) | st.integers(0, 1),
        "extra": st.just(1),
    },
)
steps = st.builds(
    lambda status, attempt, error, history, via, instance, started, finished: StepState(
        status,
        attempt=attempt,
        error=error,
        history=history,
        via=via,
        instance=instance,
        started_ms=started,
        finished_ms=finished,
    ),
    st.sampled_from(list(StepStatus)),
    # The engine sets these itself; a hand-edited or corrupted store may not hold its types.
    st.integers(0, 4) | st.sampled_from(["2", 2.0, True]),
    failures,
    st.none() | st.lists(attempts, max_size=2),
    st.none() | st.just("fallback") | st.just(1),
    st.none() | st.just("i-1") | st.just(1),
    st.none() | st.integers(0, 50) | st.just("5"),
    st.none() | st.integers(50, 99) | st.just(60.0),
)
outputs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
runs = st.fixed_dictionaries(
    {
        "status": st.sampled_from(list(WorkflowStatus)),
        "steps": st.dictionaries(st.sampled_from(["a", "b", "c"]), steps, max_size=3),
        "undos": st.none() | st.dictionaries(st.sampled_from(["a", "b"]), steps, max_size=2),
        "output": outputs,
        "error": failures,
        "round": st.integers(0, 2),
        "trace": st.none() | st.just("4bf92f3577b34da6a3ce929d0e0e4736") | st.just(5),
        "finished": st.none() | st.integers(1, 3) | st.sampled_from(["2", 2.0]),
        "created": st.just(1) | st.sampled_from(["1", 1.0, None]),
        "request": st.just("req-1") | st.just(7),
        "workflow": st.just("order") | st.just(None),
    }
)


def state(run: dict[str, Any]) -> WorkflowState:
    return WorkflowState(
        workflow_id="wf-1",
        request_id=run["request"],
        workflow=run["workflow"],
        version=2,
        status=run["status"],
        payload={},
        created_ms=run["created"],
        updated_ms=7,
        steps=run["steps"],
        compensations=run["undos"],
        output=run["output"],
        error=run["error"],
        round=run["round"],
        trace_id=run["trace"],
        finished_ms=run["finished"],
        rev=4,
    )


@settings(max_examples=500, deadline=None)
@given(runs)
def test_a_result_written_plain_is_the_models_and_their_bytes(run: dict[str, Any]) -> None:
    finished = state(run)
    try:
        model = result_of(finished)
    except (ValidationError, TypeError) as refused:
        with pytest.raises(type(refused)):  # refused as the models refuse it
            result_fields(finished)
        return
    fields = result_fields(finished)
    assert fields == model.model_dump(mode="json", exclude_none=True)
    plain = encode_plain(fields)
    if plain is None:  # a value orjson does not write (an integer past 64 bits): the model
        plain = encode(ResultEvent.model_validate(fields))
    assert plain == encode(model)


@settings(max_examples=100, deadline=None)
@given(runs)
def test_the_result_record_is_the_one_made_from_the_event(run: dict[str, Any]) -> None:
    finished = state(run)
    try:
        model = result_of(finished)
    except (ValidationError, TypeError):
        return
    commits = Commits.__new__(Commits)
    commits.topics = Topics()
    plain = commits._result_of(result_fields(finished), "replies.x", 3)
    made = commits._result_message(model, "replies.x", "result", 3)
    assert (plain.id, plain.topic, plain.key, plain.value) == (
        made.id,
        made.topic,
        made.key,
        made.value,
    )
    assert plain.headers == made.headers == headers(model)
