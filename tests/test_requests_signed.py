"""Signed requests (`signing.requests`), against the real broker and Redis: with
``required``, an unsigned request or one signed with a key no client has is refused (its
requester is told on the results topic) and starts nothing; a signed one runs and its run
and audit log name the client whose key signed it."""

from __future__ import annotations

from typing import Any

import orjson

from mediator.core.signing import Keyring
from mediator.sdk.client import MediatorClient
from mediator.settings import SigningSettings
from mediator.storage.keys import workflow_id_for
from tests.helpers import TEST_KEYS, TEST_OPERATORS, consume_all, produce, step
from tests.system import echo
from topics import RequestEvent, ResultEvent, WorkflowStatus

SHOP = "shop-1=shop-client-secret-0123456789"


async def test_with_requests_required_only_a_clients_signed_request_runs(
    make_system: Any,
) -> None:
    signing = SigningSettings.model_validate(
        {"keys": TEST_KEYS, "operators": TEST_OPERATORS, "clients": {"shop": {"keys": SHOP}},
         "requests": "required"}
    )  # fmt: skip
    system = await make_system({"name": "buy", "steps": [step("a")]}, signing=signing)
    await system.worker("svc", {"a": echo})
    mediator = await system.mediator()

    unsigned = RequestEvent(request_id="r-unsigned", workflow="buy")
    forged = RequestEvent(request_id="r-forged", workflow="buy")
    stranger = Keyring.parse("shop-1=not-the-shop-secret-01234")
    await produce(system.bootstrap, system.topics.requests,
                  [unsigned.model_dump_json().encode()], headers=[])  # fmt: skip
    value = forged.model_dump_json().encode()
    await produce(system.bootstrap, system.topics.requests, [value], [b"r-forged"],
                  headers=stranger.headers(value, system.topics.requests, b"r-forged"))  # fmt: skip
    refused = await consume_all(system.bootstrap, system.topics.results, count=2, timeout=30)
    by_id = {r.request_id: r for r in (ResultEvent.model_validate_json(x.value) for x in refused)}
    assert by_id["r-unsigned"].error is not None and by_id["r-unsigned"].error.code == "unsigned"
    assert by_id["r-forged"].error is not None
    assert by_id["r-forged"].error.code == "bad_signature"
    for rid in ("r-unsigned", "r-forged"):
        assert await mediator.store.load(workflow_id_for(rid)) is None

    client = MediatorClient(
        system.settings.kafka, topics=system.topics, enable_idempotence=False,
        fetch_max_wait_ms=5, keys=Keyring.parse(SHOP, service="shop"),
    )  # fmt: skip
    async with client:
        result = await client.submit("buy", {}, request_id="r-signed", timeout=30)
    assert result.status is WorkflowStatus.COMPLETED
    state = await mediator.store.load(workflow_id_for("r-signed"))
    assert state is not None and state.client == "shop"
    raw = await mediator.redis.xrange(mediator.store.keys.audit(workflow_id_for("r-signed")))
    first = orjson.loads(raw[0][1][b"e"])
    assert (first["event"], first["client"]) == ("request", "shop")


async def test_child_runs_are_signed_as_the_mediator_and_a_forged_parent_is_refused(
    make_system: Any,
) -> None:
    own = "med-1=mediator-client-secret-0123456"
    signing = SigningSettings.model_validate(
        {"keys": TEST_KEYS, "operators": TEST_OPERATORS,
         "clients": {"shop": {"keys": SHOP}, "mediator": {"keys": own}},
         "client": "mediator", "requests": "required"}
    )  # fmt: skip
    child = {"name": "child", "steps": [step("a")]}
    parent = {"name": "parent", "steps": [{"id": "sub", "workflow": "child", "timeout": "20s"}]}
    system = await make_system(child, parent, signing=signing)
    await system.worker("svc", {"a": echo})
    mediator = await system.mediator()
    client = MediatorClient(
        system.settings.kafka, topics=system.topics, enable_idempotence=False,
        fetch_max_wait_ms=5, keys=Keyring.parse(SHOP, service="shop"),
    )  # fmt: skip
    # A client's request claiming to be the child of a step is refused: it would answer
    # that step with whatever it says.
    wid = workflow_id_for("p-1")
    forged = RequestEvent.model_validate(
        {"request_id": f"{wid}.sub.1", "workflow": "child",
         "parent": {"workflow_id": wid, "step": "sub", "attempt": 1,
                    "command_id": f"{wid}.sub.1"}}
    )  # fmt: skip
    value, key = forged.model_dump_json().encode(), forged.request_id.encode()
    shop = Keyring.parse(SHOP, service="shop")
    await produce(system.bootstrap, system.topics.requests, [value], [key],
                  headers=shop.headers(value, system.topics.requests, key))  # fmt: skip
    [refused] = await consume_all(system.bootstrap, system.topics.results, count=1, timeout=30)
    result = ResultEvent.model_validate_json(refused.value)
    assert result.request_id == forged.request_id
    assert result.error is not None and result.error.code == "forbidden", result
    assert await mediator.store.load(workflow_id_for(forged.request_id)) is None
    async with client:
        done = await client.submit("parent", {}, request_id="p-1", timeout=30)
    assert done.status is WorkflowStatus.COMPLETED, done
    started = await mediator.store.load(workflow_id_for(forged.request_id))
    assert started is not None and started.client == "mediator"
    assert started.parent is not None and started.parent["workflow_id"] == wid
