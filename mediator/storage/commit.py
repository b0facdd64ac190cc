"""The commit protocol: what a transition commits, what came of it, and how both cross
to and from ``lua/commit.lua``.

A live run's hash holds its state's header (`dumps_header`) in ``state`` and each step in a
field ``s:<step id>``, so a transition writes what changed, not the whole run (a 100-step
chain would otherwise pay for its whole state on every reply); a finished run is written
afresh as one document (``state`` with its steps inside), the form every run had before,
which a run stored so keeps until its next commit writes it whole (`state_of` reads both).

One call of the script commits a batch of transitions of one shard. Its first arguments
are the time and the store's settings (JSON: retention, lease, the live statuses); then each
transition passes a header of named fields (JSON) followed by the bytes JSON cannot carry:
its state blob, one Kafka record frame per outbox id, its audit entries. Keys are named by
their number in KEYS (``*_key`` fields), so the script does no offset arithmetic over
variable-length sections, and it knows no status: Python says whether a run is `live` and
which finished index it joins.

Why JSON with the blobs beside it, rather than one msgpack array per transition (as
BullMQ's scripts take): the deterministic simulation runs this very script in fakeredis's
Lua, which has ``cjson`` but no ``cmsgpack``; and outbox frames are arbitrary bytes, which
JSON cannot carry, so they travel as plain arguments, as does the state blob (JSON already:
embedding it would cost an escape in Python and a copy in Lua). orjson (a dependency
already) writes the header; building it costs about what the flat list of some forty
positional arguments did, and hiredis then packs six arguments instead of those forty.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from mediator.core.counters import CounterKey
from mediator.core.state import StepState, WorkflowState, dumps, dumps_header, dumps_step, loads
from mediator.errors import CorruptState
from mediator.storage.connection import text
from mediator.storage.keys import Keys
from topics.events import TERMINAL, WorkflowStatus

__all__ = [
    "Commit",
    "CommitCodec",
    "CommitOutcome",
    "CommitResult",
    "Tombstone",
    "decode_state",
    "pairs",
    "state_of",
    "stored_whole",
]

# The numbers in KEYS of the finished indexes (the nine keys every call starts with).
_COMPLETED, _FAILED = 6, 7

#: The statuses of a live run (kept in the running index, never expiring): what the
#: script needs to tell whether the run it overwrites had finished (an operator's retry).
_LIVE = sorted(status.value for status in WorkflowStatus if status not in TERMINAL)
#: The index a finished run joins, by its status: `completed`, or `failed` for every
#: other end (failed, cancelled, compensation failed). A status not here is live.
_FINISHED_INDEX = {
    status: _COMPLETED if status is WorkflowStatus.COMPLETED else _FAILED for status in TERMINAL
}


class CommitOutcome(Enum):
    """What became of one commit."""

    COMMITTED = "committed"
    EXISTS = "exists"  # a create found the workflow already there (duplicate request)
    FINISHED = "finished"  # a create found the tombstone of a run whose state expired
    CONFLICT = "conflict"  # another writer committed first; reload and recompute


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is kept of a finished run after its state expired."""

    fingerprint: str
    origin: str
    status: str
    finished_ms: int


@dataclass(slots=True)
class Commit:
    """One transition to commit: the new state, frames for the outbox, counter deltas.

    Not frozen: one is built per transition, and a frozen dataclass's constructor sets
    each of its twelve fields through ``object.__setattr__`` (four times the cost). Nothing
    changes one once built."""

    state: WorkflowState
    expected_rev: int
    outbox: Sequence[tuple[str, bytes]] = ()
    counters: Mapping[CounterKey, int] = field(default_factory=dict)
    #: Timers to set: (name, delay ms from the commit, on Redis's clock).
    timers: Sequence[tuple[str, int]] = ()
    #: Timers removed with it: the one that fired, and those no longer needed.
    cleared: Sequence[str] = ()
    #: Changes to the parked queues (`mediator.core.parking`): ("+", service, unpark timer
    #: name) queues a step newly parked, ("-", ...) takes out one no longer parked.
    parked: Sequence[tuple[str, str, str]] = ()
    #: Changes to the shard's routed index: ("+" or "-", `mediator.core.routing` member).
    routed: Sequence[tuple[str, str]] = ()
    #: Entries appended to the run's audit log (`mediator.core.audit`).
    audit: Sequence[bytes] = ()
    #: The stamp of the revision it moves on from (`WorkflowState.stamp`, "" for a state
    #: written before stamps or a new run); None checks the revision number alone.
    expected_stamp: str | None = None
    #: The state it moves on from (the one stored at `expected_rev`): only the steps whose
    #: state differs from it are written. None: every step is written.
    base: WorkflowState | None = None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The outcome of a `Commit`, with the stored state when it did not commit.

    `lease` is the deadline (Redis clock, ms) of the outbox entries the commit wrote: the
    publisher's fencing token (see `Store.renew`).
    """

    outcome: CommitOutcome
    current: WorkflowState | None = None
    tombstone: Tombstone | None = None
    lease: int = 0
    #: The run is stored as one document (an earlier form): its next commit writes it whole.
    whole: bool = False


class CommitCodec:
    """Packs the calls of ``commit.lua`` for one key layout and its settings, and reads
    their replies (see the module docstring for the layout)."""

    def __init__(
        self,
        keys: Keys,
        *,
        retention_ms: int,
        recent_limit: int,
        lease_ms: int,
        tombstone_ms: int,
        audit_limit: int,
    ) -> None:
        self.keys = keys
        #: Entries kept in each run's audit stream (0: none written).
        self.audit_limit = audit_limit
        self._by_shard: dict[int, tuple[str, ...]] = {}
        # The same in every call: packed once.
        self._settings = orjson.dumps(
            {
                "retention_ms": retention_ms,
                "recent_limit": recent_limit,
                "lease_ms": lease_ms,
                "tombstone_ms": tombstone_ms,
                "audit_limit": audit_limit,
                "live": _LIVE,
            }
        )

    def _shard_keys(self, shard: int) -> tuple[str, ...]:
        """The keys of `shard` every call names first (built once per shard)."""
        found = self._by_shard.get(shard)
        if found is None:
            keys = self.keys
            found = self._by_shard[shard] = (
                keys.counters(shard),
                keys.outbox(shard),
                keys.outbox_due(shard),
                keys.recent(shard),
                keys.status_index(shard, "running"),
                keys.status_index(shard, "completed"),
                keys.status_index(shard, "failed"),
                keys.timers(shard),
                keys.routed(shard),
            )
        return found

    def pack(
        self,
        shard: int,
        commits: Sequence[Commit],
        now_ms: int,
        whole: Container[str] = (),
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one call committing `commits`, all of `shard`, in order; the
        runs in `whole` are written whole (their stored form is an earlier one)."""
        keys = self.keys
        key_list = list(self._shard_keys(shard))
        args: list[Any] = [now_ms, self._settings]
        names: dict[str, int] = {}  # workflow name -> the number of its name index in KEYS
        queues: dict[str, int] = {}  # service -> the number of its parked queue in KEYS
        for commit in commits:
            state = commit.state
            wid = state.workflow_id
            name_key = names.get(state.workflow)
            if name_key is None:
                key_list.append(keys.name_index(shard, state.workflow))
                name_key = names[state.workflow] = len(key_list)
            parked = []
            for op, service, timer in commit.parked:
                queue_key = queues.get(service)
                if queue_key is None:
                    # The queue, then its released hash (the script finds it next).
                    key_list += (keys.parked(shard, service), keys.released(shard, service))
                    queue_key = queues[service] = len(key_list) - 1
                parked.append((op, queue_key, timer))
            key_list += (keys.workflow(wid), keys.tombstone(wid), keys.audit(wid))
            run_key = len(key_list) - 2
            index_key = _FINISHED_INDEX.get(state.status, 0)
            audit = commit.audit if self.audit_limit else ()
            header = _header(commit, name_key, run_key, index_key, parked, len(audit))
            if state.status in TERMINAL:
                # A finished run is kept as one document, as runs always were: its hash
                # is written afresh (one whole write per run, not per step).
                header["compact"] = True
                args += (orjson.dumps(header), dumps(state))
                args += [frame for _, frame in commit.outbox]
                args += audit
                continue
            base = None if wid in whole else commit.base
            changed, gone, order = _step_changes(state, base)
            if changed:
                header["steps"] = [sid for sid, _ in changed]
            if base is None:
                header["whole"] = True
            if gone:
                header["gone"] = gone
            if order is not None:
                header["order"] = orjson.dumps(order).decode()
            args += (orjson.dumps(header), dumps_header(state))
            args += [frame for _, frame in commit.outbox]
            args += audit
            args += [dumps_step(step) for _, step in changed]
        return key_list, args

    @staticmethod
    def unpack(commits: Sequence[Commit], reply: Any) -> list[CommitResult]:
        """The results of the call that committed `commits`, in their order."""
        outcomes, lease = reply
        # Every commit the call made has the same outcome and lease: one result for all.
        committed = CommitResult(CommitOutcome.COMMITTED, lease=int(lease))
        return [
            committed if outcome[0] == 1 else _result(commit.state.workflow_id, outcome, int(lease))
            for commit, outcome in zip(commits, outcomes, strict=True)
        ]


def _header(
    commit: Commit,
    name_key: int,
    run_key: int,
    index_key: int,
    parked: list[tuple[str, int, str]],
    audits: int,
) -> dict[str, Any]:
    """The header of one transition in a call of the script (see ``commit.lua``)."""
    state = commit.state
    # Fields left out are empty (or false): the script reads them so, and a typical
    # header is half as long to write and to decode.
    header: dict[str, Any] = {
        "rev": commit.expected_rev,
        "stamp": state.stamp or "",
        "id": state.workflow_id,
        "workflow": state.workflow,
        "status": state.status,
        "name_key": name_key,
        "run_key": run_key,
    }
    if index_key == 0:
        header["live"] = True
    else:
        header["index_key"] = index_key
        header["fingerprint"] = state.fingerprint or ""
        header["origin"] = state.origin or ""
    if commit.outbox:
        header["outbox"] = [message_id for message_id, _ in commit.outbox]
    if commit.counters:
        # A counter becomes a hash field here, at the Redis boundary.
        header["counters"] = {str(name): delta for name, delta in commit.counters.items()}
    if commit.timers:
        header["timers"] = commit.timers
    if commit.cleared:
        header["cleared"] = commit.cleared
    if parked:
        header["parked"] = parked
    if commit.routed:
        header["routed"] = commit.routed
    if audits:
        header["audit"] = audits
    if commit.expected_stamp is not None:
        header["expected_stamp"] = commit.expected_stamp
    return header


def _step_changes(
    state: WorkflowState, base: WorkflowState | None
) -> tuple[list[tuple[str, StepState]], list[str], list[str] | None]:
    """The steps to write (all of them without a `base`; else those whose state object is
    not the base's: step states are replaced, never changed), the steps gone since the
    base, and the order of the steps when it is written (whole, or steps added or gone)."""
    steps = state.steps
    if base is None:
        return list(steps.items()), [], list(steps)
    before = base.steps
    changed = [(sid, step) for sid, step in steps.items() if before.get(sid) is not step]
    added = sum(1 for sid, _ in changed if sid not in before)
    if not added and len(steps) == len(before):
        return changed, [], None
    gone = [sid for sid in before if sid not in steps]
    return changed, gone, list(steps)


def _result(workflow_id: str, reply: Any, lease: int) -> CommitResult:
    code = int(reply[0])
    if code == 1:
        return CommitResult(CommitOutcome.COMMITTED, lease=lease)
    if code == 2:
        fingerprint, origin, status, finished = (text(v) for v in reply[1:5])
        tomb = Tombstone(fingerprint, origin, status, int(finished))
        return CommitResult(CommitOutcome.FINISHED, tombstone=tomb)
    fields = pairs(reply[1]) if len(reply) > 1 and reply[1] else {}
    current = state_of(workflow_id, fields)
    outcome = CommitOutcome.EXISTS if code == 0 else CommitOutcome.CONFLICT
    return CommitResult(outcome, current, whole=stored_whole(fields))


def pairs(flat: Any) -> dict[bytes, bytes]:
    """A hash's fields as HGETALL answers them (a flat list, or a map), as a dict."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


#: The run hash's field marking its state stored as a header and a field per step.
LAYOUT, STEPWISE = b"layout", b"2"
_STEP_PREFIX = b"s:"


def stored_whole(fields: Mapping[bytes, bytes]) -> bool:
    """Whether a run hash holds its state as one document (as stored before steps got
    fields of their own), so its next commit must write every step."""
    return b"state" in fields and fields.get(LAYOUT) != STEPWISE


def state_of(workflow_id: str, fields: Mapping[bytes, bytes]) -> WorkflowState | None:
    """The state a run hash (its fields, as HGETALL gives them) holds: None if none;
    `CorruptState` if it no longer decodes. Reads both forms: one document in ``state``,
    or (``layout`` 2) the header there, a field ``s:<step id>`` per step and their order
    in ``order``."""
    blob = fields.get(b"state")
    if blob is None:
        return None
    try:
        if fields.get(LAYOUT) != STEPWISE:
            return loads(blob)
        steps = {
            text(name[2:]): value for name, value in fields.items() if name[:2] == _STEP_PREFIX
        }
        order = fields.get(b"order")
        if order is not None:
            ordered = {sid: steps.pop(sid) for sid in orjson.loads(order) if sid in steps}
            steps = ordered | steps
        return loads(blob, steps)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptState(workflow_id, exc) from exc


def decode_state(workflow_id: str, blob: bytes | str) -> WorkflowState:
    """A state stored as one document as a `WorkflowState`; `CorruptState` if it no
    longer decodes."""
    try:
        return loads(blob)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptState(workflow_id, exc) from exc
