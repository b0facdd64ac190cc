"""Kafka header names and message keys of the wire contract.

Headers are informative: the value alone is authoritative, so a consumer that ignores
headers loses nothing, except that signed records must carry their signature headers.

Trace context follows W3C Trace Context: a request may carry a ``traceparent`` header
(when its ``trace_id`` field is empty, the trace id is taken from it, and the run's span is
made a child of the client's span); commands, replies and results carry ``traceparent``
with the run's trace id. Span ids are derived from what a span stands for (a command's
id, a run's id), so a command sent again after a crash carries the same span id, and a
service that does no tracing of its own echoes its command's ``traceparent`` on the reply.
Trace ids that are not 32 hex digits are mapped to one by a hash, so any trace id a client
chooses gives one W3C trace.
Keys matter for ordering:

=================  ==============  ===================================================
event              key             why
=================  ==============  ===================================================
RequestEvent       request_id      duplicates of one request land on one partition
CommandEvent       workflow_id     one workflow's commands stay in order per service
ReplyEvent         workflow_id     one workflow's replies land on one partition, so
                                   one mediator replica sees them in order
ResultEvent        request_id      a client can filter by key without decoding
HealthEvent        instance        compaction keeps the last heartbeat per instance
DeadLetter         original key    the reject stays next to what it rejected
=================  ==============  ===================================================
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "CONTENT_TYPE",
    "EVENT_TYPE",
    "JSON",
    "KEY_ID",
    "SCHEMA_VERSION",
    "SIGNATURE",
    "SIGNATURE_2",
    "TRACEPARENT",
    "TRACE_ID",
    "headers_for",
    "parse_traceparent",
    "span_id",
    "traceparent",
    "w3c_trace_id",
]

EVENT_TYPE = "mediator-event"
SCHEMA_VERSION = "mediator-schema"
TRACE_ID = "trace-id"
TRACEPARENT = "traceparent"
CONTENT_TYPE = "content-type"
JSON = b"application/json"
#: Signed records (commands, replies, heartbeats): the id of the key that signed the value,
#: and the lowercase hex HMAC-SHA256 of the value under that key.
KEY_ID = "mediator-key"
SIGNATURE = "mediator-signature"
#: The signature over the record's topic, key and value (`mediator.core.signing.bound`):
#: one record's signature does not hold for it published to another topic or under
#: another key. ``mediator-signature`` (over the value alone) is sent besides only while
#: ``signing.legacy_signatures`` is on.
SIGNATURE_2 = "mediator-signature-2"


#: The headers every event of a type and schema version starts with, built once each.
_FIXED: dict[tuple[str, int], tuple[tuple[str, bytes], ...]] = {}


def headers_for(
    event_type: str, schema_version: int, trace_id: str | None, span: str | None = None
) -> list[tuple[str, bytes]]:
    """The headers every event is published with; with a trace id and the key of the
    span that sends it (a command id, a workflow id), a ``traceparent`` too."""
    fixed = _FIXED.get((event_type, schema_version))
    if fixed is None:
        fixed = _FIXED[(event_type, schema_version)] = (
            (EVENT_TYPE, event_type.encode()),
            (SCHEMA_VERSION, str(schema_version).encode()),
            (CONTENT_TYPE, JSON),
        )
    headers = list(fixed)
    if trace_id:
        headers.append((TRACE_ID, trace_id.encode()))
        if span:
            headers.append((TRACEPARENT, traceparent(trace_id, span_id(span))))
    return headers


_HEX32 = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def w3c_trace_id(trace_id: str) -> str:
    """`trace_id` as a W3C trace id: itself when it is one (32 lowercase hex digits, not
    all zero), else 32 hex digits hashed from it."""
    if _HEX32.fullmatch(trace_id) and trace_id != _ZERO_TRACE:
        return trace_id
    return hashlib.blake2b(trace_id.encode(), digest_size=16).hexdigest()


def span_id(key: str) -> str:
    """The span id (16 hex digits, never all zero) of the span `key` stands for."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return digest if digest != _ZERO_SPAN else "0" * 15 + "1"


def traceparent(trace_id: str, parent_span: str, sampled: bool = True) -> bytes:
    """A ``traceparent`` header value (version 00)."""
    return f"00-{w3c_trace_id(trace_id)}-{parent_span}-{'01' if sampled else '00'}".encode()


def parse_traceparent(value: bytes | str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a ``traceparent`` value; None when it is not
    a valid one (then it is ignored, as W3C Trace Context says)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    match = _TRACEPARENT.fullmatch(text.strip())
    if match is None:
        return None
    version, trace, parent, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE:
        return None
    if parent == _ZERO_SPAN:
        return None
    return trace, parent, bool(int(flags, 16) & 1)
