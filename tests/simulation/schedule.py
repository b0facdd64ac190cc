"""The seeded schedule of a simulation: which action comes next, the two phases of a
run (faults, then healing) and the outcome of one seed.

Each step, every action the world allows now is weighed and one is drawn with the seed's
generator; after it, every task runs until it finishes or waits at a gate. The weights
favour the ordinary work (consuming, serving, time passing) so that runs make progress,
with faults often enough that a few hundred steps see several of each.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.simulation.fastlua import compiled_scripts
from tests.simulation.invariants import check_end, check_waits
from tests.simulation.services import Instance
from tests.simulation.timebase import START_MS
from tests.simulation.world import MAX_REQUESTS, REPLICAS, World

__all__ = ["Outcome", "run_seed"]

Action = tuple[float, str, Callable[[], Any]]


def choices(world: World) -> list[Action]:
    """Every action possible now, with its weight."""
    options: list[Action] = []
    add = options.append
    if len(world.issued.requests) < MAX_REQUESTS:
        add((3, "request", world.request))
    if world.issued.requests:
        add((0.2, "dup-request", world.duplicate_request))
        add((1.0, "control", world.control))
    for name in sorted(world.replicas):
        options += _replica_actions(world, name)
    if len(world.replicas) > 1:
        add((0.08, "kill", lambda: world.crash(world.rng.choice(sorted(world.replicas)))))
    if len(world.replicas) < REPLICAS:
        add((0.15, "restart", world.restart))
    for kind in world.groups:
        add((0.2, "rebalance", lambda k=kind: world.rebalance(k)))
    if world.paused:
        add((4 * len(world.paused), "resume", world.resume))
    options += _service_actions(world)
    if world.pending_replies:
        add((5, "deliver", world.deliver))
    if world.delivered_replies:
        add((0.3, "dup-reply", world.duplicate_reply))
    add((4, "tick", lambda: world.tick(1, 400)))
    add((0.5, "leap", lambda: world.tick(1_000, 6_000)))
    add((0.3, "instance", world.instance_event))
    if world.lossy and not world.failovers:
        if world.lagging is None:
            add((0.4, "replica-lags", world.replica_lags))
        else:
            add((0.4, "failover", world.failover))
    return options


def _replica_actions(world: World, name: str) -> list[Action]:
    options: list[Action] = []
    for kind, group in world.groups.items():
        if not world.busy(name, kind) and group.backlog(name):
            options.append((6, "consume", lambda k=kind: world.consume(name, k)))
        weight = 0.6 if kind == "control" else 0.3
        options.append((weight, "rewind", lambda k=kind: world.rewind(name, k)))
    replica = world.replicas[name]
    for kind, weight, work in (
        ("timers", 3.0, replica.poll_timers),
        ("sweep", 1.0, replica.sweep_outbox),
        ("breakers", 1.0, replica.breaker_upkeep),
        ("flow", 2.0, replica.flow_round),
        ("keys", 1.0, replica.key_round),
        ("registry", 2.0, replica.registry_round),
    ):
        if not world.busy(name, kind):
            options.append((weight, kind, lambda k=kind, w=work: world.round(name, k, w)))
    options.append((2, "commit", lambda: world.commit(name)))
    return options


def _service_actions(world: World) -> list[Action]:
    options: list[Action] = []
    for instance in world.alive():
        if world.service_groups[instance.service.name].backlog(instance.id):
            options.append((5, "serve", lambda i=instance: world.serve(i)))
    for name, group in world.service_groups.items():
        members = {i.id for i in world.alive(name)}
        if any(group.owner.get(tp) not in members for tp in group.partitions()):
            options.append((0.5, "service-rebalance",
                            lambda g=group: world.rebalance_service(g)))  # fmt: skip
    return options


async def chaos(world: World) -> None:
    """The first phase: `world.steps` actions drawn at random."""
    for step in range(world.steps):
        options = choices(world)
        pick = world.rng.random() * sum(weight for weight, _, _ in options)
        chosen = options[-1][2]
        for weight, _, action in options:
            pick -= weight
            if pick <= 0:
                chosen = action
                break
        done = chosen()
        if inspect.isawaitable(done):
            await done
        await world.settle()
        if step % 25 == 24:
            world.violations += await check_waits(world)


async def heal(world: World, rounds: int = 400) -> bool:
    """The second phase: faults stop; every part works in turn while time passes, until
    every run has ended and nothing is left to send. False if that never happens."""
    await world.stop_faults()
    world.resume_paused_runs()
    if world.failovers:
        for name in sorted(world.replicas):
            await world.drain_consumers(name)
        await world.recover()
    for n in range(rounds):
        for name, replica in sorted(world.replicas.items()):
            await world.drain_consumers(name)
            works = [replica.poll_timers, replica.sweep_outbox, replica.flow_round]
            if n % 4 == 0:  # the upkeeps' own periods are longer than a round
                works += [replica.breaker_upkeep, replica.registry_round, replica.key_round]
            for work in works:
                try:
                    await work()
                except Exception as exc:
                    world.errors.append(f"{name} (healing): {type(exc).__name__}: {exc}")
        for instance in world.alive():
            _serve_all(world, instance)
        world.deliver_all()
        await world.settle()
        if await world.quiet():
            return True
        world.advance(await world.idle_ms())
    return False


def _serve_all(world: World, instance: Instance) -> None:
    while world.service_groups[instance.service.name].backlog(instance.id):
        world.serve(instance)


@dataclass
class Outcome:
    """What one seed found."""

    seed: int
    problems: list[str]
    history: list[str]
    coverage: Counter[str]

    def report(self) -> str:
        lines = [f"seed {self.seed}: {len(self.problems)} invariant(s) broken"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(f"history ({len(self.history)} actions; ms since {START_MS}):")
        lines += [f"  {h}" for h in self.history]
        lines.append(f"replay: python -m tests.simulation --seed {self.seed} --history")
        return "\n".join(lines)


async def run_seed(seed: int, steps: int = 150) -> Outcome:
    """Run one seeded history and check it."""
    world = World(seed, steps)
    with world.clock.installed(), compiled_scripts():
        try:
            await world.start()
            await chaos(world)
            healed = await heal(world)
            world.violations += await check_end(world, healed)
        finally:
            await world.close()
    return Outcome(seed, world.violations, world.history, world.coverage())
