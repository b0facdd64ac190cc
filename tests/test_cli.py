"""The command line against the real broker and Redis, run as a user would run it."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.sdk.worker import ActionError
from mediator.settings import Settings
from mediator.storage.keys import Keys
from tests.helpers import cli
from tests.system import echo


async def test_status_json_counts_match_what_ran(make_system: Any) -> None:
    system = await make_system(
        {
            "name": "buy",
            "steps": [
                {"id": "pick", "service": "store", "action": "pick"},
                {"id": "pay", "service": "bank", "action": "pay", "depends_on": ["pick"]},
            ],
        }
    )

    async def pay(data: Any) -> dict[str, Any]:
        if data["amount"] > 100:
            msg = "too much"
            raise ActionError(msg, code="declined")
        return {"paid": data["amount"]}

    await system.worker("store", {"pick": echo})
    await system.worker("bank", {"pay": pay})
    await system.mediator()
    client = await system.client()
    amounts = [10, 20, 500, 30, 700, 40, 50]
    results = await asyncio.gather(*(client.submit("buy", {"amount": a}) for a in amounts))
    assert sorted(r.status.value for r in results) == ["completed"] * 5 + ["failed"] * 2

    code, out, err = await cli(system.settings, "status", "--json", "--limit", "3")

    assert code == 0, err
    status = orjson.loads(out)
    assert status["counts"] == {"running": 0, "completed": 5, "failed": 2}
    assert status["workflows"]["buy"] == {"started": 7, "completed": 5, "failed": 2}
    assert status["services"]["store"] == {"sent": 7, "ok": 7}
    assert status["services"]["bank"] == {"sent": 7, "ok": 5, "rejected": 2}
    assert len(status["recent"]) == 3
    assert {r["workflow"] for r in status["recent"]} == {"buy"}
    finished = {r.workflow_id for r in results}
    assert {r["workflow_id"] for r in status["recent"]} <= finished


async def test_submit_wait_prints_the_result(make_system: Any) -> None:
    system = await make_system(
        {"name": "hello", "steps": [{"id": "a", "service": "s", "action": "a"}]}
    )
    await system.worker("s", {"a": echo})
    await system.mediator()

    code, out, err = await cli(system.settings, "submit", "hello", '{"who": "you"}', "--wait")

    assert code == 0, err
    result = orjson.loads(out)
    assert result["status"] == "completed"
    assert result["output"] == {"a": {"step": "a", "input": {"who": "you"}}}


async def test_bad_input_is_one_line_and_exit_code_2(settings: Settings, tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - {id: a, service: s, action: a, depends_on: [b]}\n")
    for args, expected in [
        (("submit", "w", "{nope"), "payload is not valid JSON"),
        (("submit", "w", "[1, 2]"), "payload must be a JSON object"),
        (("validate", str(bad)), "depends on unknown step 'b'"),
        (("run",), "no workflows configured"),
    ]:
        code, out, err = await cli(settings, *args)
        assert code == 2, (args, out, err)
        assert expected in err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


async def test_schemas_prints_every_event() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "schemas", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    schemas = orjson.loads(out)
    assert set(schemas) == {
        "RequestEvent",
        "CommandEvent",
        "ReplyEvent",
        "ControlEvent",
        "ResultEvent",
        "HealthEvent",
        "MarkEvent",
        "DeadLetter",
        "TransitionEvent",
        "AlertEvent",
    }
    command = schemas["CommandEvent"]["properties"]
    assert "idempotency_key" in command and "round" in command["idempotency_key"]["description"]
    assert "request_id" in schemas["RequestEvent"]["required"]


async def test_status_reads_the_layout_from_meta_and_shows_stats(
    settings: Settings, redis_client: Redis
) -> None:
    # Laid out with 8 shards (as `mediator dev` may do) while the settings say 4: runs in
    # shards 4-7 are invisible to a reader that trusts the settings.
    keys = Keys(settings.redis.key_prefix, 8)
    await redis_client.hset(keys.meta, mapping={"shards": 8, "schema": 1})
    runs = [f"wf-run-{i}" for i in range(12)]
    assert {keys.shard_of(wid) for wid in runs} & {4, 5, 6, 7}
    for n, wid in enumerate(runs, start=1):
        shard = keys.shard_of(wid)
        await redis_client.hset(
            keys.workflow(wid), mapping={"workflow": "w", "status": "completed", "updated_ms": n}
        )
        await redis_client.zadd(keys.status_index(shard, "completed"), {wid: n})
        await redis_client.zadd(keys.recent(shard), {wid: n})
        await redis_client.hincrby(keys.counters(shard), "wf:w:completed", 1)
    await redis_client.hset(
        keys.stats,
        mapping={
            "dead_letters": 3,
            "dead_letters:invalid": 2,
            "dead_letters:too_large": 1,
            "replies:unknown_workflow": 5,
            "outbox:retried": 0,
        },
    )

    code, out, err = await cli(settings, "status", "--json", "--limit", "20")

    assert code == 0, err
    status = orjson.loads(out)
    assert status["shards"] == 8
    assert status["counts"] == {"running": 0, "completed": 12, "failed": 0}
    assert status["workflows"] == {"w": {"completed": 12}}
    assert [r["workflow_id"] for r in status["recent"]] == runs[::-1]
    assert status["stats"] == {
        "dead_letters": 3,
        "dead_letters:invalid": 2,
        "dead_letters:too_large": 1,
        "outbox:retried": 0,
        "replies:unknown_workflow": 5,
    }

    code, out, err = await cli(settings, "status")

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "running 0  completed 12  failed 0  outbox pending 0"
    assert lines[1] == (
        "dead letters 3 (invalid 2, too_large 1)  outbox (retried 0)  replies (unknown_workflow 5)"
    )


async def test_status_of_an_unused_prefix(settings: Settings) -> None:
    code, out, err = await cli(settings, "status")
    assert code == 0, err
    assert out.splitlines() == ["running 0  completed 0  failed 0  outbox pending 0"]
    code, out, err = await cli(settings, "status", "--json")
    assert code == 0, err
    status = orjson.loads(out)
    assert (status["stats"], status["recent"], status["shards"]) == ({}, [], 4)


async def test_unknown_log_level_is_one_line_and_exit_code_2(settings: Settings) -> None:
    for args, env in [
        (("run", "--log-level", "LOUD"), {}),
        (("demo-services",), {"MEDIATOR_LOG_LEVEL": "loud"}),
    ]:
        code, out, err = await cli(settings, *args, env=env)
        assert code == 2, (args, out, err)
        assert "unknown log level" in err and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in err
        assert len(err.strip().splitlines()) == 1, err


async def test_refused_idempotent_producer_says_what_to_set(settings: Settings) -> None:
    # The embedded broker (Tansu) rejects InitProducerId.
    idempotent = {"MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE": "true"}
    for args in (("submit", "w", "{}"), ("recover", "--since", "1m")):
        code, out, err = await cli(settings, *args, env=idempotent)
        assert code == 2, (args, out, err)
        assert "refused the idempotent producer" in err, err
        assert "MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE=false" in err
        assert len(err.strip().splitlines()) == 1, err
    # A long-running command logs what the libraries say first; its last line is the same.
    code, out, err = await cli(settings, "demo-services", "--log-level", "CRITICAL", env=idempotent)
    assert code == 2, (out, err)
    assert "MEDIATOR_KAFKA__ENABLE_IDEMPOTENCE=false" in err.strip().splitlines()[-1]


async def test_verbose_names_the_broker_and_redis_of_every_command(settings: Settings) -> None:
    """A CLI reading the wrong Redis is seen at once: `--verbose` names what it talks to."""
    where = f"talking to kafka {settings.kafka.bootstrap_servers}, redis "
    for args in (("status",), ("services",), ("workflows", "list"), ("dlq", "list")):
        code, _, err = await cli(settings, "--verbose", *args)
        assert code == 0, (args, err)
        assert where in err, (args, err)
        code, _, err = await cli(settings, *args)
        assert code == 0, (args, err)
        assert where not in err, (args, err)
