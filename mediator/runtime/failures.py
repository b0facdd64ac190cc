"""Sorting failures at the boundaries: transient or permanent, and dead letters.

Every place where a record, an outbox entry or a result can fail asks `is_transient`:

- **transient** (Redis or Kafka unreachable, a timeout, a leader moving): retry later,
  with capped exponential backoff, logged and counted;
- **permanent** (anything else: a record that does not decode, a value that cannot be
  stored, a message larger than the broker accepts, a topic that does not exist, a bug):
  that one record or entry is dead-lettered with its reason, what waited on it is failed
  with a clear error, and everything else moves on.
"""

from __future__ import annotations

import time

from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from mediator.codec import dead_letter
from mediator.errors import StateUnavailable

__all__ = ["dead_letter", "failure_code", "is_transient"]

#: Kafka errors that a retry cannot cure.
_PERMANENT_KAFKA: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
)


def is_transient(exc: BaseException, *, metadata_age_s: float | None = None) -> bool:
    """True when retrying later may succeed.

    An unknown topic is permanent only when the broker answered a metadata request
    recently (`metadata_age_s`, seconds since the last successful refresh): then the
    topic really does not exist and the broker will not create it. With no recent
    answer the broker is more likely unreachable, which is transient.
    """
    if isinstance(exc, StateUnavailable | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, UnknownTopicOrPartitionError):
        return metadata_age_s is None or metadata_age_s > 30
    if isinstance(exc, _PERMANENT_KAFKA):
        return False
    # Every other Kafka error (timeouts, connection loss, leadership changes, a producer
    # that is closing) is about the cluster, not the message.
    return isinstance(exc, KafkaError)


def failure_code(exc: BaseException) -> str:
    """A short machine-readable code for a permanent failure."""
    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return "too_large"
    if isinstance(exc, UnknownTopicOrPartitionError | InvalidTopicError):
        return "unknown_topic"
    if isinstance(exc, TopicAuthorizationFailedError):
        return "not_authorized"
    return "unprocessable"


def metadata_age_s(producer: object) -> float | None:
    """Seconds since `producer` (aiokafka) last heard from the cluster, if known."""
    cluster = getattr(getattr(producer, "client", None), "cluster", None)
    last = getattr(cluster, "_last_successful_refresh_ms", 0) if cluster is not None else 0
    return time.time() - last / 1000 if last else None
