"""The services a simulation's workflows call: instances that heartbeat, take commands
from the partitions they own and reply, and a ledger of every effect they had.

A service here is well behaved, as the product asks of services: it remembers, durably,
every command it answered (by ``command_id``) and, when it is `keyed`, every step round it
did (by the command's ``idempotency_key``), and answers a repeat from memory without doing
the work again. So every effect in the ledger was asked for by the mediator as new work:
the invariants judge the mediator by it. What an attempt does (succeeds, fails retryably or
for good, or hangs) is drawn from the seed and the command id, so a seed replays exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from mediator.codec import encode
from topics.events import (
    CommandEvent,
    ErrorInfo,
    HealthEvent,
    HealthStatus,
    ReplyEvent,
    ReplyStatus,
)

__all__ = ["Effect", "Instance", "Life", "Service"]

#: Actions that undo another; the rest do new work.
UNDO_ACTIONS = frozenset({"refund", "release"})


class Life(Enum):
    """Where an instance stands, as only the simulation knows it."""

    ALIVE = "alive"
    #: Killed: silent from now on, its partitions still assigned until the group notices.
    CRASHED = "crashed"
    #: Left cleanly: said ``down``, left its group.
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class Effect:
    """One piece of work a service did (not a repeat answered from memory)."""

    service: str
    instance: str
    workflow_id: str
    step: str
    action: str
    command_id: str
    key: str
    at_ms: int

    @property
    def undo(self) -> bool:
        return self.action in UNDO_ACTIONS


@dataclass
class Service:
    """One service's durable memory of what it did."""

    name: str
    #: Deduplicates on the command's ``idempotency_key`` (when it carries one) as well as
    #: on its ``command_id``: effect-once across retries, as payment APIs are.
    keyed: bool
    heartbeats: bool
    answered: dict[str, bytes] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Instance:
    """One instance of a service."""

    service: Service
    id: str
    life: Life = Life.ALIVE
    next_beat_ms: int = 0
    interval_ms: int = 1000

    def heartbeat(self, partitions: list[int], now_ms: int, status: HealthStatus) -> bytes:
        return encode(
            HealthEvent(
                service=self.service.name, instance=self.id, status=status, load=0.0,
                capacity=8, partitions=partitions, interval_ms=self.interval_ms, ts_ms=now_ms,
            )
        )  # fmt: skip

    def take(
        self, command: CommandEvent, seed: int, now_ms: int
    ) -> tuple[bytes | None, Effect | None]:
        """Handle one command: its reply (None: the handler hangs, nothing is sent) and
        the effect it had (None: none, or a repeat answered from memory)."""
        service = self.service
        answered = service.answered.get(command.command_id)
        if answered is not None:
            return answered, None
        key = getattr(command, "idempotency_key", None) if service.keyed else None
        if key and key in service.done:
            reply = self._reply(command, now_ms, **service.done[key])
            service.answered[command.command_id] = reply
            return reply, None
        roll = zlib.crc32(f"{seed}:{command.command_id}".encode()) % 100
        undo = command.action in UNDO_ACTIONS
        if roll >= (95 if undo else 92):
            return None, None  # hangs: no reply, no effect; the step's timeout decides
        if roll >= (85 if undo else 82):
            outcome: dict[str, Any] = {"error": {"message": "busy", "code": "busy",
                                                 "retryable": True}}  # fmt: skip
        elif not undo and roll >= 77:
            outcome = {"error": {"message": "declined", "code": "declined"}}
        else:
            outcome = {"output": {"id": f"{command.action}-{command.command_id}"}}
        reply = self._reply(command, now_ms, **outcome)
        effect = None
        if "output" in outcome:
            effect = Effect(service.name, self.id, command.workflow_id, command.step,
                            command.action, command.command_id, key or command.command_id,
                            now_ms)  # fmt: skip
        retryable = outcome.get("error", {}).get("retryable", False)
        if not retryable:
            service.answered[command.command_id] = reply
            if key:
                service.done[key] = outcome
        return reply, effect

    def _reply(
        self,
        command: CommandEvent,
        now_ms: int,
        output: Any = None,
        error: dict[str, Any] | None = None,
    ) -> bytes:
        info = ErrorInfo(**error, step=command.step) if error is not None else None
        return encode(
            ReplyEvent(
                command_id=command.command_id, workflow_id=command.workflow_id,
                step=command.step, attempt=command.attempt,
                status=ReplyStatus.ERROR if info is not None else ReplyStatus.OK,
                output=output, error=info, service=self.service.name, instance=self.id,
                replied_ms=now_ms,
            )
        )  # fmt: skip


def decode_command(value: bytes | None) -> CommandEvent:
    return CommandEvent.model_validate(orjson.loads(value or b"{}"))
