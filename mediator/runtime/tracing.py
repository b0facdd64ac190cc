"""OpenTelemetry spans of what the replica commits: one span per run (from its request to
its end) and one per step attempt or compensation (from the command's send to its reply or
timeout), exported from the replica that saw each end.

A span is written when what it stands for has ended, so a run that moves between replicas
is still one span. Span ids are those the wire carries (`topics.headers.span_id` of the
workflow id or command id), so a service's own spans, made children of its command's
``traceparent``, hang under the mediator's step span, and the run's span under the
client's span.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from mediator.core.metrics import FAILED, Observation
from mediator.core.state import WorkflowState
from mediator.core.transition import Transition
from mediator.errors import ConfigurationError
from mediator.settings import TracingSettings
from topics.headers import span_id, w3c_trace_id

try:
    from opentelemetry import trace as otel
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace.status import Status, StatusCode
except ImportError:  # the otel extra is not installed: `Tracing.configure` says so
    otel = None  # type: ignore[assignment]
    IdGenerator = object  # type: ignore[assignment,misc]

__all__ = ["Tracing"]

log = logging.getLogger("mediator.tracing")

_NS = 1_000_000  # per millisecond


class _ChosenIds(IdGenerator):
    """The ids the next span is given (then random ones, as the SDK's own)."""

    span: int | None = None
    trace: int | None = None

    def generate_span_id(self) -> int:
        chosen, self.span = self.span, None
        return chosen or random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        chosen, self.trace = self.trace, None
        return chosen or random.getrandbits(128) or 1


class Tracing:
    """Writes the spans of committed transitions through its own tracer provider."""

    def __init__(self, provider: TracerProvider, ids: _ChosenIds) -> None:
        self.provider = provider
        self._ids = ids
        self._tracer = provider.get_tracer("mediator")

    @classmethod
    def configure(cls, settings: TracingSettings) -> Tracing:
        """A tracer provider exporting as `settings` say; a missing SDK or exporter is a
        configuration error that says what to install."""
        if otel is None:
            msg = (
                "tracing.enabled needs the OpenTelemetry SDK: "
                "pip install 'kafka-mediator[otel]' (or turn tracing off)"
            )
            raise ConfigurationError(msg)
        ids = _ChosenIds()
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}), id_generator=ids
        )
        if settings.exporter == "console":
            exporter: Any = ConsoleSpanExporter(
                formatter=lambda span: span.to_json(indent=None) + "\n"
            )
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError as exc:
                msg = (
                    "tracing.exporter 'otlp' needs the OTLP exporter: "
                    "pip install 'kafka-mediator[otel]'"
                )
                raise ConfigurationError(msg) from exc
            endpoint = settings.endpoint
            if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
                endpoint = endpoint.rstrip("/") + "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, ids)

    def record(self, transitions: Iterable[Transition]) -> None:
        """Write the spans that ended with these committed transitions."""
        for transition in transitions:
            state = transition.state
            if not transition.observed or not state.trace_id:  # (no trace: an older run)
                continue
            trace = int(w3c_trace_id(state.trace_id), 16)
            run_span = span_id(state.workflow_id)
            for observation in transition.observed:
                try:
                    if observation.kind == "wf":
                        self._run_span(state, observation, trace, run_span)
                    elif observation.command_id:
                        self._step_span(state, observation, trace, run_span)
                except Exception:  # a tracing bug must not stop the orchestration
                    log.exception("span of %s not written", state.workflow_id)

    def shutdown(self) -> None:
        """Export what is buffered and stop."""
        self.provider.shutdown()

    def _run_span(
        self, state: WorkflowState, observation: Observation, trace: int, run_span: str
    ) -> None:
        end = state.finished_ms or state.updated_ms
        parent = self._parent(trace, state.trace_parent) if state.trace_parent else None
        self._ids.trace = trace
        self._ids.span = int(run_span, 16)
        attributes = {
            "workflow.name": state.workflow,
            "workflow.version": state.version,
            "workflow.id": state.workflow_id,
            "workflow.request_id": state.request_id,
            "workflow.status": observation.outcome,
        }
        failed = observation.outcome in FAILED and state.error is not None
        error = state.error["message"] if failed and state.error is not None else None
        self._span(
            state.workflow,
            otel.SpanKind.CONSUMER,
            parent,
            end - observation.ms,
            end,
            attributes,
            error,
        )

    def _step_span(
        self, state: WorkflowState, observation: Observation, trace: int, run_span: str
    ) -> None:
        assert observation.command_id is not None
        self._ids.span = int(span_id(observation.command_id), 16)
        end = state.updated_ms
        attributes: dict[str, Any] = {
            "workflow.name": state.workflow,
            "workflow.id": state.workflow_id,
            "step": observation.step or "",
            "step.attempt": observation.attempt,
            "step.compensation": observation.undo,
            "service": observation.name,
            "outcome": observation.outcome,
            "messaging.system": "kafka",
            "messaging.message.id": observation.command_id,
        }
        if observation.instance:
            attributes["service.instance"] = observation.instance
        name = f"{'compensate' if observation.undo else 'step'} {observation.step}"
        error = None
        if observation.outcome in FAILED:
            error = f"{observation.name}: {observation.outcome}"
        parent = self._parent(trace, run_span)
        self._span(
            name, otel.SpanKind.PRODUCER, parent, end - observation.ms, end, attributes, error
        )

    def _parent(self, trace: int, parent_span: str) -> Any:
        flags = otel.TraceFlags(otel.TraceFlags.SAMPLED)
        remote = otel.SpanContext(trace, int(parent_span, 16), True, flags)
        return otel.set_span_in_context(otel.NonRecordingSpan(remote))

    def _span(
        self,
        name: str,
        kind: Any,
        parent: Any,
        start_ms: int,
        end_ms: int,
        attributes: dict[str, Any],
        error: str | None,
    ) -> None:
        span = self._tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes, start_time=start_ms * _NS
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=end_ms * _NS)
