"""The mediator's subscribers wait in the consumer for records: a request after a quiet
spell is handled as soon as it is fetched, not after a sleep between polls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mediator.settings import Settings
from tests.helpers import step
from tests.system import echo
from topics.events import WorkflowStatus

ONE = {"name": "one", "steps": [step("a")]}


@pytest.mark.slow
async def test_a_request_after_a_quiet_spell_is_not_held_by_the_poll_timeout(
    make_system: Any, settings: Settings
) -> None:
    # A long poll timeout: FastStream's own batch poll would, after an empty poll, sleep
    # that long again before polling, and a request arriving then would wait it out.
    kafka = settings.kafka.model_copy(update={"poll_timeout_ms": 3000})
    system = await make_system(ONE, kafka=kafka)
    await system.worker("svc", {"a": echo})
    await system.mediator()
    client = await system.client()
    assert (await client.submit("one", {}, timeout=30)).status is WorkflowStatus.COMPLETED

    await asyncio.sleep(3.5)  # every subscriber has had an empty poll of 3 s by now
    started = time.monotonic()
    result = await client.submit("one", {}, timeout=30)
    took = time.monotonic() - started
    assert result.status is WorkflowStatus.COMPLETED
    # Waiting out a sleep would take 2.5 s or more; fetched at once, it takes milliseconds.
    assert took < 1.5, f"the request took {took:.2f} s after a quiet spell"
