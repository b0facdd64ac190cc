"""The FastStream-native entry: `create_app` as a factory under ``faststream run`` and
``faststream docs gen``, against the real broker and Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mediator.settings import settings_document
from tests.helpers import wait_for
from tests.processes import FastStreamProcess
from tests.system import CHAIN3, echo
from topics.events import WorkflowStatus


@pytest.mark.slow
async def test_faststream_run_serves_workflows_and_stops_cleanly(
    make_system: Any, tmp_path: Path
) -> None:
    system = await make_system(CHAIN3)
    await system.worker("svc", {"work": echo})
    workflows = tmp_path / "chain3.yaml"
    workflows.write_text(yaml.safe_dump(CHAIN3))
    replica = FastStreamProcess(system.settings, workflows, tmp_path, "faststream")
    replica.start()
    try:
        await _started(replica)
        client = await system.client()
        results = await asyncio.gather(
            *(client.submit("chain3", {"i": i}, timeout=60) for i in range(5))
        )
        assert [r.status for r in results] == [WorkflowStatus.COMPLETED] * 5, replica.output()
    finally:
        code = await replica.stop()
    output = replica.output()
    assert code == 0, output
    assert "Traceback" not in output, output


def test_faststream_docs_gen_documents_every_channel_and_payload(
    settings: Any, tmp_path: Path
) -> None:
    workflows = tmp_path / "chain3.yaml"
    workflows.write_text(yaml.safe_dump(CHAIN3))
    config = tmp_path / "mediator.yaml"
    config.write_text(
        yaml.safe_dump({**settings_document(settings), "workflows": [str(workflows)]})
    )
    out = tmp_path / "asyncapi.json"
    # Outside any running event loop, as the command imports the application.
    run = subprocess.run(
        [sys.executable, "-m", "faststream", "docs", "gen", "mediator:create_app", "--factory",
         "--out", str(out)],
        env={**os.environ, "MEDIATOR_CONFIG": str(config)}, capture_output=True, text=True,
        timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    assert doc["info"]["title"] == "kafka-mediator"
    topics = settings.kafka.topics
    payloads = {}
    for channel in doc["channels"].values():
        (message,) = channel["messages"].values()
        ref = message["$ref"].rsplit("/", 1)[-1]
        found = doc["components"]["messages"][ref]["payload"]
        payloads[channel["address"]] = orjson.dumps(found).decode()
    expected = {
        topics.requests: "RequestEvent",
        topics.replies: "ReplyEvent",
        topics.control: "ControlEvent",
        topics.health: "HealthEvent",
        topics.service("svc"): "CommandEvent",
        topics.results: "ResultEvent",
        topics.dlq: "DeadLetter",
        topics.alerts: "AlertEvent",
    }
    assert set(payloads) == set(expected)
    schemas = doc["components"]["schemas"]
    for address, model in expected.items():
        payload = payloads[address]
        if model not in payload:  # a subscriber's payload schema refers to the model
            payload = orjson.dumps(schemas[payload.rsplit("/", 1)[-1].strip('"}')]).decode()
        assert model in payload, (address, payload)
        assert schemas[model]["properties"], model

    # Without workflows to serve, the factory says what to set, in one line.
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(settings_document(settings)))
    run = subprocess.run(
        [sys.executable, "-m", "faststream", "docs", "gen", "mediator:create_app", "--factory"],
        env={**os.environ, "MEDIATOR_CONFIG": str(bare)}, capture_output=True, text=True,
        timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: no workflows configured: set MEDIATOR_WORKFLOWS (or workflows in the "
        "MEDIATOR_CONFIG file)"
    ]


@pytest.mark.slow
async def test_faststream_run_starts_where_an_earlier_versions_groups_stopped(
    make_system: Any, tmp_path: Path
) -> None:
    """`faststream run` and `mediator run` share one start-up: an upgrade started either
    way carries the old groups' offsets over and replays no request."""
    from mediator.runtime.groups import previous_groups
    from mediator.storage.keys import workflow_id_for
    from tests.helpers import commit_to_end, produce
    from topics import RequestEvent

    system = await make_system(CHAIN3)
    await system.worker("svc", {"work": echo})
    done = [RequestEvent(request_id=f"old-{n}", workflow="chain3") for n in range(3)]
    await produce(system.bootstrap, system.topics.requests,
                  [r.model_dump_json().encode() for r in done])  # fmt: skip
    old = previous_groups(system.settings.kafka)
    for topic in (system.topics.requests, system.topics.replies):
        await commit_to_end(system.bootstrap, old[topic], topic)
    workflows = tmp_path / "chain3.yaml"
    workflows.write_text(yaml.safe_dump(CHAIN3))
    replica = FastStreamProcess(system.settings, workflows, tmp_path, "faststream")
    replica.start()
    try:
        await _started(replica)
        client = await system.client()
        result = await client.submit("chain3", {}, request_id="new-1", timeout=60)
        assert result.status is WorkflowStatus.COMPLETED, replica.output()
    finally:
        await replica.stop()
    from mediator.storage.connection import connect_to

    redis = connect_to(system.settings.redis)
    try:
        from mediator.storage.keys import Keys

        keys = Keys(system.settings.redis.key_prefix, system.settings.redis.shards)
        for request in done:  # not started again
            assert not await redis.exists(keys.workflow(workflow_id_for(request.request_id)))
        assert await redis.exists(keys.workflow(workflow_id_for("new-1")))
    finally:
        await redis.aclose()


async def _started(replica: FastStreamProcess) -> None:
    """Until `faststream run` says it started (or exited)."""
    await wait_for(
        lambda: "started" in replica.output() or replica.process.poll() is not None,  # type: ignore[union-attr]
        timeout=60,
        what="faststream run to start",
    )
