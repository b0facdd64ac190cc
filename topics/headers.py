"""Kafka header names and message keys of the wire contract.

Headers are informative: the value alone is authoritative, so a consumer that ignores
headers loses nothing, except that signed records must carry their signature headers.
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

__all__ = [
    "CONTENT_TYPE",
    "EVENT_TYPE",
    "JSON",
    "KEY_ID",
    "SCHEMA_VERSION",
    "SIGNATURE",
    "TRACE_ID",
    "headers_for",
]

EVENT_TYPE = "mediator-event"
SCHEMA_VERSION = "mediator-schema"
TRACE_ID = "trace-id"
CONTENT_TYPE = "content-type"
JSON = b"application/json"
#: Signed records (commands, replies, heartbeats): the id of the key that signed the value,
#: and the lowercase hex HMAC-SHA256 of the value under that key.
KEY_ID = "mediator-key"
SIGNATURE = "mediator-signature"


def headers_for(
    event_type: str, schema_version: int, trace_id: str | None
) -> list[tuple[str, bytes]]:
    """The headers every event is published with."""
    headers = [
        (EVENT_TYPE, event_type.encode()),
        (SCHEMA_VERSION, str(schema_version).encode()),
        (CONTENT_TYPE, JSON),
    ]
    if trace_id:
        headers.append((TRACE_ID, trace_id.encode()))
    return headers
