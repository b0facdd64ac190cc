"""W3C trace context on the wire: parsing what clients send, what the mediator sends."""

from __future__ import annotations

import pytest

from mediator import codec
from mediator.runtime.requests import trace_context as _trace_context
from topics.events import CommandEvent, RequestEvent, ResultEvent, WorkflowStatus
from topics.headers import TRACEPARENT, parse_traceparent, span_id, w3c_trace_id

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN, False)),
        (f" 00-{TRACE}-{SPAN}-01 ", (TRACE, SPAN, True)),
        # A later version may add fields after the flags: read what version 00 defines.
        (f"01-{TRACE}-{SPAN}-01-later", (TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-01-later", None),
        (f"ff-{TRACE}-{SPAN}-01", None),
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{SPAN}-01", None),
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("", None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_traceparent(value: str | bytes, expected: object) -> None:
    assert parse_traceparent(value) == expected


def test_any_trace_id_maps_to_one_w3c_trace_id() -> None:
    assert w3c_trace_id(TRACE) == TRACE
    mapped = w3c_trace_id("order-42")
    assert len(mapped) == 32 and int(mapped, 16) and mapped == w3c_trace_id("order-42")
    assert w3c_trace_id("0" * 32) != "0" * 32
    assert len(span_id("cmd-1")) == 16 and span_id("cmd-1") != span_id("cmd-2")


def test_request_trace_context_the_value_wins_over_the_header() -> None:
    header = [(TRACEPARENT, f"00-{TRACE}-{SPAN}-01".encode())]
    bare = RequestEvent(request_id="r", workflow="w")
    assert _trace_context(bare, header) == (TRACE, SPAN)
    assert _trace_context(bare, []) == (None, None)
    assert _trace_context(bare, [(TRACEPARENT, b"garbage")]) == (None, None)
    same = RequestEvent(request_id="r", workflow="w", trace_id=TRACE)
    assert _trace_context(same, header) == (TRACE, SPAN)
    other = RequestEvent(request_id="r", workflow="w", trace_id="order-42")
    assert _trace_context(other, header) == (None, None)


def test_commands_and_results_carry_their_span_in_traceparent() -> None:
    command = CommandEvent(
        command_id="c-1", workflow_id="w-1", request_id="r", workflow="w", step="a",
        service="s", action="x", attempt=1, reply_to="replies", trace_id=TRACE, sent_ms=1,
    )  # fmt: skip
    assert (TRACEPARENT, f"00-{TRACE}-{span_id('c-1')}-01".encode()) in codec.headers(command)
    result = ResultEvent(
        result_id="x", request_id="r", workflow_id="w-1", workflow="w",
        status=WorkflowStatus.COMPLETED, trace_id="order-42", finished_ms=1,
    )  # fmt: skip
    expected = f"00-{w3c_trace_id('order-42')}-{span_id('w-1')}-01".encode()
    assert (TRACEPARENT, expected) in codec.headers(result)
    untraced = command.model_copy(update={"trace_id": None})
    assert all(name != TRACEPARENT for name, _ in codec.headers(untraced))


def test_tracing_without_the_sdk_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mediator.errors import ConfigurationError
    from mediator.runtime import tracing
    from mediator.settings import TracingSettings

    monkeypatch.setattr(tracing, "otel", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'kafka-mediator\[otel\]'"):
        tracing.Tracing.configure(TracingSettings(enabled=True))
