"""Operators' controls: authenticated, then a cancel or retry applied to its run, a
breaker reset or an instance drained."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import orjson

from mediator.clock import now_ms
from mediator.codec import encode
from mediator.core.expressions import ExpressionError
from mediator.core.signals import INBOX_TTL_MS
from mediator.runtime.context import (
    BatchOutput,
    Event,
    Record,
)
from mediator.runtime.requests import Requests
from topics.events import (
    ControlAction,
    ControlEvent,
)

__all__ = ["Controls"]


def _by_key(control: ControlEvent) -> bool:
    """Whether `control` goes by correlation key: a run's subscription, or a signal that
    names a key and no run."""
    if control.action is ControlAction.SUBSCRIBE:
        return True
    return control.action is ControlAction.SIGNAL and not control.workflow_id and bool(control.key)


log = logging.getLogger("mediator.runtime")


class Controls(Requests):
    """Applies operators' controls."""

    async def handle_controls(self, records: Sequence[Record]) -> None:
        """Apply operators' controls: a cancel or retry goes to its run like a reply; a
        breaker reset is applied to the shared breaker."""
        received = time.perf_counter()
        out = BatchOutput()
        groups: dict[str, list[Event]] = {}
        for record in records:
            control: ControlEvent | None = self._decode(record, ControlEvent, out)
            if control is None:
                continue
            if self.controls_signed:
                operator = self._operator(record, control, out)
                if operator is None:
                    continue
                control = control.model_copy(update={"operator": operator})
            self.stats.controls += 1
            log.info(
                "control %s: %s %s%s",
                control.control_id,
                control.action.value,
                control.workflow_id or control.service,
                f" by {control.operator}" if control.operator else "",
            )
            if control.action in (ControlAction.DRAIN, ControlAction.UNDRAIN):
                reason = await self._drain(control, out)
                if reason is None:
                    out.controls[control.control_id] = (
                        True,
                        f"instance {control.instance} of {control.service} "
                        f"{control.action.value}ed",
                    )
                    continue
            elif control.action is ControlAction.RESET_BREAKER:
                if control.service and self.breakers is not None:
                    await self.breakers.reset(control.service)
                    out.counts[f"breaker:{control.service}:reset"] += 1
                    out.controls[control.control_id] = (
                        True,
                        f"breaker of {control.service} closed",
                    )
                    continue
                reason = "reset_breaker needs `service`, and circuit breakers enabled"
            elif _by_key(control):
                reason = await self._correlate(control, out, groups)
                if reason is None:
                    continue
            elif control.workflow_id:
                groups.setdefault(control.workflow_id, []).append(control)
                continue
            else:
                reason = f"{control.action.value} needs `workflow_id`"
            out.controls[control.control_id] = (False, reason)
            self._dead_letter(record, reason, "invalid", out)
        await self._advance_groups(groups, out, received)

    async def handle_signals(self, records: Sequence[Record]) -> None:
        """Records of the signal sources (`signals.sources`): each one a signal to the run
        waiting on the correlation key its source computes from it. A record that gives no
        key is dead-lettered. Its id is its place in the topic, so one read again (a
        rebalance, a rewind) is applied once."""
        received = time.perf_counter()
        out = BatchOutput()
        groups: dict[str, list[Event]] = {}
        for record in records:
            control = self._source_signal(record, out)
            if control is None:
                continue
            self.stats.controls += 1
            reason = await self._correlate(control, out, groups)
            if reason is not None:
                self._dead_letter(record, reason, "invalid", out)
        await self._advance_groups(groups, out, received)

    def _source_signal(self, record: Record, out: BatchOutput) -> ControlEvent | None:
        """The signal one record of a source stands for; None (dead-lettered) when it is
        not JSON or gives no correlation key."""
        source = self.signal_sources.get(record.topic)
        if source is None:
            self._dead_letter(record, f"{record.topic} is no signal source", "invalid", out)
            return None
        try:
            value = orjson.loads(record.value or b"null")
        except orjson.JSONDecodeError as exc:
            self._dead_letter(
                record, f"signal source {record.topic}: not JSON: {exc}", "invalid", out
            )
            return None
        values = {
            "value": value,
            "key": record.key.decode(errors="replace") if record.key else None,
        }
        try:
            key = source.key.render(values)
            payload = source.payload.render(values) if source.payload is not None else value
        except ExpressionError as exc:
            key, payload = None, None
            problem = str(exc)
        else:
            problem = f"its key expression gave {key!r}, not a correlation key"
        if key is None or key == "" or isinstance(key, dict | list | bool):
            reason = f"signal source {record.topic}: {problem}"
            self._dead_letter(record, reason, "invalid", out)
            return None
        return ControlEvent(
            control_id=f"{record.topic}-{record.partition}-{record.offset}",
            action=ControlAction.SIGNAL,
            key=str(key),
            signal=source.event,
            payload=payload if isinstance(payload, dict) else {"value": payload},
            operator=f"topic:{record.topic}",
            issued_ms=now_ms(),
        )

    async def _correlate(
        self, control: ControlEvent, out: BatchOutput, groups: dict[str, list[Event]]
    ) -> str | None:
        """A signal sent by correlation key goes to the run subscribed to it, or is kept
        for the next; a run's subscription takes the signals kept for its key. Why it
        cannot be applied, or None."""
        event, key, wid = control.signal, control.key, control.workflow_id
        if not event or not key:
            return f"{control.action.value} by key needs `signal` and `key`"
        if self.correlations is None:
            return "signals by correlation key need the Redis store"
        if control.action is ControlAction.SUBSCRIBE:
            if not wid:
                return "subscribe needs `workflow_id`"
            kept = await self.correlations.subscribe(event, key, wid, INBOX_TTL_MS)
            for raw in kept:
                signal = ControlEvent.model_validate_json(raw)
                groups.setdefault(wid, []).append(signal.model_copy(update={"workflow_id": wid}))
            out.counts["signals:subscribed"] += 1
            out.controls[control.control_id] = (
                True,
                f"run {wid} waits for signal {event} key {key!r}; {len(kept)} kept handed over",
            )
            return None
        run = await self.correlations.route(event, key, encode(control))
        if run is None:
            out.counts["signals:kept_by_key"] += 1
            out.controls[control.control_id] = (
                True,
                f"kept: no run waits for signal {event} key {key!r} yet (the first that does "
                "takes it)",
            )
            return None
        groups.setdefault(run, []).append(control.model_copy(update={"workflow_id": run}))
        return None

    async def _drain(self, control: ControlEvent, out: BatchOutput) -> str | None:
        """Apply a drain or undrain; why it cannot be, if it cannot."""
        if not (control.service and control.instance):
            return f"{control.action.value} needs `service` and `instance`"
        if self.registry is None:
            return f"{control.action.value} needs discovery enabled"
        on = control.action is ControlAction.DRAIN
        status = await self.registry.drain(control.service, control.instance, on)
        if status is None:
            return f"no instance {control.instance!r} of {control.service!r} is registered"
        out.counts[f"instance:{control.service}:{control.action.value}ed"] += 1
        await self.registry.refresh([control.service])
        return None
