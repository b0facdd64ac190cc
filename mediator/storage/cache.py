"""A bounded LRU of workflow states this replica committed last.

The cache is only a hint: a commit still compares revisions in Redis, so a stale entry
costs one conflict and a recomputation, never a wrong transition. A reply that a cached
state would ignore is re-checked against Redis before it is dropped.
"""

from __future__ import annotations

from collections import OrderedDict

from mediator.core.state import WorkflowState

__all__ = ["StateCache"]


class StateCache:
    """Recently committed, unfinished workflow states by id."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._states: OrderedDict[str, WorkflowState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, workflow_id: str) -> WorkflowState | None:
        """The cached state, or None."""
        state = self._states.get(workflow_id)
        if state is None:
            self.misses += 1
        else:
            self.hits += 1
            self._states.move_to_end(workflow_id)
        return state

    def put(self, state: WorkflowState) -> None:
        """Remember `state` (a finished workflow is forgotten: nothing more will change)."""
        if state.terminal or self.size == 0:
            self._states.pop(state.workflow_id, None)
            return
        self._states[state.workflow_id] = state
        self._states.move_to_end(state.workflow_id)
        if len(self._states) > self.size:
            self._states.popitem(last=False)

    def forget(self, workflow_id: str) -> None:
        """Drop one entry."""
        self._states.pop(workflow_id, None)

    def __len__(self) -> int:
        return len(self._states)
