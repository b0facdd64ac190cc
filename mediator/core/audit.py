"""The audit log of a run: one entry per event that changed it, saying what happened
(the event, its step, attempt and instance), what the run did about it (commands sent,
status after) and which replica committed it. Entries are compact JSON, appended to the
run's capped stream in the same commit as the transition, so the log never disagrees
with the state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from mediator.core.timers import Fired
from mediator.core.transition import SendCommand, Transition
from topics.events import ControlEvent, ReplyEvent, RequestEvent

__all__ = ["AuditEvent", "describe", "entries"]

AuditEvent = RequestEvent | ReplyEvent | Fired | ControlEvent | None


def describe(event: AuditEvent) -> dict[str, Any]:
    """The fields an event contributes to its audit entry."""
    if isinstance(event, RequestEvent):
        return {"event": "request", "request_id": event.request_id}
    if isinstance(event, ReplyEvent):
        doc: dict[str, Any] = {
            "event": "reply",
            "step": event.step,
            "attempt": event.attempt,
            "outcome": event.status.value,
        }
        if event.instance:
            doc["instance"] = event.instance
        if event.error is not None:
            doc["error"] = event.error.message
        return doc
    if isinstance(event, Fired):
        doc = {"event": event.kind}
        if event.step:
            doc.update(step=event.step, attempt=event.attempt)
        return doc
    if isinstance(event, ControlEvent):
        doc = {"event": f"control:{event.action.value}", "control_id": event.control_id}
        for name in ("operator", "reason"):
            if (value := getattr(event, name)) is not None:
                doc[name] = value
        return doc
    return {"event": "abandoned"}


def entries(
    events: Sequence[AuditEvent], transition: Transition, now_ms: int, replica: str
) -> list[bytes]:
    """The audit entries of one committed transition: one per event applied, the last
    carrying the commands the transition sends and the run's status after it."""
    state = transition.state
    out: list[bytes] = []
    for index, event in enumerate(events or [None]):
        doc = describe(event)
        if isinstance(event, RequestEvent) and state.client:
            doc["client"] = state.client  # whose key signed the request
        doc["t"] = now_ms
        doc["replica"] = replica
        if index == len(events or [None]) - 1:
            doc["status"] = state.status.value
            sent = [_sent(transition, e) for e in transition.effects if isinstance(e, SendCommand)]
            if sent:
                doc["sent"] = sent
            parked = [name.split("|")[2] for _, name in transition.parked]
            if parked:
                doc["parked"] = parked
        out.append(orjson.dumps(doc))
    return out


def _sent(transition: Transition, effect: SendCommand) -> dict[str, Any]:
    command = effect.command
    doc: dict[str, Any] = {
        "step": command.step,
        "attempt": command.attempt,
        "service": command.service,
    }
    step = transition.state.steps.get(command.step)
    if step is not None and step.attempt == command.attempt and step.instance:
        doc["instance"] = step.instance
    if effect.partition is not None:
        doc["partition"] = effect.partition
    return doc
