"""Operators' controls: publish a `ControlEvent` (cancel, retry, breaker reset, drain) to the
control topic, where one replica applies it through the ordinary commit path; and read
the breakers' shared state from Redis."""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from mediator.clock import now_ms
from mediator.codec import record
from mediator.core.signing import Keyring
from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection
from mediator.producers import new_producer, start_producer
from mediator.settings import SigningSettings
from mediator.storage.connection import text
from mediator.storage.keys import Keys
from topics.events import ControlAction, ControlEvent
from topics.names import Topics

__all__ = [
    "ControlSender",
    "breaker_states",
    "control_event",
    "control_signer",
    "send_control",
]


def control_signer(signing: SigningSettings) -> tuple[str, Keyring] | None:
    """Who a process with these `SigningSettings` sends controls as: None when controls go
    unsigned (signing or control checks off); `ConfigurationError` when they must be
    signed and no operator is configured to sign them."""
    if not signing.enabled or signing.controls == "off":
        return None
    signer = signing.control_signer()
    if signer is None:
        msg = (
            "controls must be signed by an operator: give this process an operator and "
            "its keys (signing.operator and signing.operators.<id>.keys, e.g. "
            "MEDIATOR_SIGNING__OPERATOR=alice and MEDIATOR_SIGNING__OPERATORS__ALICE__KEYS="
            "alice-1=<secret>)"
        )
        raise ConfigurationError(msg)
    return signer


def control_event(
    action: ControlAction,
    *,
    workflow_id: str | None = None,
    service: str | None = None,
    instance: str | None = None,
    reason: str | None = None,
    operator: str | None = None,
    pause_deadline: bool = False,
    signal: str | None = None,
    payload: dict[str, Any] | None = None,
    key: str | None = None,
) -> ControlEvent:
    """A control from the operator running this process (or `operator`)."""
    if operator is None:
        try:
            operator = getpass.getuser()
        except (KeyError, OSError):
            operator = None
    return ControlEvent(
        control_id=uuid.uuid4().hex,
        action=action,
        workflow_id=workflow_id,
        service=service,
        instance=instance,
        reason=reason,
        operator=operator,
        issued_ms=now_ms(),
        pause_deadline=pause_deadline,
        signal=signal,
        payload=payload,
        key=key,
    )


class ControlSender:
    """Publishes controls through one producer, kept open (the dashboard's)."""

    def __init__(
        self,
        bootstrap: str | KafkaConnection,
        topics: Topics,
        *,
        enable_idempotence: bool = True,
        signer: tuple[str, Keyring] | None = None,
    ) -> None:
        #: The operator controls are sent as, and their keys (None: unsigned controls).
        self.signer = signer
        self.bootstrap = bootstrap
        self.topics = topics
        self.enable_idempotence = enable_idempotence
        self.producer = new_producer(
            bootstrap, client_id="mediator-control", enable_idempotence=enable_idempotence
        )

    async def start(self) -> None:
        await start_producer(self.producer, self.bootstrap, self.enable_idempotence)

    async def stop(self) -> None:
        await self.producer.stop()

    async def send(self, control: ControlEvent) -> ControlEvent:
        """Publish one control and wait for the broker's acknowledgement; signed by this
        sender's operator, whose id it carries."""
        key = (control.workflow_id or control.key or control.service or control.control_id).encode()
        keys = None
        if self.signer is not None:
            operator, keys = self.signer
            control = control.model_copy(update={"operator": operator})
        value, extra = record(control, self.topics.control, key, keys)
        await self.producer.send_and_wait(self.topics.control, value, key=key, headers=extra)
        return control


async def send_control(
    bootstrap: str | KafkaConnection,
    topics: Topics,
    action: ControlAction,
    *,
    workflow_id: str | None = None,
    service: str | None = None,
    instance: str | None = None,
    reason: str | None = None,
    enable_idempotence: bool = True,
    signer: tuple[str, Keyring] | None = None,
) -> ControlEvent:
    """Publish one control and wait for the broker's acknowledgement; the event sent."""
    control = control_event(
        action, workflow_id=workflow_id, service=service, instance=instance, reason=reason
    )
    sender = ControlSender(bootstrap, topics, enable_idempotence=enable_idempotence, signer=signer)
    await sender.start()
    try:
        return await sender.send(control)
    finally:
        await sender.stop()


async def control_outcome(
    redis: Redis, keys: Keys, control_id: str, timeout_s: float
) -> dict[str, Any] | None:
    """What became of the control `control_id` (``{applied, detail, at_ms}``), as the
    replica that handled it recorded; None if none did within `timeout_s`."""
    return (await control_outcomes(redis, keys, [control_id], timeout_s)).get(control_id)


async def control_outcomes(
    redis: Redis, keys: Keys, control_ids: Sequence[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """What became of each of `control_ids`, by id, as the replicas recorded; those none
    recorded within `timeout_s` are left out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while True:
        for control_id in control_ids:
            if control_id not in found:
                outcome = await read_control_outcome(redis, keys, control_id)
                if outcome is not None:
                    found[control_id] = outcome
        if len(found) == len(control_ids) or asyncio.get_running_loop().time() >= deadline:
            return found
        await asyncio.sleep(0.1)


async def read_control_outcome(redis: Redis, keys: Keys, control_id: str) -> dict[str, Any] | None:
    """What became of the control `control_id`, if a replica has recorded it yet."""
    raw = await redis.get(keys.control(control_id))
    if raw is None:
        return None
    found: dict[str, Any] = orjson.loads(raw)
    return found


async def breaker_states(redis: Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every service's breaker as Redis holds it; a service known to the registry or that
    ever had a step parked, whose breaker never changed, is listed closed."""
    found: dict[str, dict[str, Any]] = {}
    known = {*await redis.smembers(keys.services), *await redis.smembers(keys.parked_services)}
    for service in sorted(text(s) for s in known):
        found[service] = {
            "state": "closed",
            "failures": 0,
            "opened_ms": None,
            "changed_ms": None,
            "by": None,
        }
    pattern = f"{keys.prefix}:breaker:*"
    async for raw_key in redis.scan_iter(match=pattern, count=500):
        key = text(raw_key)
        service = key.rsplit(":", 1)[-1].strip("{}")
        doc = {text(k): text(v) for k, v in (await redis.hgetall(key)).items()}
        found[service] = {
            "state": doc.get("state", "closed"),
            "failures": int(doc.get("counter", 0)),
            "opened_ms": int(doc.get("opened_ms", 0)) or None,
            "changed_ms": int(doc.get("changed_ms", 0)) or None,
            "by": doc.get("by") or None,
        }
    return dict(sorted(found.items()))
