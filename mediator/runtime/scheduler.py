"""The scheduler: every replica looks at the loaded schedules every `schedules.poll_ms`
and fires the ticks that fell due, on Redis's clock.

A tick is fired as a request with an id derived from the schedule and the tick, published
*before* the schedule is moved on in Redis (a compare-and-set on the last tick seen). Two
replicas that look at once both publish the same request, and requests are idempotent by
id: one run. A replica that dies between publishing and moving on leaves the tick to the
next look, which publishes it again: still one run. So a tick is neither lost nor doubled
across replicas, restarts and clocks that disagree (only Redis's counts).

A tick whose payload cannot be rendered is skipped with an error logged and counted; a
round that fails otherwise (Redis or Kafka away) is retried with backoff, and its ticks
fire on the next look.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from mediator import codec
from mediator.core.expressions import ExpressionError
from mediator.core.schedules import Schedule, plan, request_id
from mediator.core.signing import Keyring
from mediator.runtime.periodic import Periodic
from mediator.settings import BackoffSettings, ScheduleSettings
from mediator.storage.keys import workflow_id_for
from mediator.storage.schedules import ScheduleState, ScheduleStates
from topics.events import ControlAction, ControlEvent, RequestEvent
from topics.names import Topics

__all__ = ["Scheduler"]

log = logging.getLogger("mediator.schedules")

#: Publishes one record and waits for the broker's acknowledgement.
Publish = Callable[[str, bytes, bytes, list[tuple[str, bytes]]], Awaitable[None]]
#: Whether a run is still going (not ended), or None when Redis has no such run (its
#: request not read yet, or refused): for `overlap`.
IsLive = Callable[[str], Awaitable[bool | None]]


class Scheduler(Periodic):
    """Fires the due ticks of the loaded schedules, round after round."""

    name = "scheduler"
    label = "schedules"
    failed = "schedules could not be fired"

    def __init__(
        self,
        states: ScheduleStates,
        schedules: Mapping[str, Schedule],
        topics: Topics,
        publish: Publish,
        is_live: IsLive,
        *,
        settings: ScheduleSettings | None = None,
        backoff: BackoffSettings | None = None,
        request_keys: Keyring | None = None,
        control_signer: tuple[str, Keyring] | None = None,
    ) -> None:
        super().__init__(backoff, log)
        self.states = states
        self.schedules = dict(schedules)
        self.topics = topics
        self.publish = publish
        self.is_live = is_live
        self.settings = settings or ScheduleSettings()
        self.request_keys = request_keys
        self.control_signer = control_signer
        #: Ticks this replica fired (published and moved on), skipped and left unrendered.
        self.fired = 0
        self.skipped = 0
        self.unrenderable = 0

    async def round(self) -> float:
        await self.look()
        return self.settings.poll_ms / 1000

    async def look(self) -> int:
        """Fire what fell due; how many ticks this look fired."""
        now = await self.states.now_ms()
        known = await self.states.read()
        fired = 0
        for name, schedule in self.schedules.items():
            state = known.get(name)
            if state is None or state.last_ms is None:
                await self.states.start(name, now)  # no tick before its first look fires
                continue
            fired += await self._look_at(schedule, state, now)
        return fired

    async def _look_at(self, schedule: Schedule, state: ScheduleState, now: int) -> int:
        assert state.last_ms is not None
        due = plan(schedule, state.last_ms, now, self.settings.grace_ms)
        if due.last_ms == state.last_ms:
            return 0
        fire = [] if state.paused else due.fire
        if fire and state.fired_ms is not None and schedule.overlap != "allow":
            previous = await self._live_previous(schedule, state, now)
            if previous is not None:
                if schedule.overlap == "skip":
                    log.info(
                        "schedule %s: tick %d skipped, run %s of an earlier tick is still going",
                        schedule.name,
                        fire[-1],
                        previous,
                    )
                    fire = []
                else:
                    await self._cancel(schedule, previous, fire[0], now)
        sent = [tick for tick in fire if await self._fire(schedule, tick, now)]
        last_fired = sent[-1] if sent else None
        if not await self.states.advance(schedule.name, state.last_ms, due.last_ms, last_fired):
            return 0  # another replica moved it on first; what this one published is the same
        self.fired += len(sent)
        self.skipped += len(due.fire) - len(sent) + due.skipped
        if due.skipped and not state.paused:
            log.warning(
                "schedule %s: %d missed ticks not fired (catch_up %s)",
                schedule.name,
                due.skipped,
                schedule.catch_up,
            )
        return len(sent)

    async def _live_previous(
        self, schedule: Schedule, state: ScheduleState, now: int
    ) -> str | None:
        """The run of an earlier fire still going, if any: of the last tick recorded as
        fired (or its request, published but not started yet, for up to
        `schedules.grace_ms`), or of the last tick seen (a replica that lost the
        compare-and-set may have published it)."""
        ticks = {t for t in (state.fired_ms, state.last_ms) if t is not None}
        for tick in sorted(ticks, reverse=True):
            run = workflow_id_for(request_id(schedule.name, tick))
            live = await self.is_live(run)
            if live:
                return run
            fired_lately = tick == state.fired_ms and now - tick <= self.settings.grace_ms
            if live is None and fired_lately:
                return run  # published, not read yet: it is about to run
        return None

    async def _fire(self, schedule: Schedule, tick: int, now: int) -> bool:
        """Publish the request of `tick`; False when its payload cannot be rendered."""
        try:
            payload = schedule.render(tick)
        except ExpressionError as exc:
            self.unrenderable += 1
            log.error("schedule %s: tick %d not fired: payload: %s", schedule.name, tick, exc)
            return False
        if not isinstance(payload, dict):
            self.unrenderable += 1
            log.error(
                "schedule %s: tick %d not fired: the payload renders to %s, not an object",
                schedule.name,
                tick,
                type(payload).__name__,
            )
            return False
        request = RequestEvent(
            request_id=request_id(schedule.name, tick),
            workflow=schedule.workflow,
            payload=payload,
            created_ms=now,
        )
        key = request.request_id.encode()
        value, headers = codec.record(request, self.topics.requests, key, self.request_keys)
        await self.publish(self.topics.requests, value, key, headers)
        log.info("schedule %s: tick %d fired as %s", schedule.name, tick, request.request_id)
        return True

    async def _cancel(self, schedule: Schedule, workflow_id: str, tick: int, now: int) -> None:
        """`overlap: cancel_previous`: cancel the run the previous tick started."""
        control = ControlEvent(
            control_id=f"schedule.{schedule.name}.{tick}.cancel",
            action=ControlAction.CANCEL,
            workflow_id=workflow_id,
            reason=f"schedule {schedule.name}: tick {tick} replaces it (overlap: cancel_previous)",
            issued_ms=now,
        )
        key, keys = workflow_id.encode(), None
        if self.control_signer is not None:
            operator, keys = self.control_signer
            control = control.model_copy(update={"operator": operator})
        value, headers = codec.record(control, self.topics.control, key, keys)
        await self.publish(self.topics.control, value, key, headers)
