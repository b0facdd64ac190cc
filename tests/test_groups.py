"""An upgrade from the two consumer groups (requests, replies) to the one inbound group
starts where the old groups stopped: what the old replicas did is not done again."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from aiokafka.errors import KafkaError

from mediator.runtime.groups import ATTEMPTS, adopt_offsets, inbound_group, previous_groups
from mediator.settings import BackoffSettings, load_settings
from mediator.storage.keys import workflow_id_for
from tests.helpers import commit_to_end, committed, produce, step
from tests.system import echo
from topics import RequestEvent, WorkflowStatus

ONE = {"name": "one", "steps": [step("a", action="work")]}


async def test_the_inbound_group_starts_where_the_requests_and_replies_groups_stopped(
    make_system: Any,
) -> None:
    system = await make_system(ONE)
    kafka = system.settings.kafka
    # Requests an earlier version's replicas consumed (and answered) before the upgrade.
    done = [
        RequestEvent(request_id=f"before-{n}", workflow="one", payload={"n": n}) for n in range(3)
    ]
    await produce(
        system.bootstrap, system.topics.requests, [r.model_dump_json().encode() for r in done]
    )
    old = previous_groups(kafka)
    assert (
        await commit_to_end(system.bootstrap, old[system.topics.requests], system.topics.requests)
        == 3
    )
    await commit_to_end(system.bootstrap, old[system.topics.replies], system.topics.replies)

    await system.worker("svc", {"work": echo})
    mediator = await system.mediator()
    client = await system.client()
    result = await client.submit("one", {"n": "after"}, timeout=30)

    assert result.status is WorkflowStatus.COMPLETED
    for request in done:  # not started again
        assert await mediator.store.load(workflow_id_for(request.request_id)) is None
    assert mediator.runtime.stats.requests == 1
    group = inbound_group(kafka)
    assert await committed(system.bootstrap, group, system.topics.requests) == 4
    # The new group has offsets of its own now: they are never replaced again.
    assert await adopt_offsets(kafka, group, old) == {}
    assert await committed(system.bootstrap, group, system.topics.requests) == 4


async def test_a_new_deployment_has_nothing_to_carry_over(make_system: Any) -> None:
    system = await make_system(ONE)
    kafka = system.settings.kafka
    assert await adopt_offsets(kafka, inbound_group(kafka), previous_groups(kafka)) == {}


async def test_an_unreachable_broker_is_retried_with_backoff_then_the_start_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kafka = load_settings(kafka={"bootstrap_servers": f"127.0.0.1:{port}"}).kafka
    backoff = BackoffSettings(initial_ms=1, max_ms=4)
    with caplog.at_level(logging.WARNING, logger="mediator.consumers"), pytest.raises(KafkaError):
        await adopt_offsets(kafka, inbound_group(kafka), previous_groups(kafka), backoff)
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == ATTEMPTS - 1
