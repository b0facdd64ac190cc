"""The dead-letter queue: read the `DeadLetter`s the mediator published, and replay them.

A dead letter keeps the rejected record's topic, key, headers and value (see
`topics.events.DeadLetter`), so once the cause is fixed (a raised size limit, a bug fixed
in a new release, a corrupt state deleted) the original record can be published again to
its topic and go through the mediator as if it had just arrived.

Only letters that still hold the whole original can be replayed: one whose ``value`` is an
excerpt (``truncated``), is empty, or does not encode back to the size the original had
(bytes that were not UTF-8 and were decoded with replacement) is refused with its reason.
Replaying a letter twice publishes it twice; requests are idempotent by ``request_id`` and
replies by ``command_id``, so the mediator applies each once.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from pydantic import ValidationError

from mediator.codec import validation_reason
from mediator.errors import MediatorError
from mediator.kafka import KafkaConnection, as_connection, new_consumer
from mediator.producers import new_producer, start_producer
from topics.events import DeadLetter
from topics.names import Topics

__all__ = [
    "SIGNATURE_CODES",
    "DlqError",
    "Letter",
    "Outcome",
    "ReplayReport",
    "parse_coordinates",
    "read_dead_letters",
    "refusal",
    "replay",
    "replayable_topics",
    "select",
]

log = logging.getLogger("mediator.dlq")

#: One dead letter with where it is on the DLQ topic: (partition, offset, letter).
Letter = tuple[int, int, DeadLetter]

_COORDINATES = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_POLL_MS = 200
# A broker that fails one send this way is not going to take the next ones either.
_BROKER_DOWN = (KafkaConnectionError, KafkaTimeoutError, TimeoutError)


class DlqError(MediatorError):
    """The DLQ cannot be read or replayed as asked (missing topic, unknown letter, no broker)."""


def parse_coordinates(text: str) -> tuple[int, int]:
    """``(partition, offset)`` of ``"partition:offset"``, e.g. ``"3:17"``."""
    match = _COORDINATES.match(text)
    if match is None:
        msg = (
            f"invalid dead letter {text!r}; name it by its place on the DLQ topic as "
            "PARTITION:OFFSET, e.g. 3:17 (the first column of `mediator dlq list`)"
        )
        raise DlqError(msg)
    return int(match[1]), int(match[2])


async def read_dead_letters(
    bootstrap: str | KafkaConnection,
    topics: Topics,
    *,
    limit: int | None,
    code: str | None = None,
    source: str | None = None,
    since_ms: int | None = None,
    on_unreadable: Callable[[int, int, str], object] | None = None,
    client_id: str = "mediator-dlq",
    fetch_max_wait_ms: int = 500,
    timeout_s: float = 30.0,
    tail: int | None = None,
    at: Collection[tuple[int, int]] | None = None,
) -> list[Letter]:
    """The dead letters on ``topics.dlq`` that match, oldest first (by ``rejected_ms``).

    Every partition is read from its beginning up to its end when the call starts, without
    a consumer group (nothing is committed), so the call returns on an idle topic and does
    not wait for letters published meanwhile. ``code`` and ``source`` must equal the
    letter's ``code`` and ``source_topic``; ``since_ms`` keeps letters rejected at or after
    it. With ``limit``, only the newest ``limit`` matches are kept. A record that is not a
    `DeadLetter` is logged and passed to ``on_unreadable(partition, offset, reason)``.
    Bounded reads: with ``tail``, only the last ``tail`` records of each partition are read
    (the newest ``limit`` letters are among the last ``limit`` of each); with ``at``, only
    the records at those (partition, offset) coordinates. Raises `DlqError` when the topic
    does not exist, or the broker cannot be reached or does not answer within
    ``timeout_s``.
    """
    if limit is not None and limit < 1:
        msg = f"the limit must be at least 1, got {limit}"
        raise DlqError(msg)
    topic = topics.dlq
    newest: list[tuple[int, int, int, DeadLetter]] = []  # a min-heap on (rejected_ms, p, o)

    wanted = set(at) if at is not None else None

    def keep(partition: int, offset: int, value: bytes | None) -> None:
        if wanted is not None and (partition, offset) not in wanted:
            return
        try:
            letter = DeadLetter.model_validate_json(value or b"")
        except ValidationError as exc:
            reason = f"not a dead letter: {validation_reason(exc)}"
            log.warning("%s[%d]@%d skipped, %s", topic, partition, offset, reason)
            if on_unreadable is not None:
                on_unreadable(partition, offset, reason)
            return
        if not _matches(letter, code, source, since_ms):
            return
        entry = (letter.rejected_ms, partition, offset, letter)
        if limit is None or len(newest) < limit:
            heapq.heappush(newest, entry)
        elif entry[:3] > newest[0][:3]:
            heapq.heapreplace(newest, entry)

    consumer = new_consumer(
        bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            # `topics()` asks for full metadata, which never creates a topic as a side effect.
            if topic not in await consumer.topics():
                msg = f"DLQ topic {topic!r} does not exist; check kafka.topic_prefix"
                raise DlqError(msg)
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
            tps = [TopicPartition(topic, p) for p in partitions]
            listed: dict[TopicPartition, int] = await consumer.end_offsets(tps) if tps else {}
            listed, starts = await _window(consumer, listed, tail, wanted)
        await _read_to_end(consumer, listed, keep, timeout_s, starts)
    except TimeoutError as exc:
        msg = f"Kafka did not answer within {timeout_s:g}s; check kafka.bootstrap_servers"
        raise DlqError(msg) from exc
    except KafkaError as exc:
        where = as_connection(bootstrap).bootstrap_servers
        msg = f"cannot read {topic!r} from Kafka at {where}: {exc}"
        raise DlqError(msg) from exc
    finally:
        await consumer.stop()
    return [(p, o, letter) for _, p, o, letter in sorted(newest, key=lambda e: e[:3])]


def _matches(
    letter: DeadLetter, code: str | None, source: str | None, since_ms: int | None
) -> bool:
    return (
        (code is None or letter.code == code)
        and (source is None or letter.source_topic == source)
        and (since_ms is None or letter.rejected_ms >= since_ms)
    )


async def _window(
    consumer: AIOKafkaConsumer,
    listed: dict[TopicPartition, int],
    tail: int | None,
    wanted: set[tuple[int, int]] | None,
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Which offsets of each partition to read: (end, start), bounded by `tail` records
    per partition or to the `wanted` coordinates."""
    starts: dict[TopicPartition, int] = {}
    if tail is not None and listed:
        first = await consumer.beginning_offsets(list(listed))
        starts = {tp: max(first[tp], end - tail) for tp, end in listed.items()}
    if wanted is not None:
        listed = {
            tp: end for tp, end in listed.items() if any(p == tp.partition for p, _ in wanted)
        }
        for tp in listed:
            offsets = [o for p, o in wanted if p == tp.partition]
            starts[tp] = min(offsets)
            listed[tp] = min(listed[tp], max(offsets) + 1)
    return listed, starts


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    listed: dict[TopicPartition, int],
    keep: Callable[[int, int, bytes | None], None],
    timeout_s: float,
    starts: Mapping[TopicPartition, int] | None = None,
) -> None:
    """Hand every record of the partitions to ``keep``, from their beginning (or
    ``starts``) to their end at the start; give up when no partition makes progress for
    ``timeout_s``."""
    if not listed:
        return
    tps = list(listed)
    consumer.assign(tps)
    await consumer.seek_to_beginning(*(tp for tp in tps if tp not in (starts or {})))
    for tp, offset in (starts or {}).items():
        if tp in listed:
            consumer.seek(tp, offset)
    # Tansu lists the base offset of the last batch + 1 as the end offset, short of the end
    # when that batch holds several records; the high watermark of the first fetch is right
    # on every broker, so a partition ends at the larger of the two.
    stops: dict[TopicPartition, int | None] = dict.fromkeys(tps)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while stops:
        batches = await consumer.getmany(*stops, timeout_ms=_POLL_MS, max_records=1000)
        for tp in list(stops):
            stop = stops[tp]
            if stop is None and (mark := consumer.highwater(tp)) is not None:
                stop = stops[tp] = max(listed[tp], mark)
                deadline = loop.time() + timeout_s
            for record in batches.get(tp, ()):
                if stop is None or record.offset < stop:
                    keep(tp.partition, record.offset, record.value)
            if stop is not None and await consumer.position(tp) >= stop:
                consumer.pause(tp)
                del stops[tp]
        if batches:
            deadline = loop.time() + timeout_s
        elif stops and loop.time() > deadline:
            behind = ", ".join(str(tp.partition) for tp in stops)
            msg = (
                f"no records from {tps[0].topic} partitions {behind} within {timeout_s:g}s; "
                "the broker may be unavailable"
            )
            raise DlqError(msg)


def select(letters: Iterable[Letter], coordinates: Iterable[tuple[int, int]] = ()) -> list[Letter]:
    """The ``letters`` at ``coordinates`` (``(partition, offset)`` on the DLQ), in the
    order of ``letters``; all of them when no coordinates are given.

    Raises `DlqError` naming the coordinates that match no letter, so a typo replays
    nothing rather than part of what was asked.
    """
    wanted = set(coordinates)
    if not wanted:
        return list(letters)
    chosen = [letter for letter in letters if (letter[0], letter[1]) in wanted]
    missing = wanted - {(p, o) for p, o, _ in chosen}
    if missing:
        names = ", ".join(f"{p}:{o}" for p, o in sorted(missing))
        msg = (
            f"no dead letter at {names} (among those matching the other options); "
            "see `mediator dlq list` for the PARTITION:OFFSET of each letter"
        )
        raise DlqError(msg)
    return chosen


#: Dead-letter codes of records refused for their signature: published again, they would
#: be refused again (and a forged one must never be sent on with the DLQ's authority).
SIGNATURE_CODES = frozenset({"unsigned", "bad_signature", "forbidden", "stale"})


def replayable_topics(topics: Topics) -> tuple[str, ...]:
    """The topics dead letters may be replayed to: requests and replies, never the
    control topic (a forged letter naming it would be an operator's control)."""
    return (topics.requests, topics.replies)


def refusal(letter: DeadLetter, to: Collection[str] | None = None) -> str | None:
    """Why ``letter`` cannot be replayed (to one of the topics `to`, when given), or None
    when its value is the whole original and it may go back where it came from."""
    if to is not None and letter.source_topic not in to:
        return (
            f"its topic {letter.source_topic!r} is not one letters are replayed to "
            f"({', '.join(to)})"
        )
    if letter.code in SIGNATURE_CODES:
        return f"refused for its signature ({letter.code}): it would be refused again"
    if letter.truncated:
        kept = len(letter.value.encode())
        of = f" of {letter.size}" if letter.size is not None else ""
        return (
            f"truncated: the dead letter kept only {kept}{of} bytes of the original "
            "(limits.dead_letter_excerpt_bytes), so it cannot be rebuilt; "
            "have its producer send it again"
        )
    if not letter.value:
        return "empty value: the dead letter holds nothing to publish"
    size = len(letter.value.encode())
    if letter.size is not None and size != letter.size:
        return (
            f"not the original bytes: the value encodes to {size} bytes, the original had "
            f"{letter.size} (it was not UTF-8 and was decoded with replacement)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one dead letter in a replay.

    ``status`` is ``replayed`` (published; ``published_partition`` and
    ``published_offset`` say where), ``would_replay`` (a dry run), ``refused`` (its
    ``reason`` says why it cannot be replayed) or ``failed`` (the send failed: ``reason``).
    """

    partition: int
    offset: int
    letter: DeadLetter
    status: Literal["replayed", "would_replay", "refused", "failed"]
    reason: str | None = None
    published_partition: int | None = None
    published_offset: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The outcome as plain JSON-ready values (the letter's value left out)."""
        letter = self.letter
        return {
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "status": self.status,
            "reason": self.reason,
            "code": letter.code,
            "source_topic": letter.source_topic,
            "source_partition": letter.partition,
            "source_offset": letter.offset,
            "key": letter.key,
            "size": letter.size,
            "published_partition": self.published_partition,
            "published_offset": self.published_offset,
        }


@dataclass(slots=True)
class ReplayReport:
    """What one replay did, letter by letter, in the order they were given."""

    dry_run: bool
    outcomes: list[Outcome] = field(default_factory=list)

    def with_status(self, status: str) -> list[Outcome]:
        """The outcomes with ``status``."""
        return [o for o in self.outcomes if o.status == status]

    @property
    def ok(self) -> bool:
        """True when nothing was refused and no send failed."""
        return not any(o.status in ("refused", "failed") for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        counts = {
            s: len(self.with_status(s)) for s in ("replayed", "would_replay", "refused", "failed")
        }
        return {
            "dry_run": self.dry_run,
            **counts,
            "letters": [o.as_dict() for o in self.outcomes],
        }


async def replay(
    bootstrap: str | KafkaConnection,
    letters: Sequence[Letter],
    *,
    to: Collection[str],
    dry_run: bool = False,
    enable_idempotence: bool = True,
    client_id: str = "mediator-dlq",
    max_request_size: int | None = None,
    timeout_s: float = 30.0,
) -> ReplayReport:
    """Publish each of ``letters`` again to its ``source_topic``, which must be one of `to`
    (`replayable_topics`): its original value, key and headers, one after the other, each
    waiting for the broker's acknowledgement.

    Letters that cannot be replayed (see `refusal`) are refused with their reason. A send
    that fails is reported for its letter; after a failure that says the broker is gone
    (no connection, a timeout), the letters after it are reported failed without being
    tried. A dry run publishes nothing and says what would be replayed. Raises only when
    the producer cannot be started at all: `DlqError`, or `IdempotenceUnsupported` when the
    broker refuses ``enable_idempotence``.
    """
    outcomes: list[Outcome | None] = []
    accepted: list[tuple[int, Letter]] = []  # (index in `outcomes`, letter)
    for partition, offset, letter in letters:
        reason = refusal(letter, to)
        if reason is not None:
            outcomes.append(Outcome(partition, offset, letter, "refused", reason))
        elif dry_run:
            outcomes.append(Outcome(partition, offset, letter, "would_replay"))
        else:
            accepted.append((len(outcomes), (partition, offset, letter)))
            outcomes.append(None)
    if accepted:
        sent = await _replay_accepted(
            bootstrap,
            [letter for _, letter in accepted],
            enable_idempotence=enable_idempotence,
            client_id=client_id,
            max_request_size=max_request_size,
            timeout_s=timeout_s,
        )
        for (index, _), outcome in zip(accepted, sent, strict=True):
            outcomes[index] = outcome
    return ReplayReport(dry_run, [o for o in outcomes if o is not None])


async def _replay_accepted(
    bootstrap: str | KafkaConnection,
    letters: Sequence[Letter],
    *,
    enable_idempotence: bool,
    client_id: str,
    max_request_size: int | None,
    timeout_s: float,
) -> list[Outcome]:
    options = {"max_request_size": max_request_size} if max_request_size is not None else {}
    producer = new_producer(
        bootstrap, client_id=client_id, enable_idempotence=enable_idempotence, **options
    )
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await start_producer(producer, bootstrap, enable_idempotence)
        except TimeoutError as exc:
            msg = f"Kafka did not answer within {timeout_s:g}s; check kafka.bootstrap_servers"
            raise DlqError(msg) from exc
        except KafkaError as exc:
            where = as_connection(bootstrap).bootstrap_servers
            msg = f"cannot reach Kafka at {where} to replay: {exc}"
            raise DlqError(msg) from exc
        return await _publish(producer, letters, timeout_s)
    finally:
        await producer.stop()


async def _publish(
    producer: AIOKafkaProducer, letters: Sequence[Letter], timeout_s: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    broken: str | None = None
    for partition, offset, letter in letters:
        if broken is not None:
            outcomes.append(Outcome(partition, offset, letter, "failed", broken))
            continue
        try:
            async with asyncio.timeout(timeout_s):
                sent = await producer.send_and_wait(
                    letter.source_topic,
                    value=letter.value.encode(),
                    key=letter.key.encode() if letter.key is not None else None,
                    headers=[(k, v.encode()) for k, v in letter.headers.items()],
                )
        except (KafkaError, TimeoutError) as exc:
            reason = f"send to {letter.source_topic} failed: {_describe(exc, timeout_s)}"
            log.warning("replay of dead letter %d:%d: %s", partition, offset, reason)
            outcomes.append(Outcome(partition, offset, letter, "failed", reason))
            if isinstance(exc, _BROKER_DOWN):
                broken = f"not sent: the broker failed an earlier send ({reason})"
            continue
        outcomes.append(
            Outcome(partition, offset, letter, "replayed", None, sent.partition, sent.offset)
        )
    return outcomes


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError) and not isinstance(exc, KafkaError):
        return f"no acknowledgement within {timeout_s:g}s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
