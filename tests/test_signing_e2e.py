"""Signed messages over the real broker and Redis: a reply or heartbeat not signed with a
service's key is never applied (dead-lettered with the reason, counted); per-service keys
hold each service to its own records; two keys at once let a key rotate; a deployment
without keys does not start."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mediator.core.signing import Keyring
from mediator.core.workflow import parse_workflows
from mediator.definitions import Definitions
from mediator.errors import ConfigurationError
from mediator.replica import Mediator
from mediator.sdk.worker import Worker
from mediator.settings import Settings, SigningSettings, settings_document
from mediator.storage.keys import workflow_id_for
from mediator.storage.registry import read_registry
from tests.helpers import (
    TEST_KEYRING,
    TEST_KEYS,
    cli,
    produce,
    records_on,
    step,
    wait_for,
    wait_for_letters,
)
from topics.events import (
    CommandEvent,
    HealthEvent,
    HealthStatus,
    ReplyEvent,
    ReplyStatus,
    WorkflowStatus,
)

ONE = {"name": "one", "steps": [step("a", "inventory", action="work", timeout="60s")]}
TWO = {
    "name": "two",
    "steps": [step("a", "inventory", action="work"), step("b", "payment", action="work")],
}
FORGER = Keyring.parse("forger=not-the-real-secret-0123456789")
INVENTORY = "inv-1=inventory-secret-0123456789"
PAYMENT = "pay-1=payment-secret-0123456789"


async def _command(system: Any, service: str) -> CommandEvent:
    """The first command published to `service`'s topic."""

    async def published() -> list[Any]:
        return await records_on(system.bootstrap, system.topics.service(service))

    [record] = await wait_for(published, timeout=10, what=f"a command to {service}")
    return CommandEvent.model_validate_json(record.value)


def _reply(command: CommandEvent, **fields: Any) -> bytes:
    values: dict[str, Any] = {"output": {"forged": True}} | fields
    reply = ReplyEvent(
        command_id=command.command_id, workflow_id=command.workflow_id, step=command.step,
        attempt=command.attempt, status=ReplyStatus.OK, **values,
    )  # fmt: skip
    return reply.model_dump_json(exclude_none=True).encode()


async def _send(system: Any, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    await produce(system.bootstrap, topic, [value], headers=headers)


async def test_a_forged_reply_or_heartbeat_is_never_applied(make_system: Any) -> None:
    system = await make_system(ONE)
    mediator = await system.mediator()
    client = await system.client()
    await client.publish("one", {}, request_id="r-1")
    command = await _command(system, "inventory")
    forged = _reply(command)

    # Unsigned, signed with a key the mediator does not know, and signed then altered.
    await _send(system, system.topics.replies, forged, [])
    await _send(
        system, system.topics.replies, forged, FORGER.headers(forged, system.topics.replies, None)
    )
    honest = _reply(command, output={"n": 1})
    await _send(
        system,
        system.topics.replies,
        forged,
        TEST_KEYRING.headers(honest, system.topics.replies, None),
    )
    beat = HealthEvent(service="inventory", instance="ghost", ts_ms=0, partitions=[0])
    value = beat.model_dump_json().encode()
    await _send(system, system.topics.health, value, [])
    await _send(
        system, system.topics.health, value, FORGER.headers(value, system.topics.health, None)
    )

    letters = [d for _, _, d in await wait_for_letters(system.settings, 5)]
    by_topic = sorted((d.source_topic, d.code) for d in letters)
    assert by_topic == sorted(
        [(system.topics.replies, "unsigned"), (system.topics.replies, "bad_signature"),
         (system.topics.replies, "bad_signature"), (system.topics.health, "unsigned"),
         (system.topics.health, "bad_signature")]
    )  # fmt: skip
    reasons = " | ".join(d.reason for d in letters)
    assert "not signed" in reasons and "'forger'" in reasons and "does not match" in reasons
    assert mediator.runtime.stats.bad_signatures == 5
    assert mediator.runtime.stats.replies == 0 and mediator.runtime.stats.heartbeats == 0
    state = await mediator.store.load(workflow_id_for("r-1"))
    assert state is not None and state.status is WorkflowStatus.RUNNING
    assert state.steps["a"].status.value == "running"
    registry = await read_registry(mediator.redis, mediator.store.keys)
    assert "ghost" not in {v.instance for v in registry.get("inventory", [])}
    code, out, _ = await cli(system.settings, "status", "--json")
    assert code == 0 and orjson.loads(out)["stats"]["bad_signatures"] == 5

    # The same reply signed with the service's key is applied.
    await _send(
        system,
        system.topics.replies,
        honest,
        TEST_KEYRING.headers(honest, system.topics.replies, None),
    )

    async def completed() -> bool:
        state = await mediator.store.load(workflow_id_for("r-1"))
        return state is not None and state.status is WorkflowStatus.COMPLETED

    await wait_for(completed, timeout=10, what="the honest reply to complete the run")


async def test_each_service_signs_with_its_own_keys(make_system: Any) -> None:
    """With per-service keys, a reply or heartbeat signed with another service's key is
    refused; each service's worker signs with its own, and both steps complete."""
    services = {"inventory": {"keys": INVENTORY}, "payment": {"keys": PAYMENT}}
    system = await make_system(TWO, signing=_signing(services=services))
    mediator = await system.mediator()
    client = await system.client()
    await client.publish("two", {}, request_id="r-1")
    command = await _command(system, "inventory")
    payment = Keyring.parse(PAYMENT)
    claimed = _reply(command, service="inventory")
    await _send(
        system,
        system.topics.replies,
        claimed,
        payment.headers(claimed, system.topics.replies, None),
    )
    beat = HealthEvent(service="inventory", instance="inv-x", ts_ms=0)
    value = beat.model_dump_json().encode()
    await _send(
        system, system.topics.health, value, payment.headers(value, system.topics.health, None)
    )
    letters = [d for _, _, d in await wait_for_letters(system.settings, 2)]
    assert sorted(d.reason.split(" signed with ")[0] for d in letters) == [
        "rejected: heartbeat of 'inventory'",
        "rejected: reply from 'inventory'",
    ]
    assert all("a key of 'payment'" in d.reason for d in letters)
    # Not naming a service, it counts as payment's: no answer to an inventory step.
    anonymous = _reply(command)
    await _send(
        system,
        system.topics.replies,
        anonymous,
        payment.headers(anonymous, system.topics.replies, None),
    )
    await wait_for(lambda: mediator.runtime.stats.ignored_replies >= 1, what="ignored")
    state = await mediator.store.load(workflow_id_for("r-1"))
    assert state is not None and state.steps["a"].status.value == "running"

    await system.worker("inventory", {"work": lambda data: {"by": "inventory"}})
    await system.worker("payment", {"work": lambda data: {"by": "payment"}})
    result = await client.submit("two", {}, request_id="r-2", timeout=20)
    assert result.status is WorkflowStatus.COMPLETED
    replies = await records_on(system.bootstrap, system.topics.replies)
    used = {dict(r.headers).get("mediator-key") for r in replies}
    assert {b"inv-1", b"pay-1"} <= used


@pytest.mark.slow
async def test_a_key_rotates_with_both_keys_active(make_system: Any) -> None:
    """Mid-rotation: the mediator signs with the new key and accepts both; one instance
    still signs with the old key, another already with the new; all work completes."""
    old, new = "old=the-old-secret-0123456789", "new=the-new-secret-0123456789"
    system = await make_system(ONE, signing=_signing(keys=f"{new},{old}", current="new"))
    await system.mediator()
    lagging = await system.worker(
        "inventory", {"work": lambda data: {}}, keys=Keyring.parse(f"{old},{new}"),
        instance="lagging",
    )  # fmt: skip
    rotated = await system.worker(
        "inventory", {"work": lambda data: {}}, keys=Keyring.parse(f"{new},{old}"),
        instance="rotated",
    )  # fmt: skip
    assert lagging.keys is not None and lagging.keys.current.id == "old"
    client = await system.client()
    mediator = system.mediators[0]

    async def both_own_partitions() -> bool:
        views = mediator.registry.instances("inventory")  # what the router sees
        return len([v for v in views if v.beat.get("partitions")]) == 2

    await wait_for(both_own_partitions, timeout=20, what="both instances to own partitions")
    # Side by side, so the balancer spreads them over both instances.
    results = await asyncio.gather(
        *(client.submit("one", {}, request_id=f"r{n}", timeout=20) for n in range(24))
    )
    assert all(result.status is WorkflowStatus.COMPLETED for result in results)
    commands = await records_on(system.bootstrap, system.topics.service("inventory"))
    assert {dict(r.headers)["mediator-key"] for r in commands} == {b"new"}
    replies = await records_on(system.bootstrap, system.topics.replies)
    signers = {(r.value and ReplyEvent.model_validate_json(r.value).instance,
                dict(r.headers)["mediator-key"]) for r in replies}  # fmt: skip
    assert ("lagging", b"old") in signers and ("rotated", b"new") in signers
    assert lagging.stats["bad_signatures"] == rotated.stats["bad_signatures"] == 0


def _signing(**signing: Any) -> SigningSettings:
    return SigningSettings.model_validate(signing)


async def test_without_keys_neither_the_mediator_nor_a_worker_starts(
    settings: Settings, tmp_path: Path
) -> None:
    definitions = Definitions(parse_workflows([ONE]))
    keyless = settings.model_copy(update={"signing": SigningSettings()})
    with pytest.raises(ConfigurationError, match=r"signing is on but no keys are set"):
        Mediator(keyless, definitions)
    partial = settings.model_copy(
        update={"signing": _signing(services={"payment": {"keys": PAYMENT}})}
    )
    with pytest.raises(ConfigurationError, match=r"no signing key for services inventory"):
        Mediator(partial, definitions)
    with pytest.raises(ConfigurationError, match=r"has no signing keys.*MEDIATOR_SIGNING__KEYS"):
        Worker("inventory", settings.kafka.bootstrap_servers)
    # From the command line: one line, exit code 2, no traceback.
    workflows = tmp_path / "one.yaml"
    workflows.write_text(yaml.safe_dump({"workflows": [ONE]}))
    config = tmp_path / "mediator.yaml"
    doc = settings_document(keyless)
    doc["workflows"] = [str(workflows)]
    config.write_text(yaml.safe_dump(doc))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEDIATOR_")},
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    stderr = err.decode()
    assert process.returncode == 2, stderr
    assert stderr.startswith("error: signing is on but no keys are set"), stderr
    assert "Traceback" not in stderr


async def test_a_shared_key_does_not_sign_for_a_service_with_keys_of_its_own(
    make_system: Any,
) -> None:
    """Shared keys sign only for services without keys of their own: a reply or a `down`
    heartbeat for inventory (which has its own keys) signed with the shared key is forged,
    whether it names the service or not; payment's, signed with the shared key, goes."""
    signing = _signing(keys=TEST_KEYS, services={"inventory": {"keys": INVENTORY}})
    system = await make_system(TWO, signing=signing)
    mediator = await system.mediator()
    inventory = Keyring.parse(INVENTORY)
    await _send_beat(system, "inv-1", HealthStatus.UP, inventory)
    await wait_for(lambda: mediator.runtime.stats.heartbeats >= 1, what="the heartbeat")
    client = await system.client()
    await client.publish("two", {}, request_id="r-1")
    command = await _command(system, "inventory")
    named, anonymous = _reply(command, service="inventory"), _reply(command)
    await _send(
        system,
        system.topics.replies,
        named,
        TEST_KEYRING.headers(named, system.topics.replies, None),
    )
    await _send(
        system,
        system.topics.replies,
        anonymous,
        TEST_KEYRING.headers(anonymous, system.topics.replies, None),
    )
    await _send_beat(system, "inv-1", HealthStatus.DOWN, TEST_KEYRING)
    letters = [d for _, _, d in await wait_for_letters(system.settings, 3)]
    assert sorted(d.source_topic for d in letters) == sorted(
        [system.topics.replies, system.topics.replies, system.topics.health]
    )
    assert all("shared key" in d.reason and "keys of its own" in d.reason for d in letters)
    state = await mediator.store.load(workflow_id_for("r-1"))
    assert state is not None and state.steps["a"].status.value == "running"
    registry = await read_registry(mediator.redis, mediator.store.keys)
    assert [v.status for v in registry["inventory"]] == ["up"]

    # Signed with its own key, the reply goes; payment (no keys of its own) signs with
    # the shared key.
    honest = _reply(command, service="inventory")
    await _send(
        system,
        system.topics.replies,
        honest,
        inventory.headers(honest, system.topics.replies, None),
    )
    payment = await _command(system, "payment")
    paid = _reply(payment)
    await _send(
        system, system.topics.replies, paid, TEST_KEYRING.headers(paid, system.topics.replies, None)
    )

    async def completed() -> bool:
        state = await mediator.store.load(workflow_id_for("r-1"))
        return state is not None and state.status is WorkflowStatus.COMPLETED

    await wait_for(completed, timeout=10, what="the run to complete")


async def _send_beat(system: Any, instance: str, status: HealthStatus, ring: Keyring) -> None:
    beat = HealthEvent(service="inventory", instance=instance, status=status, ts_ms=0,
                       partitions=[0], interval_ms=60_000)  # fmt: skip
    value = beat.model_dump_json().encode()
    await _send(
        system, system.topics.health, value, ring.headers(value, system.topics.health, None)
    )
