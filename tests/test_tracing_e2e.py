"""W3C trace context from a request to every command, reply and result of its run, and
the OpenTelemetry spans of the run, against the real broker and Redis."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mediator.sdk.worker import ActionError
from mediator.storage.keys import workflow_id_for
from tests.helpers import produce, records_on, wait_for
from tests.system import RETRIED, echo
from topics.events import CommandEvent, ReplyEvent, RequestEvent, ResultEvent, WorkflowStatus
from topics.headers import TRACEPARENT, span_id, w3c_trace_id

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def _flaky(data: Any, command: Any) -> dict[str, Any]:
    if command.step == "a" and command.attempt == 1:
        msg = "not yet"
        raise ActionError(msg, code="busy", retryable=True)
    return await echo(data, command)


def _traceparent(record: Any) -> str | None:
    values = [v.decode() for k, v in record.headers if k == TRACEPARENT]
    assert len(values) <= 1, record.headers
    return values[0] if values else None


async def _run(system: Any, request_id: str, trace_id: str | None, header: str | None) -> None:
    """Publish one request (as a client on the wire would, trace context in the value,
    the header, or both) and wait for its result."""
    request = RequestEvent(request_id=request_id, workflow="retried", trace_id=trace_id)
    headers = [("mediator-event", b"request")]
    if header is not None:
        headers.append((TRACEPARENT, header.encode()))
    await produce(
        system.bootstrap, system.topics.requests, [request.model_dump_json().encode()],
        [request_id.encode()], headers=headers,
    )  # fmt: skip

    async def finished() -> bool:
        records = await records_on(system.bootstrap, system.topics.results)
        return any(r.key == request_id.encode() for r in records)

    await wait_for(finished, timeout=30, what=f"the result of {request_id}")


async def _messages_of(system: Any, request_id: str) -> dict[str, list[Any]]:
    """Every command, reply and result of one run, as (event, record)."""
    wid = workflow_id_for(request_id)
    found: dict[str, list[Any]] = {"command": [], "reply": [], "result": []}
    for kind, topic, model in (
        ("command", system.topics.service("svc"), CommandEvent),
        ("reply", system.topics.replies, ReplyEvent),
        ("result", system.topics.results, ResultEvent),
    ):
        for record in await records_on(system.bootstrap, topic):
            event = model.model_validate(orjson.loads(record.value))
            if event.workflow_id == wid:
                found[kind].append((event, record))
    return found


async def test_trace_id_from_a_traceparent_header_reaches_every_command_reply_and_result(
    make_system: Any,
) -> None:
    system = await make_system(RETRIED)
    await system.worker("svc", {"work": _flaky})
    await system.mediator()

    await _run(system, "traced", None, f"00-{TRACE}-{CLIENT_SPAN}-01")

    found = await _messages_of(system, "traced")
    assert [(c.step, c.attempt) for c, _ in found["command"]] == [("a", 1), ("a", 2), ("b", 1)]
    assert len(found["reply"]) == 3
    assert len(found["result"]) == 1
    for kind in ("command", "reply"):
        for event, record in found[kind]:
            assert event.trace_id == TRACE, (kind, event)
            # The span of a command: the mediator's span of that step attempt.
            assert _traceparent(record) == f"00-{TRACE}-{span_id(event.command_id)}-01"
    result, record = found["result"][0]
    assert result.status is WorkflowStatus.COMPLETED
    assert result.trace_id == TRACE
    assert _traceparent(record) == f"00-{TRACE}-{span_id(workflow_id_for('traced'))}-01"


@pytest.mark.slow
async def test_trace_id_in_the_request_value_wins_and_any_string_maps_to_one_trace(
    make_system: Any,
) -> None:
    system = await make_system(RETRIED)
    await system.worker("svc", {"work": _flaky})
    await system.mediator()

    # The value is authoritative: a header of another trace is ignored.
    await _run(system, "named", "order-42", f"00-{TRACE}-{CLIENT_SPAN}-01")
    # A malformed header is ignored, and a run without any trace gets one of its own.
    await _run(system, "untraced", None, "00-not-a-trace")

    named = await _messages_of(system, "named")
    mapped = w3c_trace_id("order-42")
    assert mapped != TRACE
    events = [*named["command"], *named["reply"], *named["result"]]
    assert len(events) == 7
    for event, record in events:
        assert event.trace_id == "order-42"
        assert _traceparent(record).startswith(f"00-{mapped}-")  # type: ignore[union-attr]

    untraced = await _messages_of(system, "untraced")
    (result, _), = untraced["result"]  # fmt: skip
    own = w3c_trace_id(workflow_id_for("untraced"))
    assert result.trace_id == own
    assert all(e.trace_id == own for e, _ in untraced["command"] + untraced["reply"])


@pytest.mark.slow
async def test_spans_of_the_run_its_step_attempts_and_the_service_nest_in_one_trace(
    make_system: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced = settings.model_copy(update={"tracing": settings.tracing.model_copy(
        update={"enabled": True, "exporter": "console"})})  # fmt: skip
    system = await make_system(RETRIED, tracing=traced.tracing)
    # The service configured OpenTelemetry (its own provider, as a service process would).
    service_spans = InMemorySpanExporter()
    service_provider = TracerProvider()
    service_provider.add_span_processor(SimpleSpanProcessor(service_spans))
    monkeypatch.setattr(otel_trace, "get_tracer_provider", lambda: service_provider)
    await system.worker("svc", {"work": _flaky})
    mediator = await system.mediator()
    assert mediator.tracing is not None
    exporter = InMemorySpanExporter()
    mediator.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))

    await _run(system, "spanned", None, f"00-{TRACE}-{CLIENT_SPAN}-01")

    wid = workflow_id_for("spanned")

    def finished() -> tuple[ReadableSpan, ...] | None:
        spans = exporter.get_finished_spans()
        return spans if len(spans) >= 4 else None

    spans = await wait_for(finished, what="the run's 4 spans")
    assert isinstance(spans, tuple)
    assert all(f"{s.context.trace_id:032x}" == TRACE for s in spans)
    run = next(s for s in spans if s.name == "retried")
    assert f"{run.context.span_id:016x}" == span_id(wid)
    assert run.parent is not None and f"{run.parent.span_id:016x}" == CLIENT_SPAN
    assert run.kind is SpanKind.CONSUMER
    assert run.attributes is not None and run.attributes["workflow.status"] == "completed"

    found = await _messages_of(system, "spanned")
    steps = sorted(
        (s for s in spans if s.name.startswith("step ")), key=lambda s: s.start_time or 0
    )
    assert [(s.name, s.attributes["step.attempt"]) for s in steps] == [
        ("step a", 1), ("step a", 2), ("step b", 1),
    ]  # fmt: skip
    for step, (command, record) in zip(steps, found["command"], strict=True):
        # The span a service sees as its parent, in the command's traceparent, is this span.
        assert _traceparent(record) == f"00-{TRACE}-{step.context.span_id:016x}-01"
        assert step.parent is not None and step.parent.span_id == run.context.span_id
        assert step.attributes is not None and step.attributes["service"] == "svc"
        assert step.attributes["messaging.message.id"] == command.command_id
    # The service's span of each command hangs under the mediator's span of that attempt.
    actions = sorted(service_spans.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [a.name for a in actions] == ["svc.work"] * 3
    for action, step in zip(actions, steps, strict=True):
        assert action.context.trace_id == step.context.trace_id
        assert action.parent is not None and action.parent.span_id == step.context.span_id
    assert actions[0].status.status_code is StatusCode.ERROR
    assert steps[0].status.status_code is StatusCode.ERROR
    assert steps[1].status.status_code is StatusCode.UNSET
    assert run.start_time is not None and run.end_time is not None
    assert all(run.start_time <= s.start_time <= s.end_time <= run.end_time for s in steps)
