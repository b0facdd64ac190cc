"""A service's span of each command it runs, when the service configured OpenTelemetry.

The command's ``traceparent`` names the mediator's span of that step attempt; the action
runs inside a child span of it (kind CONSUMER), so whatever the action traces itself
nests under the workflow's trace. Without the OpenTelemetry API installed, or with no
tracer provider set, nothing is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from topics.events import CommandEvent
from topics.headers import span_id, traceparent

__all__ = ["action_span", "traceparent_of", "tracing_active"]

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - the API comes with the otel extra
    _trace = None  # type: ignore[assignment]


def traceparent_of(command: CommandEvent) -> str | None:
    """The W3C ``traceparent`` of `command` (as its header carries it), for a handler
    that propagates the trace by hand; None when the command has no trace."""
    if not command.trace_id:
        return None
    return traceparent(command.trace_id, span_id(command.command_id)).decode()


def tracing_active() -> bool:
    """Whether this process has set a tracer provider (checked once per fetched batch:
    the lookup reads the environment)."""
    if _trace is None:
        return False
    provider = _trace.get_tracer_provider()
    return not isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider)


@contextlib.contextmanager
def action_span(service: str, command: CommandEvent) -> Iterator[Any]:
    """A span around running `command`'s action, child of the command's span; the span,
    or None when the service traces nothing."""
    provider = _trace.get_tracer_provider() if _trace is not None else None
    header = traceparent_of(command) if provider is not None else None
    if header is None or isinstance(
        provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider
    ):
        yield None
        return
    parent = TraceContextTextMapPropagator().extract({"traceparent": header})
    tracer = provider.get_tracer("mediator.sdk")
    attributes: dict[str, Any] = {
        "workflow.id": command.workflow_id,
        "workflow.name": command.workflow,
        "step": command.step,
        "step.attempt": command.attempt,
        "service": service,
        "messaging.system": "kafka",
        "messaging.message.id": command.command_id,
    }
    name = f"{service}.{command.action}"
    with tracer.start_as_current_span(
        name, context=parent, kind=_trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
