"""Routing commands to chosen instances of services that heartbeat, and handing on the
commands of an instance marked down.

A command to a service with registered instances goes to the partition of its topic
that the balancer's choice owns now (from its heartbeats): no topic per instance, so
thousands of instances cost nothing more. A service with no registered instance (it never
heartbeats) is untouched: its commands go where their key falls and its consumer group
decides, as always.

Least-loaded balancing reads each instance's last reported load plus what this replica
sent it since that report (less what it answered since): heartbeats come once a second,
commands thousands of times.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from mediator.clock import now_ms
from mediator.core.balancer import Balancer, Instance, NoInstance, Strategy
from mediator.core.counters import svc
from mediator.core.engine import Engine, SendCommand, Transition
from mediator.core.expressions import compile_expression
from mediator.core.instance_breakers import InstanceBreakers
from mediator.core.routing import instance_prefix
from mediator.runtime.ports import StateStore
from mediator.runtime.registry import Change, Registry
from mediator.runtime.stats import RuntimeStats
from mediator.settings import BreakerSettings, LoadBalancingSettings
from mediator.storage.registry import InstanceView
from topics.events import HealthStatus, ReplyEvent

__all__ = ["Router"]

log = logging.getLogger("mediator.routing")
#: Under the service breakers' logger, so whatever quiets those quiets these too.
breaker_log = logging.getLogger("mediator.breakers.instances")


class Router:
    """Chooses an instance (and a partition it owns) for each command of a registered
    service, before its transition commits."""

    def __init__(
        self,
        registry: Registry,
        settings: LoadBalancingSettings,
        engine: Engine,
        store: StateStore,
        stats: RuntimeStats,
        breakers: BreakerSettings | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.engine = engine
        self.store = store
        self.stats = stats
        self._balancers: dict[str, Balancer] = {}
        self._fleets: dict[str, tuple[int, list[Instance]]] = {}
        #: Per service: commands sent to each instance since its last heartbeat, less
        #: those answered since.
        self._extra: dict[str, Counter[str]] = {}
        #: Per service: when each instance's last report (heartbeat) was, as last seen.
        self._reported: dict[str, dict[str, int]] = {}
        #: Per service with a per-instance limit: the instances with no room now (as the
        #: flow-control upkeep last counted, and as permits were refused since): not
        #: chosen while another has room.
        self.full: dict[str, set[str]] = {}
        #: Breakers per instance, from the outcomes this replica applies; None: off.
        self.breakers = (
            InstanceBreakers(lambda service: _policy(breakers, service))
            if breakers is not None and breakers.enabled
            else None
        )

    def route(self, transition: Transition) -> None:
        """Address each new command of `transition` to a chosen instance."""
        for effect in [e for e in transition.effects if isinstance(e, SendCommand)]:
            if effect.partition is not None:
                continue
            command = effect.command
            service = command.service
            fleet = self._fleet(service)
            if fleet is None:
                continue
            strategy, key_expression = self.settings.policy(service)
            balancer = self._balancers.get(service)
            if balancer is None or balancer.strategy is not strategy:
                balancer = self._balancers[service] = Balancer(service, strategy)
            key = None
            if strategy is Strategy.CONSISTENT_HASH and key_expression is not None:
                key = _key(key_expression, transition, command.input)
            extra = self._extra.setdefault(service, Counter())
            blocked = self.breakers.blocked(service, now_ms()) if self.breakers else None
            full = self.full.get(service)
            if full:
                blocked = _either(full, blocked)
            try:
                chosen = balancer.choose(fleet, key=key, blocked=blocked, extra=extra)
            except NoInstance:
                # Every registered instance is down or draining: the key decides, and
                # whoever consumes that partition (or takes it over) gets the command.
                transition.count(svc(service, "unrouted"))
                continue
            partitions = chosen.partitions
            partition = partitions[zlib.crc32(command.workflow_id.encode()) % len(partitions)]
            self.engine.route(transition, command.command_id, chosen.id, partition)
            extra[chosen.id] += 1

    def answered(self, reply: ReplyEvent) -> None:
        """A reply arrived: its instance has one command less in flight."""
        if reply.service and reply.instance:
            extra = self._extra.get(reply.service)
            if extra is not None and extra.get(reply.instance, 0) > 0:
                extra[reply.instance] -= 1

    def record(self, outcomes: Sequence[tuple[str, str, bool]]) -> list[str]:
        """Feed the per-instance breakers; the counters of what opened or closed."""
        if self.breakers is None:
            return []
        now = now_ms()
        changes = []
        for service, instance, ok in outcomes:
            change = self.breakers.record(service, instance, ok, now)
            if change is not None:
                breaker_log.warning("breaker of instance %s of %s %s", instance, service, change)
                changes.append(f"instance:{service}:breaker_{change}")
        return changes

    async def on_deaths(self, deaths: Sequence[Change]) -> None:
        """Instances were marked down: hand on the commands in flight on each."""
        for death in deaths:
            await self.hand_on(death.service, death.instance)

    async def hand_on(self, service: str, instance: str) -> int:
        """Turn the attempts in flight on `instance` into ``reroute`` timers due now."""
        moved = await self.store.reroute_instance(instance_prefix(service, instance))
        if self.breakers is not None:
            self.breakers.forget(service, instance)
        self._extra.get(service, Counter()).pop(instance, None)
        if moved:
            self.stats.rerouted_on_death += moved
            log.warning(
                "instance %s of %s is down: %d commands in flight on it go elsewhere",
                instance,
                service,
                moved,
            )
        return moved

    async def sweep_down(self) -> int:
        """Hand on what is still recorded in flight on any instance marked dead: the work
        of a death whose hand-on failed (Redis unreachable then, the replica that saw it
        killed). An instance that left cleanly is not dead: it answered what it took
        before it said so, and what reaches its partitions after goes to their next owner;
        its replies may still be on their way, and sending its work again would do it
        twice. Nothing to do is a few cheap range queries."""
        moved = 0
        for service, views in self.registry.view.items():
            for view in views:
                if view.dead:
                    moved += await self.hand_on(service, view.instance)
        return moved

    def up_instances(self, service: str) -> list[str]:
        """The instances of `service` commands may be routed to now (up, not draining)."""
        return [i.id for i in self._fleet(service) or () if i.eligible]

    def saturated(self, service: str) -> bool:
        """Whether every instance of `service` commands may go to has no room now."""
        up = self.up_instances(service)
        return bool(up) and set(up) <= self.full.get(service, set())

    def _fleet(self, service: str) -> list[Instance] | None:
        """The service's instances as the balancer sees them (None: none registered);
        the same list object until the registry view is refreshed."""
        generation = self.registry.generation
        cached = self._fleets.get(service)
        if cached is not None and cached[0] == generation:
            return cached[1] or None
        views = self.registry.instances(service)
        extra = self._extra.setdefault(service, Counter())
        reported = self._reported.get(service, {})
        # Rebuilt from the view: instances the registry forgot are forgotten here too.
        self._reported[service] = {}
        fleet = [self._instance(service, view, extra, reported) for view in views]
        self._fleets[service] = (generation, fleet)
        return fleet or None

    def _instance(
        self, service: str, view: InstanceView, extra: Counter[str], reported: dict[str, int]
    ) -> Instance:
        beat = view.beat
        if reported.get(view.instance) != view.last_seen_ms:
            # A new report: its load counts what was in flight then.
            extra.pop(view.instance, None)
        self._reported[service][view.instance] = view.last_seen_ms
        return Instance(
            id=view.instance,
            partitions=tuple(beat.get("partitions") or ()),
            up=view.status != HealthStatus.DOWN.value,
            draining=view.status == HealthStatus.DRAINING.value,
            load=float(beat.get("load") or 0.0),
            capacity=max(int(beat.get("capacity") or 1), 1),
            weight=float(beat.get("weight") or 1.0),
        )


def _either(full: set[str], blocked: Callable[[str], bool] | None) -> Callable[[str], bool]:
    """Blocked: an instance with no room, or whose breaker is open."""
    if blocked is None:
        return full.__contains__
    return lambda instance: instance in full or blocked(instance)


def _policy(settings: BreakerSettings, service: str) -> tuple[int, int]:
    policy = settings.policy(service)
    return policy.failure_threshold, int(policy.recovery_timeout_ms)


def _key(expression: str, transition: Transition, command_input: Any) -> str | None:
    """The affinity key of a command: `expression` over the run's payload, the command's
    input and the run's identity. None (round robin) when it finds nothing."""
    state = transition.state
    document = {
        "payload": state.payload,
        "input": command_input,
        "workflow": {
            "id": state.workflow_id,
            "request_id": state.request_id,
            "name": state.workflow,
        },
    }
    value = compile_expression(expression).search(document)
    if value is None:
        return None
    return value if isinstance(value, str) else repr(value)
