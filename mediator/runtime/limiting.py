"""Flow control at the commit: a permit taken for each command to a limited service before
its transition commits (or the step queued), and the permits of answered commands freed
after (`mediator.storage.limits`; the queue's release loop is `mediator.runtime.flow`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from mediator.core.engine import Transition
from mediator.core.state import StepStatus, WorkflowState
from mediator.core.workflow import Workflow
from mediator.runtime.admission import Admitting, SlotKey, step_sends
from mediator.settings import ServiceLimit
from topics.events import CommandEvent, WorkflowStatus

__all__ = ["Limiting", "Permit", "Taken"]

#: A flow-control permit: its scope (a service, or `service@instance`) and command id.
Permit = tuple[str, str]


@dataclass
class Taken:
    """What a batch took before its commit: concurrency slots (member -> key, as
    `Admitting._admit` gives them), places in the keys' queues (member -> key, score) and
    flow-control permits no command held before."""

    slots: dict[str, SlotKey]
    queued: dict[str, tuple[SlotKey, int]] = field(default_factory=dict)
    permits: list[Permit] = field(default_factory=list)

    def add(self, other: Taken) -> None:
        self.slots.update(other.slots)
        self.queued.update(other.queued)
        self.permits += other.permits


log = logging.getLogger("mediator.runtime")


class Limiting(Admitting):
    """Takes and frees flow-control permits around commits."""

    async def _limit(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> list[Permit]:
        """Take a permit for each new step command to a limited service, for every
        transition of a batch at once (one script call per service per batch); a command
        that gets none waits in the service's queue (`queued`). Commands released from the
        queue go first. Compensations are never held; a step's attempt in a run being
        compensated (a retry that fell due in the batch that began the compensation) takes
        a permit too, and one refused is withdrawn (`Sends.hold`). The permits taken that
        no command held before (`_unclaimed_permits`)."""
        assert self.limiter is not None
        wanted: dict[str, tuple[list[str], list[str]]] = {}
        # A request read twice in one batch starts its run twice: both hold the command.
        owners: dict[str, list[tuple[Workflow, Transition]]] = {}
        for workflow, transition, base in items:
            if workflow is None:
                continue
            for command, _ in step_sends(transition):
                if command.service not in self.flow.services:
                    continue
                was = base.steps.get(command.step) if base is not None else None
                released = (
                    was is not None
                    and was.status is StepStatus.QUEUED
                    and was.attempt == command.attempt
                )
                pair = wanted.setdefault(command.service, ([], []))
                if command.command_id not in owners:
                    pair[0 if released else 1].append(command.command_id)
                owners.setdefault(command.command_id, []).append((workflow, transition))
        taken: list[Permit] = []
        for service, (released_ids, new_ids) in wanted.items():
            limit = self.flow.services[service]
            done = self._releases.pop(service, [])
            granted = await self.limiter.acquire(service, limit, released_ids, new_ids, now, done)
            taken += [(service, cid) for cid in granted.fresh]
            for command_id in [*released_ids, *new_ids]:
                if command_id not in granted:
                    for workflow, transition in owners[command_id]:
                        self.engine.hold(workflow, transition, command_id, now)
        return taken

    async def _limit_instances(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> list[Permit]:
        """After routing: take a permit of its instance for each command routed to an
        instance of a service with a per-instance limit (one script call per instance);
        a command refused one waits in the service's queue (its service permit given
        back), and the instance counts as full until the upkeep counts again. A command
        no instance could take (every one full) waits too. The permits taken that no
        command held before."""
        assert self.limiter is not None and self.router is not None
        router = self.router
        wanted: dict[tuple[str, str], list[str]] = {}
        owners: dict[str, list[tuple[Workflow, Transition]]] = {}
        held: list[tuple[str, str]] = []  # (service, command id)
        for workflow, transition, command in _per_instance_sends(items, self.flow.services):
            cid, service = command.command_id, command.service
            if command.instance is None:
                if router.saturated(service):
                    held.append((service, cid))
                    owners.setdefault(cid, []).append((workflow, transition))
                continue
            if cid not in owners:
                wanted.setdefault((service, command.instance), []).append(cid)
            owners.setdefault(cid, []).append((workflow, transition))
        scopes = list(wanted)
        grants = await asyncio.gather(
            *(
                self.limiter.acquire(
                    f"{service}@{instance}",
                    self.flow.services[service].instance_limit() or ServiceLimit(),
                    [],
                    wanted[(service, instance)],
                    now,
                )
                for service, instance in scopes
            )
        )
        taken: list[Permit] = []
        for (service, instance), granted in zip(scopes, grants, strict=True):
            taken += [(f"{service}@{instance}", cid) for cid in granted.fresh]
            refused = [cid for cid in wanted[(service, instance)] if cid not in granted]
            if refused:
                router.full.setdefault(service, set()).add(instance)
            held += [(service, cid) for cid in refused]
        for _, cid in held:
            for workflow, transition in owners[cid]:
                if transition.state.status is WorkflowStatus.RUNNING:
                    self.engine.queue(transition, cid)
                elif self.engine.withhold(workflow, transition, cid, now):
                    router.route(transition)  # the undos the compensation sent meanwhile
        await self._release_permits(held)
        return taken

    def _permits_done(
        self, workflow: Workflow | None, base: WorkflowState, state: WorkflowState
    ) -> list[Permit]:
        """(scope, command id) of each permit an attempt in flight in `base` held that
        `state` no longer holds: answered, timed out or given up."""
        if workflow is None:
            return []
        after = self._permits_held(workflow, state)
        return [p for p in self._permits_held(workflow, base) if p not in after]

    def _permits_held(self, workflow: Workflow | None, state: WorkflowState) -> list[Permit]:
        """(scope, command id) of the permits the attempts in flight in `state` hold: one
        of its service's limit, and one of its instance's under a per-instance limit."""
        held: list[Permit] = []
        limited = self.flow.services
        if workflow is None or not limited:
            return held
        for sid, step_state in state.steps.items():
            cid = step_state.command_id
            if step_state.status is not StepStatus.RUNNING or cid is None:
                continue
            step = workflow.steps.get(sid)
            service = step_state.via or (step.service if step is not None else "")
            if service not in limited:
                continue
            held.append((service, cid))
            if limited[service].per_instance is not None and step_state.instance:
                held.append((f"{service}@{step_state.instance}", cid))
        return held

    def _unclaimed_permits(
        self,
        taken: list[Permit],
        latest: Sequence[tuple[Workflow | None, WorkflowState | None]],
    ) -> list[Permit]:
        """The permits taken for a batch that no latest known state of their runs holds
        (what was committed, or what a lost compare-and-set found): their transition lost
        and its recomputation did without them, its command was queued after all, or it was
        routed to another instance. Given back at once rather than left to the release
        loop's audit (`FlowUpkeep._reap`), which would keep the room from others for a
        tenth of the lease."""
        if not taken:
            return []
        live: set[Permit] = set()
        for workflow, state in latest:
            if state is not None:
                live.update(self._permits_held(workflow, state))
        return [p for p in taken if p not in live]

    async def _release_permits(self, done: list[tuple[str, str]]) -> None:
        """Free the permits of answered commands: with the next permits taken for their
        service (one script call for both), or else in the background at once. Not waited
        for: the transitions are committed; a release lost is made good by the release
        loop (`FlowUpkeep._reap`) or the permit's lease."""
        if not done or self.limiter is None:
            return
        for service, command_id in done:
            self._releases.setdefault(service, []).append(command_id)
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.create_task(self._flush_releases())

    async def _flush_releases(self) -> None:
        """Release what no acquire took along (after the batch that produced them ends),
        and what later batches added while it was releasing, until nothing is left."""
        await asyncio.sleep(0)
        assert self.limiter is not None
        while self._releases:
            pending, self._releases = self._releases, {}
            for service, ids in pending.items():
                try:
                    await self.limiter.release(service, ids)
                except Exception as exc:
                    self.stats.permit_release_errors += 1
                    log.warning(
                        "flow control: %d permits of %s not released (they lapse in %d ms): %s",
                        len(ids),
                        service,
                        self.flow.lease_ms,
                        exc,
                    )


def _per_instance_sends(
    items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
    limits: dict[str, ServiceLimit],
) -> list[tuple[Workflow, Transition, CommandEvent]]:
    """The step commands to services with a per-instance limit (of runs running or being
    compensated: see `step_sends`)."""
    found = []
    for workflow, transition, _ in items:
        if workflow is None:
            continue
        for command, _ in step_sends(transition):
            limit = limits.get(command.service)
            if limit is not None and limit.per_instance is not None:
                found.append((workflow, transition, command))
    return found
