"""Concurrency keys at the commit: a run that starts (or reopens) under a workflow's
concurrency key gets one of the key's slots before its transition commits, or waits in
the key's queue; a run that ends frees its slot for the queue's head
(`mediator.core.concurrency`, `mediator.storage.slots`; the upkeep that repairs what a
crash left half done is `mediator.runtime.keyed`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mediator import clock
from mediator.clock import now_ms
from mediator.core import concurrency
from mediator.core.engine import SendCommand, Transition
from mediator.core.state import StepState, StepStatus, WorkflowState
from mediator.core.tasks import cancel_and_wait
from mediator.core.workflow import Workflow
from mediator.errors import StateUnavailable
from mediator.runtime.commits import Commits
from mediator.storage.slots import slot_member, slot_score
from topics.events import CommandEvent, WorkflowStatus

__all__ = ["Admitting", "Freed", "Places", "SlotKey", "step_sends"]

log = logging.getLogger("mediator.runtime")

#: How long queue places Redis did not answer about right after a commit are asked for
#: again, in the background (s).
PLACE_RETRY_S = 60.0

#: The runs whose step attempts take their capacity (slots, permits) before they go.
_SENDING = frozenset({WorkflowStatus.RUNNING, WorkflowStatus.COMPENSATING})

#: A concurrency key of a workflow, with the limit of the version that used it.
SlotKey = tuple[str, str, int]
#: A slot a committed run gave up: its key, and the run as named in the key's sets.
Freed = tuple[SlotKey, str]
#: What a batch asked of the keys: the slots granted (member -> key), and the places in
#: the keys' queues taken (member -> key, score).
Places = tuple[dict[str, SlotKey], dict[str, tuple[SlotKey, int]]]


class Admitting(Commits):
    """Takes and frees concurrency keys' slots around commits."""

    async def _admit(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> Places:
        """Ask for a slot for each run a transition of the batch (re)starts queued (one
        round trip for every key): a run granted one is admitted in the same transition,
        the others wait in their key's queue. The runs granted a slot by this call (not
        holding one already), with their keys: a slot whose transition does not commit
        is given back (`_unclaimed`); and the runs queued, with their keys and scores
        (`_keep_queue_places`)."""
        wanted: dict[SlotKey, list[tuple[str, int]]] = {}
        # A request read twice in one batch (published again) starts the run twice.
        owners: dict[str, list[tuple[Workflow, Transition]]] = {}
        for workflow, transition, _ in items:
            state = transition.state
            key = transition.admission
            if workflow is None or workflow.concurrency is None or key is None:
                continue
            if state.queued_ms is None:
                continue
            member = slot_member(state.workflow_id, state.round)
            score = slot_score(state.priority or 0, state.queued_ms)
            wanted.setdefault((workflow.name, key, workflow.concurrency.limit), []).append(
                (member, score)
            )
            owners.setdefault(member, []).append((workflow, transition))
        if not wanted or self.slots is None:
            return {}, {}
        granted, already = await self.slots.acquire_many(wanted, now)
        for member in granted | already:
            for workflow, transition in owners[member]:
                self.engine.admit(workflow, transition, now)
        return _places(wanted, granted, already)

    async def _admit_steps(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> Places:
        """Ask for a slot of its step's concurrency key for each attempt a transition of
        the batch sends (one round trip for every key): an attempt that gets none waits,
        `queued`, in the key's queue; one that holds one already (released from the
        queue) goes. Compensations are never held; an attempt of a run being compensated
        (a retry that fell due in the batch that began the compensation) takes a slot too,
        and one that gets none is withdrawn (`Sends.hold`). The attempts granted a slot by
        this call, and those queued, as `_admit`'s."""
        wanted: dict[SlotKey, list[tuple[str, int]]] = {}
        owners: dict[str, list[tuple[Workflow, Transition]]] = {}
        for workflow, transition, _ in items:
            if workflow is None:
                continue
            score = slot_score(transition.state.priority or 0, now)
            for scope, cid in _keyed_sends(workflow, transition):
                if cid not in owners:
                    wanted.setdefault(scope, []).append((cid, score))
                owners.setdefault(cid, []).append((workflow, transition))
        if not wanted or self.slots is None:
            return {}, {}
        granted, already = await self.slots.acquire_many(wanted, now)
        for cid, holders in owners.items():
            if cid not in granted and cid not in already:
                for workflow, transition in holders:
                    self.engine.hold(workflow, transition, cid, now, by_key=True)
        return _places(wanted, granted, already)

    async def _keep_queue_places(
        self,
        queued: dict[str, tuple[SlotKey, int]],
        committed: Sequence[tuple[Workflow | None, WorkflowState]],
        now: int,
    ) -> None:
        """After the commit, ask again for the queue places of the runs (and attempts)
        this batch queued that still wait: a no-op (each is in its queue, or was handed a
        slot meanwhile) unless Redis lost the place between taking it and the commit (a
        failover that dropped its latest writes, the commit landing on the promoted
        replica). Nothing else would ever put it back, and the run would wait until its
        deadline, or for ever. A lost place is taken again at its first score, or, if a
        slot is free, the slot is (and its timer set, as a release sets it). Not raised:
        the transitions are committed."""
        if not queued or self.slots is None:
            return
        runs = {
            member: state.workflow_id
            for _, state in committed
            for member in concurrency.claims(state)
            if member in queued
        }
        wanted = {member: queued[member] for member in runs}
        if not wanted:
            return
        try:
            await self._take_places(wanted, now)
        except StateUnavailable as exc:
            log.warning(
                "could not check the queue places of %d runs or steps (trying again in "
                "the background): %s",
                len(wanted),
                exc,
            )
            task = asyncio.create_task(self._retake_places(wanted, runs))
            self._place_checks.add(task)
            task.add_done_callback(self._place_checks.discard)

    async def stop_place_checks(self) -> None:
        """Stop the queue places' checks still retrying (`_retake_places`): the replica is
        stopping; a place they would have restored waits for its run's deadline."""
        checks, self._place_checks = self._place_checks, set()
        for task in checks:
            if not task.done():
                log.warning("stopping with a queue places' check still retrying")
            await cancel_and_wait(task)

    async def _take_places(self, wanted: dict[str, tuple[SlotKey, int]], now: int) -> None:
        """Ask for the queue places `wanted` (member: its key and score); a member handed a
        free slot gets its timer."""
        assert self.slots is not None
        by_key: dict[SlotKey, list[tuple[str, int]]] = {}
        for member, (key, score) in wanted.items():
            by_key.setdefault(key, []).append((member, score))
        granted, _ = await self.slots.acquire_many(by_key, now)
        if granted:
            await self.slots.admit(granted)
            log.warning(
                "%d queued runs or steps had lost their place in their key's queue (a Redis "
                "failover that dropped writes?); a free slot was theirs: admitted",
                len(granted),
            )

    async def _retake_places(
        self, wanted: dict[str, tuple[SlotKey, int]], runs: dict[str, str]
    ) -> None:
        """`_take_places` for the places Redis did not answer about right after the
        commit, retried with capped backoff for as long as `PLACE_RETRY_S`, each time for
        the members their runs (as stored now) still claim. Given up (logged) past it:
        the run then waits for its deadline, or for an operator."""
        deadline = clock.monotonic() + PLACE_RETRY_S
        tries = 0
        while wanted:
            tries += 1
            await asyncio.sleep(min(0.25 * 2**tries, 10.0))
            try:
                states = await self.store.load_many(sorted(set(runs.values())))
                live = _claimed([(None, s) for s in states.values() if s is not None])
                wanted = {m: place for m, place in wanted.items() if m in live}
                if wanted:
                    await self._take_places(wanted, now_ms())
                return
            except Exception as exc:
                if not isinstance(exc, StateUnavailable) or clock.monotonic() > deadline:
                    log.error(
                        "gave up checking the queue places of %d runs or steps after %d tries: %s",
                        len(wanted),
                        tries,
                        exc,
                    )
                    return

    def _unclaimed(
        self,
        granted: dict[str, SlotKey],
        committed: Sequence[tuple[Workflow | None, WorkflowState]],
    ) -> list[Freed]:
        """The slots granted for transitions of a batch that no committed state holds:
        their transition lost to a conflict (and its recomputation did without them), or
        the run already existed. Given back at once rather than left to the upkeep."""
        if not granted:
            return []
        live = _claimed(committed)
        return [(key, member) for member, key in granted.items() if member not in live]

    def _slots_freed(
        self, workflow: Workflow | None, base: WorkflowState | None, state: WorkflowState
    ) -> list[Freed]:
        """The slots (or queue places) `base` claimed that the committed `state` no
        longer does (`concurrency.claims`): the run's, once it ended; a keyed step
        attempt's, once it is no longer in flight or waiting to be. (A start that ends at
        once gives its fresh slot back through `_unclaimed`.)"""
        if workflow is None or base is None:
            return []
        if workflow.concurrency is None and not workflow.keyed_steps:
            return []  # nothing to claim: no work on the hot path of unkeyed workflows
        before, after = concurrency.claims(base), concurrency.claims(state)
        return [
            ((scope, key, _limit(workflow, scope)), member)
            for member, (scope, key) in before.items()
            if member not in after
        ]

    async def _free_slots(self, freed: list[Freed], now: int) -> None:
        """Free the slots of runs that ended (one script call per key), handing them to
        their queues' heads. Not raised: the transitions are committed; a slot not freed
        now is freed by the upkeep, which finds its run ended."""
        if not freed or self.slots is None:
            return
        by_key: dict[SlotKey, list[str]] = {}
        for which, member in freed:
            by_key.setdefault(which, []).append(member)
        try:
            admitted = await self.slots.release_many(by_key, now)
        except Exception as exc:
            self.stats.slot_release_errors += 1
            log.warning(
                "concurrency keys: %d slots not freed now (the upkeep will): %s", len(freed), exc
            )
            return
        self.stats.admitted += len(admitted)


def _claimed(committed: Sequence[tuple[Workflow | None, WorkflowState]]) -> set[str]:
    """The slots and queue places the committed states claim, by member."""
    live: set[str] = set()
    for _, state in committed:
        live |= concurrency.claims(state).keys()
    return live


def _places(
    wanted: dict[SlotKey, list[tuple[str, int]]], granted: set[str], already: set[str]
) -> Places:
    """The key each member of `granted` was granted a slot of; and the key and score of
    each member queued (neither granted nor holding one already)."""
    slots: dict[str, SlotKey] = {}
    queued: dict[str, tuple[SlotKey, int]] = {}
    for key, runs in wanted.items():
        for member, score in runs:
            if member in granted:
                slots[member] = key
            elif member not in already:
                queued[member] = (key, score)
    return slots, queued


def _limit(workflow: Workflow, scope: str) -> int:
    """The limit of the concurrency key of `scope` (the workflow's, or one step's)."""
    if scope == workflow.name:
        assert workflow.concurrency is not None
        return workflow.concurrency.limit
    step = workflow.steps[scope[len(workflow.name) + 1 :]].concurrency
    assert step is not None
    return step.limit


def step_sends(transition: Transition) -> list[tuple[CommandEvent, StepState]]:
    """Each command `transition` sends for a step's current attempt, with the step's
    state, in a run running or being compensated (none for compensations, nor for steps
    the run's end gave up in the same transition)."""
    state = transition.state
    if state.status not in _SENDING:
        return []
    found = []
    for effect in transition.effects:
        if not isinstance(effect, SendCommand):
            continue
        command = effect.command
        step_state = state.steps.get(command.step)
        if step_state is None or step_state.command_id != command.command_id:
            continue  # a compensation's command
        if step_state.status is StepStatus.RUNNING:
            found.append((command, step_state))
    return found


def _keyed_sends(workflow: Workflow | None, transition: Transition) -> list[tuple[SlotKey, str]]:
    """(key, command id) of each attempt of a keyed step `transition` sends."""
    if workflow is None or not workflow.keyed_steps:
        return []
    found = []
    for command, step_state in step_sends(transition):
        step = workflow.steps.get(command.step)
        if step is None or step.concurrency is None or step_state.key is None:
            continue
        scope = f"{workflow.name}.{command.step}"
        found.append(((scope, step_state.key, step.concurrency.limit), command.command_id))
    return found
