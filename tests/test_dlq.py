"""`mediator dlq list` and `mediator dlq replay` against the real broker and Redis.

Dead letters come from a real mediator where the test is about what the mediator rejects
(an invalid request, an oversized one, a request whose stored state is corrupt) and are
published by hand where the test is about reading, choosing and replaying them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner, Result

from mediator import codec
from mediator.cli.dlq import dlq_app
from mediator.cli.infra import create_topics
from mediator.ops.dlq import (
    DlqError,
    read_dead_letters,
    refusal,
    replay,
    replayable_topics,
    select,
)
from mediator.runtime.failures import dead_letter
from mediator.sdk.client import MediatorClient
from mediator.settings import LimitsSettings, Settings, settings_document
from mediator.storage.keys import workflow_id_for
from tests.helpers import letters_of, produce, records_on, step, wait_for, wait_for_letters
from tests.system import System, echo
from topics import DeadLetter, RequestEvent, ResultEvent, WorkflowStatus
from topics.names import Topics

ONE = {"name": "one", "steps": [step("a", action="work")]}


# -- helpers ------------------------------------------------------------------------------


async def publish_to_dlq(
    topics: Topics, bootstrap: str, values: Sequence[tuple[int, bytes]]
) -> None:
    """Publish ``(partition, value)`` pairs to the DLQ, all at once: several records share
    a batch, as the mediator's would."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        sent = [
            await producer.send(topics.dlq, value, key=b"k", partition=partition)
            for partition, value in values
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def letter(
    source: str,
    value: bytes,
    *,
    code: str = "invalid",
    key: str | None = "k-1",
    excerpt_bytes: int = 16_384,
    rejected_ms: int | None = None,
) -> DeadLetter:
    """A dead letter as the mediator builds one."""
    built = dead_letter(
        reason=f"{code}: something about it was wrong",
        code=code,
        topic=source,
        value=value,
        key=key.encode() if key is not None else None,
        headers=[("mediator-event", b"request"), ("trace-id", b"tr-1")],
        partition=2,
        offset=41,
        excerpt_bytes=excerpt_bytes,
    )
    return built if rejected_ms is None else built.model_copy(update={"rejected_ms": rejected_ms})


async def results_client(system: System, seen: list[ResultEvent]) -> MediatorClient:
    """A client that keeps every result it reads in ``seen``; stopped with the system."""
    client = MediatorClient(
        system.bootstrap,
        topics=system.topics,
        enable_idempotence=False,
        fetch_max_wait_ms=system.settings.kafka.fetch_max_wait_ms,
        on_result=seen.append,
    )
    await client.start()
    system._closers.append(("client", client.stop))
    return client


async def completed(seen: list[ResultEvent], request_id: str) -> ResultEvent:
    def find() -> ResultEvent | None:
        return next(
            (
                r
                for r in seen
                if r.request_id == request_id and r.status is WorkflowStatus.COMPLETED
            ),
            None,
        )

    found = await wait_for(find, timeout=30, what=f"a completed result for {request_id}")
    assert isinstance(found, ResultEvent)
    return found


# -- reading ------------------------------------------------------------------------------


async def test_list_reads_every_partition_filters_and_reports_records_that_are_not_letters(
    settings: Settings,
) -> None:
    topics, bootstrap = settings.kafka.topics, settings.kafka.bootstrap_servers
    started = time.monotonic()
    assert await letters_of(settings) == []  # an idle topic: the read ends at once
    assert time.monotonic() - started < 5

    base = 1_795_306_000_000
    made = [
        (0, letter(topics.requests, b'{"a":1}', rejected_ms=base + 1)),
        (0, letter(topics.requests, b'{"a":2}', rejected_ms=base + 5)),
        (1, letter(topics.replies, b'{"r":1}', code="invalid_output", rejected_ms=base + 2)),
        (3, letter(topics.requests, b"x" * 600, code="too_large", rejected_ms=base + 4)),
        (3, letter(topics.replies, b'{"r":2}', rejected_ms=base + 3)),
    ]
    values = [(p, codec.encode(d)) for p, d in made]
    values.insert(2, (0, b"not a dead letter"))
    await publish_to_dlq(topics, bootstrap, values)
    unreadable: list[tuple[int, int, str]] = []

    found = await read_dead_letters(
        bootstrap,
        topics,
        limit=None,
        on_unreadable=lambda *where: unreadable.append(where),
        fetch_max_wait_ms=5,
    )

    # Oldest first, each with its place on the DLQ topic.
    assert [(p, o, d.rejected_ms - base) for p, o, d in found] == [
        (0, 0, 1),
        (1, 0, 2),
        (3, 1, 3),
        (3, 0, 4),
        (0, 1, 5),
    ]
    assert [d for _, _, d in found] == [made[i][1] for i in (0, 2, 4, 3, 1)]
    [(partition, offset, reason)] = unreadable
    assert (partition, offset) == (0, 2) and reason.startswith("not a dead letter")

    by_code = await letters_of(settings, code="invalid")
    assert [d.rejected_ms - base for _, _, d in by_code] == [1, 3, 5]
    by_source = await letters_of(settings, source=topics.replies)
    assert [d.rejected_ms - base for _, _, d in by_source] == [2, 3]
    both = await letters_of(settings, source=topics.replies, code="invalid")
    assert [d.rejected_ms - base for _, _, d in both] == [3]
    recent = await letters_of(settings, since_ms=base + 4)
    assert [d.rejected_ms - base for _, _, d in recent] == [4, 5]
    newest = await read_dead_letters(bootstrap, topics, limit=2, fetch_max_wait_ms=5)
    assert [d.rejected_ms - base for _, _, d in newest] == [4, 5]

    # Coordinates choose letters; one that names no letter chooses nothing.
    assert [(p, o) for p, o, _ in select(found, [(3, 0), (0, 0)])] == [(0, 0), (3, 0)]
    with pytest.raises(DlqError, match="no dead letter at 0:2, 7:7"):
        select(found, [(0, 0), (7, 7), (0, 2)])

    absent = Topics(prefix="absent.")
    with pytest.raises(DlqError, match=r"'absent\.dlq' does not exist"):
        await read_dead_letters(bootstrap, absent, limit=None, timeout_s=10)


async def test_a_rejected_request_is_listed_with_its_reason_and_code(make_system: Any) -> None:
    system = await make_system(ONE)
    await system.mediator()
    value = b'{"type":"request","request_id":"r-9","workflow":"one","colour":"red"}'
    await produce(system.bootstrap, system.topics.requests, [value], keys=[b"r-9"])

    [(_, _, found)] = await wait_for_letters(system.settings, 1)

    assert found.code == "invalid"
    assert found.reason == "colour: Extra inputs are not permitted"
    assert (found.source_topic, found.key, found.offset) == (system.topics.requests, "r-9", 0)
    assert found.value.encode() == value and found.size == len(value)
    assert not found.truncated and refusal(found) is None


# -- replaying ----------------------------------------------------------------------------


async def test_replay_after_fixing_a_corrupt_state_completes_the_workflow(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    seen: list[ResultEvent] = []
    client = await results_client(system, seen)
    # A stored state that no longer decodes: the request is dead-lettered, every time.
    corrupt = mediator.store.keys.workflow(workflow_id_for("fixme"))
    await mediator.redis.hset(corrupt, mapping={"rev": 1, "state": "{oops"})

    refused = await client.submit("one", {"n": 7}, request_id="fixme", timeout=30)

    assert refused.status is WorkflowStatus.FAILED
    assert refused.error is not None and refused.error.code == "unprocessable"
    [chosen] = await wait_for_letters(system.settings, 1, code="unprocessable")
    requests_before = await records_on(system.bootstrap, system.topics.requests)

    # A dry run publishes nothing.
    to = replayable_topics(system.topics)
    dry = await replay(system.bootstrap, [chosen], to=to, dry_run=True, enable_idempotence=False)
    assert [o.status for o in dry.outcomes] == ["would_replay"] and dry.ok
    assert len(await records_on(system.bootstrap, system.topics.requests)) == len(requests_before)

    # The fix: the corrupt key is deleted; the request is replayed and its run completes.
    await mediator.redis.delete(corrupt)
    report = await replay(
        system.bootstrap, [chosen], to=replayable_topics(system.topics), enable_idempotence=False
    )

    [outcome] = report.outcomes
    assert outcome.status == "replayed" and report.ok
    result = await completed(seen, "fixme")
    assert result.output == {"a": {"step": "a", "input": {"n": 7}}}
    after = await records_on(system.bootstrap, system.topics.requests)
    assert len(after) == 2
    [original] = requests_before
    [copy] = [
        r
        for r in after
        if (r.partition, r.offset) == (outcome.published_partition, outcome.published_offset)
    ]
    assert (copy.key, copy.value, copy.partition) == (
        original.key,
        original.value,
        original.partition,
    )
    assert sorted(copy.headers) == sorted(original.headers)


async def test_a_truncated_letter_is_refused_and_nothing_is_published(make_system: Any) -> None:
    # The dead letter of an oversized request can never hold all of it (it would be over
    # the limit itself): it keeps an excerpt that fits, and is published, not lost.
    small = LimitsSettings(max_message_bytes=2048, dead_letter_excerpt_bytes=16_384)
    system = await make_system(ONE, limits=small)
    await system.worker("svc", {"work": echo})
    await system.mediator()
    client = await system.client()

    refused = await client.submit("one", {"blob": "x" * 5000}, request_id="big", timeout=30)

    assert refused.error is not None and refused.error.code == "payload_too_large"
    [chosen] = await wait_for_letters(system.settings, 1, code="payload_too_large")
    found = chosen[2]
    assert found.truncated and found.size is not None and found.size > 5000
    assert len(found.value) == small.excerpt_bytes < 2048

    report = await replay(
        system.bootstrap, [chosen], to=replayable_topics(system.topics), enable_idempotence=False
    )

    [outcome] = report.outcomes
    assert outcome.status == "refused" and not report.ok
    assert outcome.reason is not None and outcome.reason.startswith("truncated")
    assert f"only {small.excerpt_bytes} of {found.size} bytes" in outcome.reason
    assert len(await records_on(system.bootstrap, system.topics.requests)) == 1


async def test_dry_run_publishes_nothing_and_each_letter_is_sorted_on_its_own(
    settings: Settings,
) -> None:
    topics, bootstrap = settings.kafka.topics, settings.kafka.bootstrap_servers
    target = f"{topics.prefix}target"
    await create_topics(bootstrap, [target], partitions=4)
    big = b'{"blob":"' + b"y" * 3000 + b'"}'
    made = [
        letter(target, b'{"n":1}', key="a"),
        letter(target, b'{"n":2}', key=None),
        letter(target, b"x" * 600, excerpt_bytes=256),  # truncated
        letter(target, b""),  # empty
        letter(target, b'{"n":"\xff"}'),  # not UTF-8: decoded with replacement
        letter(target, big, key="b"),  # over the producer's max_request_size below
        letter(target, b'{"n":3}', key="c"),
    ]
    letters = [(0, i, d) for i, d in enumerate(made)]

    dry = await replay(bootstrap, letters, to=[target], dry_run=True, enable_idempotence=False)

    assert [o.status for o in dry.outcomes] == [
        "would_replay",
        "would_replay",
        "refused",
        "refused",
        "refused",
        "would_replay",
        "would_replay",
    ]
    assert [o.offset for o in dry.outcomes] == list(range(7))
    reasons = [o.reason or "" for o in dry.outcomes[2:5]]
    assert reasons[0].startswith("truncated")
    assert reasons[1].startswith("empty value")
    assert reasons[2].startswith("not the original bytes")
    assert await records_on(bootstrap, target) == []

    report = await replay(
        bootstrap,
        letters,
        to=[target],
        enable_idempotence=False,
        max_request_size=2048,
        timeout_s=10,
    )

    assert [o.offset for o in report.outcomes] == list(range(7))
    outcomes = {o.offset: o for o in report.outcomes}
    assert {i: o.status for i, o in outcomes.items()} == {
        0: "replayed",
        1: "replayed",
        2: "refused",
        3: "refused",
        4: "refused",
        5: "failed",
        6: "replayed",
    }
    assert "MessageSizeTooLargeError" in (outcomes[5].reason or "")
    published = {(r.partition, r.offset): r for r in await records_on(bootstrap, target)}
    assert len(published) == 3
    for i, value, key in [(0, b'{"n":1}', b"a"), (1, b'{"n":2}', None), (6, b'{"n":3}', b"c")]:
        record = published[(outcomes[i].published_partition, outcomes[i].published_offset)]
        assert (record.value, record.key) == (value, key)
        assert sorted(record.headers) == [("mediator-event", b"request"), ("trace-id", b"tr-1")]


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / "mediator.yaml"
    path.write_text(yaml.safe_dump(settings_document(settings)))
    return path


async def invoke(config: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run the `dlq` sub-app as `mediator dlq ARGS` would, in a thread (it runs its own loop)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, dlq_app, [*args, "--config", str(config)], env=env
    )


async def test_cli_lists_replays_and_exits_non_zero_on_refusal(
    settings: Settings, config_file: Path
) -> None:
    topics, bootstrap = settings.kafka.topics, settings.kafka.bootstrap_servers
    target = topics.requests  # letters go back only to the requests and replies topics
    await create_topics(bootstrap, [target], partitions=4)
    good = letter(target, b'{"n":1}', key="good-key")
    cut = letter(target, b"z" * 600, code="too_large", excerpt_bytes=256)
    await publish_to_dlq(topics, bootstrap, [(1, codec.encode(good)), (1, codec.encode(cut))])

    listed = await invoke(config_file, "list")

    assert listed.exit_code == 0, listed.output
    header, first, second, footer = listed.stdout.strip().splitlines()
    assert header.split()[:4] == ["DLQ", "REJECTED", "(UTC)", "CODE"]
    assert first.split()[0] == "1:0" and second.split()[0] == "1:1"
    assert f"{target}/2/41" in first and "good-key" in first and " no " in first
    assert "too_large" in second and "yes" in second and "600" in second
    assert footer == f"2 dead letters on {topics.dlq}"

    as_json = await invoke(config_file, "list", "--json", "--code", "too_large")
    document = orjson.loads(as_json.stdout)
    [row] = document["letters"]
    assert (row["dlq_partition"], row["dlq_offset"], row["truncated"]) == (1, 1, True)
    assert document["unreadable"] == []

    dry = await invoke(config_file, "replay", "--all", "--dry-run")
    assert dry.exit_code == 1, dry.output
    assert "would replay 1, refused 1; nothing was published" in dry.stdout
    assert await records_on(bootstrap, target) == []

    chosen = await invoke(config_file, "replay", "1:0", "--json")
    assert chosen.exit_code == 0, chosen.output
    report = orjson.loads(chosen.stdout)
    assert (report["replayed"], report["refused"], report["failed"]) == (1, 0, 0)
    [record] = await records_on(bootstrap, target)
    assert (record.value, record.key) == (b'{"n":1}', b"good-key")

    refused = await invoke(config_file, "replay", "--code", "too_large")
    assert refused.exit_code == 1, refused.output
    assert refused.stdout.startswith("refused") and "truncated" in refused.stdout
    assert len(await records_on(bootstrap, target)) == 1


async def test_cli_bad_input_is_one_line_and_exit_code_2(
    settings: Settings, config_file: Path
) -> None:
    await publish_to_dlq(
        settings.kafka.topics,
        settings.kafka.bootstrap_servers,
        [(0, codec.encode(letter("somewhere", b"{}")))],
    )
    for args, env, expected in [
        (("replay",), None, "choose what to replay"),
        (("replay", "--all", "--code", "x"), None, "--all replays every letter"),
        (("replay", "three"), None, "invalid dead letter 'three'"),
        (("replay", "0:0", "9:99"), None, "no dead letter at 9:99"),
        (("list", "--since", "yesterday"), None, "--since: invalid time 'yesterday'"),
        (
            ("list",),
            {"MEDIATOR_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"},
            "Unable to bootstrap from",
        ),
        (
            ("list",),
            {"MEDIATOR_KAFKA__TOPIC_PREFIX": "absent."},
            "DLQ topic 'absent.dlq' does not exist",
        ),
    ]:
        result = await invoke(config_file, *args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.stderr, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Nothing was replayed by the request that named an unknown letter alongside a known one.
    assert await records_on(settings.kafka.bootstrap_servers, "somewhere") == []


def test_requests_round_trip_through_a_dead_letter() -> None:
    request = RequestEvent(request_id="r-1", workflow="one", payload={"s": "é ✓"})
    value = codec.encode(request)
    built = letter("t.requests", value)
    assert refusal(built) is None and built.value.encode() == value


async def test_letters_go_back_only_to_requests_and_replies_and_never_forged_ones() -> None:
    """A letter naming the control topic (forged, or a control dead-lettered) is not
    published there by a replay, nor is one that was refused for its signature."""
    topics = Topics("t.")
    cancel = (
        b'{"type":"control","control_id":"c","action":"cancel","workflow_id":"w","issued_ms":1}'
    )
    letters = [
        (0, 0, letter(topics.control, cancel)),
        (0, 1, letter(topics.replies, b'{"type":"reply"}', code="bad_signature")),
        (0, 2, letter(topics.requests, b'{"type":"request"}')),
    ]
    report = await replay("127.0.0.1:1", letters, to=replayable_topics(topics), dry_run=True)
    assert [o.status for o in report.outcomes] == ["refused", "refused", "would_replay"]
    assert "'t.control' is not one letters are replayed to" in (report.outcomes[0].reason or "")
    assert "refused for its signature" in (report.outcomes[1].reason or "")


async def test_reads_are_bounded_to_the_tail_or_the_named_letters(settings: Settings) -> None:
    """The dashboard's page reads the newest letters, never the whole topic; a replay
    reads only the letters it names."""
    topics, bootstrap = settings.kafka.topics, settings.kafka.bootstrap_servers
    made = [letter(topics.requests, b'{"n":%d}' % n) for n in range(30)]
    # Five records that are not dead letters first: a read that reached them says so.
    # One at a time: Tansu lists a partition's end short of a batch of several records.
    junk = [(0, b"not a dead letter")] * 5
    for partition, value in junk + [(0, codec.encode(d)) for d in made]:
        await publish_to_dlq(topics, bootstrap, [(partition, value)])
    seen: list[tuple[int, int]] = []
    newest = await read_dead_letters(
        bootstrap, topics, limit=5, tail=5, timeout_s=10,
        on_unreadable=lambda p, o, reason: seen.append((p, o)),
    )  # fmt: skip
    assert [o for _, o, _ in newest] == [30, 31, 32, 33, 34]
    named = await read_dead_letters(
        bootstrap, topics, limit=None, at=[(0, 8), (0, 12)],
        on_unreadable=lambda p, o, reason: seen.append((p, o)),
    )  # fmt: skip
    assert [(p, o) for p, o, _ in named] == [(0, 8), (0, 12)]
    assert [d.value for _, _, d in named] == ['{"n":3}', '{"n":7}']
    assert seen == []  # neither read went near the start of the topic
    everything = await read_dead_letters(
        bootstrap, topics, limit=None, on_unreadable=lambda p, o, reason: seen.append((p, o))
    )
    assert len(everything) == 30 and len(seen) == 5
