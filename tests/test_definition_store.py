"""Stored definitions against a real Redis: a run's plan outlives the file it started from."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mediator.core.workflow import Workflow, parse_workflows
from mediator.definitions import Definitions
from mediator.errors import (
    ConfigurationError,
    DefinitionConflict,
    StateUnavailable,
    UnknownWorkflow,
)
from mediator.storage.catalog import DefinitionStore
from mediator.storage.keys import Keys


def step(step_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "service": "svc", "action": "act", "depends_on": list(deps), **fields}


def workflow(*steps: dict[str, Any], name: str = "wf", **fields: Any) -> Workflow:
    [compiled] = parse_workflows({"name": name, "steps": list(steps), **fields})
    return compiled


#: A definition using every part of the schema that changes what the engine does.
RICH: dict[str, Any] = {
    "name": "order",
    "version": 3,
    "description": "every feature once",
    "timeout": "90s",
    "max_parallel": 2,
    "steps": [
        step("screen", input={"card": "payload.card", "fixed": [1, 2.5, True, None]}),
        step(
            "reserve",
            input={"sku": "payload.sku", "qty": "length(payload.items)"},
            timeout=2.5,
            retry={"max_attempts": 4, "backoff": "50ms", "max_backoff": "2s", "jitter": 0.0},
            compensate={"action": "release", "input": {"id": "steps.reserve.id"}},
        ),
        step("charge", "screen", "reserve", when="payload.amount > `10`", timeout="3s"),
        step("notify", "charge", service="mail", compensate={"action": "retract"}),
    ],
    "output": {"charged": "steps.charge", "n": "length(keys(steps))"},
}

CONTEXT = {
    "payload": {"card": "4242", "sku": "x1", "items": [1, 2, 3], "amount": 12},
    "steps": {"reserve": {"id": "r-1"}, "charge": {"ok": True}},
    "workflow": {"id": "wf-1", "request_id": "req-1", "name": "order"},
}


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix, 4)


def store_of(redis: Redis, keys: Keys, *workflows: Workflow) -> DefinitionStore:
    return DefinitionStore(redis, keys, Definitions(workflows))


async def test_a_replica_without_the_file_rebuilds_the_same_plan(
    redis_client: Redis, keys: Keys
) -> None:
    [original] = parse_workflows(RICH)
    await store_of(redis_client, keys, original).publish()

    after_deploy = store_of(redis_client, keys)  # the file is gone from this replica
    assert after_deploy.get_local("order", 3) is None
    rebuilt = await after_deploy.get("order", 3)

    assert rebuilt == original
    assert rebuilt.order == original.order
    assert rebuilt.steps == original.steps
    assert rebuilt.dependants == original.dependants
    assert (rebuilt.content_hash, rebuilt.spec_json) == (original.content_hash, original.spec_json)
    # Read once, then served from memory.
    assert after_deploy.get_local("order", 3) is rebuilt
    assert await after_deploy.get("order", 3) is rebuilt


async def test_the_round_trip_keeps_what_the_engine_follows(
    redis_client: Redis, keys: Keys
) -> None:
    [original] = parse_workflows(RICH)
    await store_of(redis_client, keys, original).publish()
    rebuilt = await store_of(redis_client, keys).get("order", 3)

    assert (rebuilt.max_parallel, rebuilt.timeout_ms, rebuilt.description) == (
        2,
        90_000,
        "every feature once",
    )
    assert rebuilt.output is not None
    assert rebuilt.output.render(CONTEXT) == {"charged": {"ok": True}, "n": 2}
    screen, reserve, charge, notify = (rebuilt.steps[s] for s in rebuilt.order)
    assert screen.input.render(CONTEXT) == {"card": "4242", "fixed": [1, 2.5, True, None]}
    assert reserve.input.render(CONTEXT) == {"sku": "x1", "qty": 3}
    assert reserve.timeout_ms == 2_500
    assert (reserve.retry.max_attempts, reserve.retry.backoff_ms) == (4, 50)
    assert (reserve.retry.max_backoff_ms, reserve.retry.jitter) == (2_000, 0.0)
    assert reserve.compensate is not None
    assert (reserve.compensate.service, reserve.compensate.action) == ("svc", "release")
    assert reserve.compensate.input.render(CONTEXT) == {"id": "r-1"}
    assert charge.depends_on == ("screen", "reserve") and charge.timeout_ms == 3_000
    assert charge.when is not None and charge.when.holds(CONTEXT)
    assert not charge.when.holds({**CONTEXT, "payload": {"amount": 5}})
    assert notify.service == "mail" and notify.compensate is not None
    assert notify.compensate.service == "mail"
    assert notify.compensate.input.render(CONTEXT) == CONTEXT["payload"]


async def test_the_stored_value_is_a_small_json_document(redis_client: Redis, keys: Keys) -> None:
    original = workflow(step("a"), name="pay")
    await store_of(redis_client, keys, original).publish()
    stored = await redis_client.get(keys.definition("pay", 1))
    assert stored is not None
    assert orjson.loads(stored) == {
        "content_hash": original.content_hash,
        "format": 1,
        "spec": orjson.loads(original.spec_json),
    }


async def test_publishing_the_same_content_again_is_fine(redis_client: Redis, keys: Keys) -> None:
    first = workflow(step("a"), step("b", "a"), name="pay")
    # Another replica's copy of the same file: same content, keys in another order.
    [same] = parse_workflows(
        {"steps": [step("a"), {"depends_on": ["a"], "action": "act", "service": "svc", "id": "b"}],
         "name": "pay"}
    )  # fmt: skip
    assert same.content_hash == first.content_hash
    await store_of(redis_client, keys, first).publish()
    await store_of(redis_client, keys, first).publish()
    await store_of(redis_client, keys, same).publish()


async def test_an_edited_file_under_the_same_version_is_refused(
    redis_client: Redis, keys: Keys
) -> None:
    deployed = workflow(step("a"), step("b", "a"), name="pay", version=2)
    await store_of(redis_client, keys, deployed).publish()
    stored_before = await redis_client.get(keys.definition("pay", 2))

    edited = workflow(step("a"), step("b", "a", timeout="1s"), name="pay", version=2)
    untouched = workflow(step("x"), name="ship")
    with pytest.raises(DefinitionConflict) as info:
        await store_of(redis_client, keys, untouched, edited).publish()

    err = info.value
    assert isinstance(err, ConfigurationError)
    assert (err.name, err.version) == ("pay", 2)
    assert (err.loaded_hash, err.stored_hash) == (edited.content_hash, deployed.content_hash)
    message = str(err)
    assert "workflow 'pay' version 2" in message
    assert edited.content_hash in message and deployed.content_hash in message
    assert message.endswith("bump `version` in the file to change a workflow")
    assert await redis_client.get(keys.definition("pay", 2)) == stored_before
    # A new version of the edited file is accepted, next to the old one.
    bumped = workflow(step("a"), step("b", "a", timeout="1s"), name="pay", version=3)
    await store_of(redis_client, keys, bumped).publish()
    assert (await store_of(redis_client, keys).get("pay", 2)) == deployed


async def test_get_of_a_version_nobody_published(redis_client: Redis, keys: Keys) -> None:
    store = store_of(redis_client, keys, workflow(step("a"), name="pay"))
    await store.publish()
    with pytest.raises(UnknownWorkflow) as info:
        await store.get("pay", 9)
    assert (info.value.name, info.value.version, info.value.known) == ("pay", 9, ["pay"])
    with pytest.raises(UnknownWorkflow):
        await store.get("refund", 1)


async def test_loaded_definitions_are_served_without_redis(redis_client: Redis, keys: Keys) -> None:
    loaded = workflow(step("a"), name="pay")
    store = store_of(redis_client, keys, loaded)  # never published
    assert store.get_local("pay", 1) is loaded
    assert await store.get("pay", 1) is loaded
    assert await store.get_many([("pay", 1)]) == {("pay", 1): loaded}


async def test_get_many_resolves_a_batch(redis_client: Redis, keys: Keys) -> None:
    old = [workflow(step("a"), name="pay", version=v) for v in (1, 2)]
    await store_of(redis_client, keys, *old).publish()
    current = workflow(step("a"), step("b", "a"), name="pay", version=3)
    store = store_of(redis_client, keys, current)

    wanted = [("pay", 3), ("pay", 1), ("nope", 1), ("pay", 2), ("pay", 1)]
    found = await store.get_many(wanted)

    assert found == {("pay", 3): current, ("pay", 1): old[0], ("pay", 2): old[1]}
    assert found["pay", 3] is current
    assert store.get_local("pay", 1) is found["pay", 1]
    assert await store.get_many([]) == {}


async def test_a_tampered_definition_is_refused_not_followed(
    redis_client: Redis, keys: Keys
) -> None:
    good, bad = workflow(step("a"), name="good"), workflow(step("a"), name="bad")
    await store_of(redis_client, keys, good, bad).publish()
    key = keys.definition("bad", 1)
    document = orjson.loads(await redis_client.get(key) or b"")
    document["spec"]["steps"][0]["action"] = "other"
    await redis_client.set(key, orjson.dumps(document))
    await redis_client.set(keys.definition("junk", 1), b"not json")

    store = store_of(redis_client, keys)
    with pytest.raises(StateUnavailable, match=r"bad@1 is unusable: its spec hashes to"):
        await store.get("bad", 1)
    with pytest.raises(StateUnavailable, match=r"junk@1 is unusable: not JSON.*Delete the key"):
        await store.get("junk", 1)
    # One bad key does not hold up a batch.
    found = await store.get_many([("good", 1), ("bad", 1), ("junk", 1)])
    assert found == {("good", 1): good}
    # Nor does it let a replica publish over it.
    with pytest.raises(StateUnavailable, match="junk@1"):
        await store_of(redis_client, keys, workflow(step("a"), name="junk")).publish()


async def test_the_memory_copy_is_bounded(redis_client: Redis, keys: Keys) -> None:
    published = [workflow(step("a"), name="pay", version=v) for v in (1, 2, 3)]
    await store_of(redis_client, keys, *published).publish()
    store = DefinitionStore(redis_client, keys, Definitions(), max_cached=2)
    await store.get_many([("pay", 1), ("pay", 2), ("pay", 3)])
    assert store.get_local("pay", 1) is None
    assert store.get_local("pay", 2) is not None and store.get_local("pay", 3) is not None


async def test_redis_errors_are_state_unavailable(keys: Keys) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        store = store_of(down, keys, workflow(step("a"), name="pay"))
        with pytest.raises(StateUnavailable, match=r"Redis unavailable while (publishing|reading)"):
            await store.publish()
        with pytest.raises(StateUnavailable, match=r"Redis unavailable while (publishing|reading)"):
            await store.get("pay", 7)
        with pytest.raises(StateUnavailable, match=r"Redis unavailable while (publishing|reading)"):
            await store.get_many([("pay", 7)])
    finally:
        await down.aclose()
