"""Concurrency keys at the commit: a run that starts (or reopens) under a workflow's
concurrency key gets one of the key's slots before its transition commits, or waits in
the key's queue; a run that ends frees its slot for the queue's head
(`mediator.core.concurrency`, `mediator.storage.slots`; the upkeep that repairs what a
crash left half done is `mediator.runtime.keyed`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mediator.core.engine import Transition
from mediator.core.state import WorkflowState
from mediator.core.workflow import Workflow
from mediator.runtime.commits import Commits
from mediator.storage.slots import slot_member, slot_score

__all__ = ["Admitting", "Freed"]

log = logging.getLogger("mediator.runtime")

#: A concurrency key of a workflow, with the limit of the version that used it.
_Key = tuple[str, str, int]
#: A slot a committed run gave up: its key, and the run as named in the key's sets.
Freed = tuple[_Key, str]


class Admitting(Commits):
    """Takes and frees concurrency keys' slots around commits."""

    async def _admit(
        self,
        items: Sequence[tuple[Workflow | None, Transition, WorkflowState | None]],
        now: int,
    ) -> set[str]:
        """Ask for a slot for each run a transition of the batch (re)starts queued (one
        script call per key): a run granted one is admitted in the same transition, the
        others wait in their key's queue. The runs granted a slot by this call (not
        holding one already): a start whose commit fails gives it back."""
        wanted: dict[_Key, list[tuple[str, int]]] = {}
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
            return set()
        granted, already = await self.slots.acquire_many(wanted, now)
        for member in granted | already:
            for workflow, transition in owners[member]:
                self.engine.admit(workflow, transition, now)
        return granted

    def _slots_freed(
        self, workflow: Workflow | None, base: WorkflowState | None, state: WorkflowState
    ) -> list[Freed]:
        """The slot (or queue place) the committed `state` gave up: the run ended."""
        if (
            workflow is None
            or workflow.concurrency is None
            or state.concurrency_key is None
            or not state.terminal
            or (base is not None and base.terminal)
        ):
            return []
        key = (workflow.name, state.concurrency_key, workflow.concurrency.limit)
        return [(key, slot_member(state.workflow_id, state.round))]

    async def _free_slots(self, freed: list[Freed], now: int) -> None:
        """Free the slots of runs that ended (one script call per key), handing them to
        their queues' heads. Not raised: the transitions are committed; a slot not freed
        now is freed by the upkeep, which finds its run ended."""
        if not freed or self.slots is None:
            return
        by_key: dict[_Key, list[str]] = {}
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
