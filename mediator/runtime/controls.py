"""Operators' controls: authenticated, then a cancel or retry applied to its run, a
breaker reset or an instance drained."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

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
            elif control.workflow_id:
                groups.setdefault(control.workflow_id, []).append(control)
                continue
            else:
                reason = f"{control.action.value} needs `workflow_id`"
            out.controls[control.control_id] = (False, reason)
            self._dead_letter(record, reason, "invalid", out)
        await self._advance_groups(groups, out, received)

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
