"""The mediator's wire contract: topic names, event models and header names.

This package imports only pydantic and the standard library, so clients and services can
depend on it without pulling in the mediator's runtime.
"""

from __future__ import annotations

from topics.events import (
    EVENT_MODELS,
    SCHEMA_VERSION,
    AlertEvent,
    AlertState,
    AttemptSummary,
    CommandEvent,
    DeadLetter,
    ErrorInfo,
    Event,
    HealthEvent,
    HealthStatus,
    MarkEvent,
    ReplyEvent,
    ReplyStatus,
    RequestEvent,
    ResultEvent,
    StepSummary,
    TransitionEvent,
    WorkflowStatus,
)
from topics.headers import headers_for, parse_traceparent, span_id, traceparent, w3c_trace_id
from topics.names import DEFAULT_PREFIX, DEFAULT_SERVICE_PREFIX, Topics

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SERVICE_PREFIX",
    "EVENT_MODELS",
    "SCHEMA_VERSION",
    "AlertEvent",
    "AlertState",
    "AttemptSummary",
    "CommandEvent",
    "DeadLetter",
    "ErrorInfo",
    "Event",
    "HealthEvent",
    "HealthStatus",
    "MarkEvent",
    "ReplyEvent",
    "ReplyStatus",
    "RequestEvent",
    "ResultEvent",
    "StepSummary",
    "Topics",
    "TransitionEvent",
    "WorkflowStatus",
    "headers_for",
    "json_schemas",
    "parse_traceparent",
    "span_id",
    "traceparent",
    "w3c_trace_id",
]


def json_schemas() -> dict[str, dict[str, object]]:
    """The JSON Schema of every event, keyed by model name."""
    return {name: model.model_json_schema() for name, model in EVENT_MODELS.items()}
