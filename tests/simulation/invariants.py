"""What must hold after every seeded history, judged from what the world saw (the
services' ledger of effects, the topics, the stored state), not from the mediator's own
accounting.

- ``results``: every request gets a result; each run publishes one result per round
  (distinct ``result_id``s at most one more than the retries operators asked for), and
  the last one says how the run ended.
- ``false death``: only an instance that really died is marked down or has its work
  handed on: not one whose heartbeats sat unread, not one that left cleanly.
- ``effects``: a service that deduplicates on idempotency keys does a step's work at most
  once per round of its run, whatever retries, reroutes and hand-ons happened.
- ``compensation``: every undo the results report was really done, once per round, by a
  service that did the work it undoes (or, for a step undone once attempted, that was
  sent an attempt: it may have done nothing); ``left standing``: in a run that failed or
  was cancelled, the work a step undone once attempted did in the run's last round was
  undone by the service that did it, however the step ended.
- ``leftovers``: nothing of a finished run stays behind: no timer, parked entry, released
  step's queue place, routed entry or outbox entry.
- ``revisions``: each run's revisions go up by one, commit after commit.
- ``stream``: the transition events published, folded as docs/events.md's projection
  folds them, say what Redis holds of every run (its status, its steps' and
  compensations' statuses and attempts).
- ``waits``: a live run has a timer (or a parked entry) for everything it waits on, so it
  cannot be stuck for ever; ``stuck``: every run ends.
- ``deadline``: a run fails for its deadline only once the deadline has passed.
- ``rounds``: no round of a replica raised an error (a poison entry must be isolated).
- ``signals``: a wait completes only with a payload signalled to its own run.
- ``children``: a child run's work stands only as the output of the parent step it
  answered; a child whose step the parent compensated was undone.
- ``paused``: a paused run sends nothing (no step, retry, reroute or undo) from its pause
  until it is resumed, commit after commit; a run that ended is not paused.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import orjson

from mediator.core.progress import idempotency_key
from mediator.core.routing import SEP
from mediator.core.saga import undo_key
from mediator.core.state import StepStatus, WorkflowState
from mediator.core.timers import SetTimer
from mediator.core.workflow import Workflow
from mediator.storage.connection import text
from mediator.storage.keys import concurrency_digest, workflow_id_for
from mediator.storage.slots import slot_member
from tests.simulation.services import Life
from topics.events import WorkflowStatus

if TYPE_CHECKING:
    from tests.simulation.world import World

__all__ = ["check_end", "check_waits"]


async def check_end(world: World, healed: bool) -> list[str]:
    """Every invariant, once the world has gone quiet (or failed to)."""
    states = await world.states()
    problems = [f"rounds: {error}" for error in world.errors]
    if not healed:
        live = {wid: s.status.value if s else "missing" for wid, s in states.items()
                if s is None or not s.terminal}  # fmt: skip
        problems.append(f"stuck: runs never ended: {live}")
    results = _results(world)
    problems += _check_deaths(world)
    if world.failovers:
        # A lossy failover rolls runs back: a round that had ended ends again (a second
        # result, its compensations reported twice) and revisions are counted again. What
        # must still hold: no run stuck once `recover` ran, no work done twice for a step
        # round, nothing left behind. (`redis.wait_replicas` rules the loss out.)
        problems += [p for p in _check_effects(world, results) if "results report" not in p]
    else:
        problems += _check_results(world, states, results)
        problems += _check_effects(world, results)
        problems += _check_left_standing(world, states)
        problems += _check_revisions(world)
    problems += _check_deadlines(states)
    problems += await _check_leftovers(world, states)
    if not world.failovers:  # a lossy failover rolls back what the watch saw committed
        problems += world.pauses.problems
    problems += _check_signals(world, states)
    if not world.failovers:  # a lossy failover rolls a parent back past its child's reply
        problems += _check_children(world, states)
    if not world.failovers:  # a lossy failover rolls back revisions the stream reported
        problems += _check_stream(world, states)
    problems += [f"paused: {wid} ended {s.status.value} but is still paused"
                 for wid, s in states.items() if s and s.terminal and s.paused_ms]  # fmt: skip
    return problems


def _check_children(world: World, states: dict[str, WorkflowState | None]) -> list[str]:
    """A child run's work stands only as the output of the parent step it answered: a
    completed child completed that step (with its output) and was not reported undone; a
    step that completed with a child whose parent later compensated it left the child
    undone (``cancelled``, code ``compensated``)."""
    problems = []
    for wid, ref in sorted(world.children().items()):
        child, parent = states.get(wid), states.get(ref["workflow_id"])
        if child is None or parent is None or not parent.terminal:
            continue
        step = parent.steps.get(ref["step"])
        took = step is not None and step.command_id == ref["command_id"]
        took = took and step is not None and step.status is StepStatus.COMPLETED
        undo = (parent.compensations or {}).get(ref["step"]) if took else None
        if child.status is WorkflowStatus.COMPLETED:
            if not took:
                problems.append(
                    f"children: {wid} completed, but {ref['workflow_id']} did not take its "
                    f"output (step {ref['step']} is {step.status.value if step else None}): "
                    "its work stands for nothing"
                )
            elif undo is not None and undo.status is StepStatus.COMPLETED:
                problems.append(f"children: {wid} reported undone, but it completed")
            elif step is not None and step.output != child.output:
                problems.append(f"children: {wid} output {child.output} != {step.output}")
        elif took and undo is not None and undo.status is StepStatus.COMPLETED:
            code = (child.error or {}).get("code")
            if child.status is not WorkflowStatus.CANCELLED or code != "compensated":
                problems.append(
                    f"children: {wid} reported undone by {ref['workflow_id']}, but it ended "
                    f"{child.status.value} ({code})"
                )
    return problems


def _check_signals(world: World, states: dict[str, WorkflowState | None]) -> list[str]:
    """A wait completes only with a payload signalled to its own run."""
    problems = []
    for wid, state in states.items():
        step = state.steps.get("approve") if state is not None else None
        if step is None or step.status is not StepStatus.COMPLETED:
            continue
        if step.output not in world.issued.signals.get(wid, []):
            problems.append(f"signals: {wid} approved with {step.output}, never signalled to it")
    return problems


def _results(world: World) -> dict[str, dict[str, dict[str, Any]]]:
    """Per workflow id, each distinct result (by ``result_id``), as published."""
    found: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in world.log.records(world.topics.results):
        result = orjson.loads(record.value or b"{}")
        wid = result.get("workflow_id") or workflow_id_for(result["request_id"])
        found[wid].setdefault(result["result_id"], result)
    return found


def _check_results(
    world: World,
    states: dict[str, WorkflowState | None],
    results: dict[str, dict[str, dict[str, Any]]],
) -> list[str]:
    problems = []
    for request_id in sorted(world.issued.requests):
        wid = workflow_id_for(request_id)
        published = results.get(wid, {})
        state = states.get(wid)
        if not published:
            problems.append(f"results: {request_id} ({wid}) got no result")
            continue
        allowed = 1 + world.issued.retries[wid]
        if len(published) > allowed:
            problems.append(
                f"results: {wid} published {len(published)} distinct results "
                f"({sorted(published)}) with {allowed - 1} retries asked for"
            )
        last = list(published.values())[-1]
        if state is not None and last["status"] != state.status.value:
            problems.append(
                f"results: {wid} ended {state.status.value} but its last result says "
                f"{last['status']}"
            )
    return problems


def _check_deaths(world: World) -> list[str]:
    life = {i.id: i.life for i in world.instances}
    # A lossy failover can lose an instance's leaving (its `down` heartbeat, read and
    # recorded before): then it goes silent while the registry holds it up, and it is
    # marked down, which it is. Only a live instance must never be.
    gone = {Life.CRASHED, Life.LEFT} if world.failovers else {Life.CRASHED}
    problems = []
    for service, instance, at_ms in world.deaths:
        if life.get(instance) not in gone:
            problems.append(
                f"false death: {instance} of {service} marked down at "
                f"{at_ms - 1_800_000_000_000} while {life.get(instance, 'unknown')}"
            )
    for replica, service, instance, moved in world.hand_ons:
        if moved and life.get(instance) not in gone:
            problems.append(
                f"false death: {replica} handed on {moved} commands of {instance} of "
                f"{service}, which is {life[instance].value}"
            )
    return problems


def _check_effects(world: World, results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    problems = []
    keyed = {name for name, service in world.services.items() if service.keyed}
    work: Counter[tuple[str, str, str]] = Counter()
    undone: Counter[tuple[str, str]] = Counter()
    did: dict[tuple[str, str], set[str]] = defaultdict(set)
    attempted = {(wid, sid) for wid, published in results.items() for result in published.values()
                 for sid in world.definitions.get(result["workflow"]).undo_attempts}  # fmt: skip
    for effect in world.effects:
        slot = (effect.workflow_id, effect.step)
        if effect.undo:
            undone[slot] += 1
            if effect.service not in did[slot] and slot not in attempted:
                problems.append(
                    f"compensation: {effect.command_id} undone by {effect.service}, but the "
                    f"work was done by {sorted(did[slot])}"
                )
        else:
            did[slot].add(effect.service)
            if effect.service in keyed:
                work[(*slot, effect.service)] += 1
    for (wid, step, service), count in sorted(work.items()):
        rounds = len(results.get(wid, {})) or 1
        if count > rounds:
            commands = [e.command_id for e in world.effects
                        if (e.workflow_id, e.step, e.service) == (wid, step, service)
                        and not e.undo]  # fmt: skip
            problems.append(
                f"effects: {service} did the work of step {step} of {wid} {count} times in "
                f"{rounds} round(s): {commands}"
            )
    return problems + _check_undone(world, results, undone)


def _check_left_standing(world: World, states: dict[str, WorkflowState | None]) -> list[str]:
    """In a run that ended failed or cancelled, every piece of work a step undone once
    attempted (`after: attempted`) did in the run's last round was undone by its service."""
    compensated = (WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)
    ended = {wid: s for wid, s in states.items() if s is not None and s.status in compensated}
    undone = {(e.service, e.key) for e in world.effects if e.undo}
    problems = []
    for effect in world.effects:
        state = ended.get(effect.workflow_id)
        if (
            effect.undo
            or state is None
            or effect.key != idempotency_key(effect.workflow_id, effect.step, state.round)
        ):
            continue
        if effect.step not in world.definitions.get(state.workflow).undo_attempts:
            continue
        # Its undo's key names the service whose work it undoes when there were several.
        keys = [undo_key(effect.workflow_id, effect.step, state.round, at)
                for at in (None, effect.service)]  # fmt: skip
        if not any((effect.service, key) in undone for key in keys):
            forward = state.steps[effect.step]
            problems.append(
                f"left standing: {effect.service} did {effect.command_id} of {effect.workflow_id} "
                f"(the step ended {forward.status.value}, attempt {forward.attempt}), which "
                f"ended {state.status.value} without undoing it"
            )
    return problems


def _check_undone(
    world: World, results: dict[str, dict[str, dict[str, Any]]], undone: Counter[tuple[str, str]]
) -> list[str]:
    problems = []
    reported: Counter[tuple[str, str]] = Counter()
    for wid, published in results.items():
        for result in published.values():
            steps = world.definitions.get(result["workflow"]).steps
            for step, undo in (result.get("compensations") or {}).items():
                if steps[step].child is not None:
                    continue  # undone by the child run's own steps (`children`)
                if undo.get("status") == StepStatus.COMPLETED.value:
                    # Work done at a step's service and its fallback is undone at each in
                    # turn: an earlier attempt that ended without an error completed too.
                    earlier = [h for h in undo.get("history") or () if not h.get("error")]
                    reported[(wid, step)] += 1 + len(earlier)
    for slot in sorted(set(reported) | set(undone)):
        if reported[slot] != undone[slot]:
            wid, step = slot
            problems.append(
                f"compensation: step {step} of {wid}: results report {reported[slot]} "
                f"compensations done, the services did {undone[slot]}"
            )
    return problems


def _check_stream(world: World, states: dict[str, WorkflowState | None]) -> list[str]:
    """The transition events published, folded as docs/events.md's projection folds them
    (for the run and for each step and compensation, what its highest revision's event
    says), say what Redis holds: every run's status and every step's and compensation's
    status and attempt."""
    runs = _fold_stream(world)
    problems = []
    for wid, state in sorted(states.items()):
        if state is None:
            continue
        run = runs.get(wid)
        if run is None:
            problems.append(f"stream: {wid} (rev {state.rev}) published no transition event")
            continue
        if run["status"] != state.status.value or run["rev"] > state.rev:
            problems.append(
                f"stream: {wid} is {state.status.value} at rev {state.rev}, its events say "
                f"{run['status']} at rev {run['rev']}"
            )
        for table, steps in (("steps", state.steps), ("undos", state.compensations or {})):
            for sid, step in steps.items():
                said = run[table].get(sid, (0,))[1:] or None
                if said is None and step.status is StepStatus.PENDING:
                    continue
                if said != (step.status.value, step.attempt or None):
                    problems.append(
                        f"stream: {wid} {table} {sid} is {step.status.value} attempt "
                        f"{step.attempt}, its events say {said}"
                    )
    return problems


def _fold_stream(world: World) -> dict[str, dict[str, Any]]:
    """Per run, what its published transition events say, folded by revision."""
    runs: dict[str, dict[str, Any]] = {}
    for record in world.log.records(world.topics.events):
        event = orjson.loads(record.value or b"")
        run = runs.setdefault(event["workflow_id"], {"rev": 0, "steps": {}, "undos": {}})
        if event["rev"] >= run["rev"]:
            run["rev"], run["status"] = event["rev"], event["status"]
        if (sid := event.get("step")) is not None:
            table = run["undos"] if event["kind"].startswith("undo_") else run["steps"]
            if event["rev"] >= table.get(sid, (0,))[0]:
                table[sid] = (event["rev"], event["step_status"], event.get("attempt"))
    return runs


def _check_revisions(world: World) -> list[str]:
    last: dict[str, int] = {}
    problems = []
    for wid, rev in world.revisions:
        if rev != last.get(wid, 0) + 1:
            problems.append(f"revisions: {wid} committed rev {rev} after {last.get(wid, 0)}")
        last[wid] = rev
    return problems


def _check_deadlines(states: dict[str, WorkflowState | None]) -> list[str]:
    problems = []
    for wid, state in states.items():
        if state is None or (state.error or {}).get("code") != "deadline_exceeded":
            continue
        if state.deadline_ms is not None and (state.finished_ms or 0) < state.deadline_ms:
            problems.append(
                f"deadline: {wid} failed for its deadline at {state.finished_ms}, before it "
                f"(deadline {state.deadline_ms})"
            )
    return problems


async def _check_leftovers(world: World, states: dict[str, WorkflowState | None]) -> list[str]:
    finished = {wid for wid, s in states.items() if s is not None and s.terminal}
    redis = next(iter(world.replicas.values())).redis
    keys = world.keys
    problems = []
    for shard in range(keys.shards):
        for member in await redis.zrange(keys.timers(shard), 0, -1):
            name = text(member)
            if name.split("|")[1] in finished:
                problems.append(f"leftovers: timer {name} outlived its run")
        for member in await redis.zrange(keys.routed(shard), 0, -1):
            name = text(member)
            if name.split(SEP)[2] in finished:
                problems.append(f"leftovers: routed entry {name} outlived its run")
        for service in world.services:
            for member in await redis.zrange(keys.parked(shard, service), 0, -1):
                name = text(member)
                if name.split("|")[1] in finished:
                    problems.append(f"leftovers: parked entry {name} outlived its run")
            for field in await redis.hkeys(keys.released(shard, service)):
                name = text(field)
                if name.split("|")[1] in finished:
                    problems.append(f"leftovers: released entry {name} outlived its run")
        if await redis.hlen(keys.outbox(shard)):
            problems.append(f"leftovers: outbox of shard {shard} not empty")
    return problems + await _held_leftovers(world)


async def _held_leftovers(world: World) -> list[str]:
    """Flow-control permits and concurrency slots still held once every run ended (lost
    ones, a replica killed before releasing them, are freed by the upkeeps)."""
    redis = next(iter(world.replicas.values())).redis
    keys = world.keys
    problems = []
    for service in world.settings.flow_control.services:
        held = await redis.zrange(keys.limit(service)[0], 0, -1)
        if held:
            problems.append(f"leftovers: flow-control permits of {service}: {held}")
    for raw in await redis.hkeys(keys.concurrency_keys):
        for name in keys.concurrency(text(raw)):
            if left := await redis.zrange(name, 0, -1):
                problems.append(f"leftovers: concurrency key {name}: {left}")
    return problems


async def check_waits(world: World) -> list[str]:
    """Every live run has a timer for each thing it waits on (or, for a parked step, a
    parked entry or its release timer): otherwise nothing would ever move it on."""
    states = await world.states()
    redis = next(iter(world.replicas.values())).redis
    keys = world.keys
    timers: set[str] = set()
    parked: set[str] = set()
    for shard in range(keys.shards):
        timers |= {text(m) for m in await redis.zrange(keys.timers(shard), 0, -1)}
        for service in world.services:
            parked |= {text(m) for m in await redis.zrange(keys.parked(shard, service), 0, -1)}
    # A run committed by a batch still in progress may lack its place in its concurrency
    # key's queue for a moment: after a failover lost it, the batch puts it back once its
    # commit is made (its timers, written with the commit, have no such moment). If the
    # replica died first, the batch that reads its input again does it. And a run whose
    # place a batch freed after a failover rolled back the commit that freed it lacks it
    # until it is committed again (`World.rolled_back`).
    unsettled = (
        world.orphans()
        | world.rolled_back
        | {
            wid
            for replica in world.replicas.values()
            for runs in replica.store.unsettled.values()
            for wid in runs
        }
    )
    problems = []
    for wid, state in states.items():
        if state is None or state.terminal:
            continue
        workflow = world.definitions.find(state.workflow, state.version)
        assert workflow is not None
        settled = wid not in unsettled
        if settled and state.queued_ms is not None and state.concurrency_key is not None:
            member = slot_member(wid, state.round)
            digest = concurrency_digest(state.workflow, state.concurrency_key)
            sets = keys.concurrency(digest)
            if not any([await redis.zscore(name, member) is not None for name in sets]):
                problems.append(f"waits: {wid} is queued but neither holds nor waits for a slot")
        if settled:
            problems += await _keyed_step_waits(world, workflow, state, timers | parked)
        for what, names in _waits(workflow, state, world.clock.ms):
            if (
                names[0].startswith("unpark|")
                and state.steps.get(names[0].split("|")[2])
                and (names[0].split("|")[2] in workflow.keyed_steps)
            ):
                continue  # checked above
            if not any(name in timers or name in parked for name in names):
                problems.append(f"waits: {wid} waits on {what} with no timer {names[0]!r}")
    return problems


async def _keyed_step_waits(
    world: World, workflow: Workflow, state: WorkflowState, timers: set[str]
) -> list[str]:
    """A step queued by its concurrency key waits in the key's queue, or holds its slot
    (its ``unpark`` timer set, or the upkeep will set it)."""
    redis = next(iter(world.replicas.values())).redis
    problems = []
    for sid in workflow.keyed_steps:
        step = state.steps[sid]
        if step.status is not StepStatus.QUEUED or step.key is None:
            continue
        digest = concurrency_digest(f"{workflow.name}.{sid}", step.key)
        unpark = SetTimer("unpark", state.workflow_id, 0, sid, step.attempt).member
        found = [await redis.zscore(n, step.command_id or "")
                 for n in world.keys.concurrency(digest)]  # fmt: skip
        if all(f is None for f in found) and unpark not in timers:
            problems.append(
                f"waits: step {sid} of {state.workflow_id} queued by its key, in no set"
            )
    return problems


def _waits(workflow: Workflow, state: WorkflowState, now_ms: int) -> list[tuple[str, list[str]]]:
    """What a live run waits on, and the timer names (any one will do) that move it on."""
    wid = state.workflow_id
    waits: list[tuple[str, list[str]]] = []
    held = state.held or []
    if state.deadline_ms is not None and (
        state.status is WorkflowStatus.RUNNING or now_ms < state.deadline_ms
    ):
        # Compensating past its deadline, a run has had its deadline (its undos' own
        # timeouts bound it now).
        waits.append(("its deadline", [SetTimer("deadline", wid, 0, "", state.round).member]))
    for sid, step in state.steps.items():
        spec = workflow.steps[sid]

        def name(kind: Any, attempt: int, sid: str = sid) -> str:
            return SetTimer(kind, wid, 0, sid, attempt).member

        if step.status is StepStatus.WAITING and spec.timeout_ms:
            waits.append((f"wait {sid}", [name("timeout", step.attempt)]))
        elif step.status is StepStatus.RUNNING and spec.timeout_ms:
            waits.append((f"step {sid}", [name("timeout", step.attempt),
                                          name("reroute", step.attempt)]))  # fmt: skip
        elif [kind for kind, s, a in held if (s, a) == (sid, step.attempt)]:
            continue  # its timer fell due while paused: the resume sets it again
        elif step.status is StepStatus.RETRYING:
            waits.append((f"retry of {sid}", [name("retry", step.attempt)]))
        elif step.status in (StepStatus.PARKED, StepStatus.QUEUED):
            waits.append((f"{step.status.value} {sid}", [name("unpark", step.attempt)]))
    for sid, undo in (state.compensations or {}).items():
        compensate = workflow.steps[sid].compensate
        if undo.status is StepStatus.RUNNING and compensate and compensate.timeout_ms:
            waits.append((f"undo of {sid}", [SetTimer("undo_timeout", wid, 0, sid,
                                                      undo.attempt).member]))  # fmt: skip
        elif undo.status is StepStatus.RETRYING and ["undo_retry", sid, undo.attempt] not in held:
            waits.append((f"undo retry of {sid}", [SetTimer("undo_retry", wid, 0, sid,
                                                            undo.attempt).member]))  # fmt: skip
    return waits
