"""One replica, wired: the Redis store, the outbox, the runtime and its upkeeps, the
consumers of what `handlers` subscribes to; and `create_app`, the same replica as a
FastStream application (``faststream run``, ``faststream docs gen``).

This module sits above `mediator.runtime` and `handlers`: it is the one place in the
package that knows both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Iterable
from types import TracebackType
from typing import Any

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import handlers
from mediator import __version__, logs
from mediator.clock import now_ms
from mediator.codec import validation_reason
from mediator.core.signing import Signatures
from mediator.definitions import Definitions, load_paths
from mediator.errors import ConfigurationError, MediatorError
from mediator.kafka import broker_options, check_tls
from mediator.loops import loop_name
from mediator.producers import DeferredProducer
from mediator.runtime.alerting import AlertEvaluator
from mediator.runtime.batches import Runtime
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.collector import tune_gc
from mediator.runtime.consumers import BatchConsumer, Offsets
from mediator.runtime.endpoints import Endpoints
from mediator.runtime.flow import FlowUpkeep
from mediator.runtime.groups import adopt_offsets, inbound_group, previous_groups
from mediator.runtime.keyed import KeyUpkeep
from mediator.runtime.liveness import Marker
from mediator.runtime.outbox import Dispatcher
from mediator.runtime.parking import BreakerUpkeep
from mediator.runtime.recording import MetricsFlusher, Recorder, StatsCollector
from mediator.runtime.registry import Registry, RegistryUpkeep
from mediator.runtime.scheduler import Scheduler
from mediator.runtime.timers import TimerPoller
from mediator.runtime.tracing import Tracing
from mediator.settings import Settings, load_settings
from mediator.storage.catalog import DefinitionStore
from mediator.storage.connection import connect_to, describe
from mediator.storage.keys import Keys
from mediator.storage.metrics import MetricsStore
from mediator.storage.schedules import ScheduleStates
from mediator.storage.store import Store
from mediator.topic_limits import warn_of_small_topics

__all__ = ["Mediator", "create_app"]

log = logging.getLogger("mediator.app")


class Mediator:
    """One mediator replica. Any number may run against the same Kafka and Redis."""

    def __init__(self, settings: Settings, definitions: Definitions) -> None:
        self.settings = settings
        self.definitions = definitions
        kafka = settings.kafka
        redis = settings.redis
        self.redis = connect_to(redis)
        keys = Keys(redis.key_prefix, redis.shards)
        self.store = Store(
            self.redis,
            keys,
            retention_ms=round(redis.retention_s * 1000),
            recent_limit=redis.recent_limit,
            lease_ms=settings.outbox.lease_ms,
            tombstone_ms=round(redis.tombstone_s * 1000),
            wait_replicas=redis.wait_replicas,
            wait_timeout_ms=redis.wait_timeout_ms,
            audit_limit=settings.audit.max_entries if settings.audit.enabled else 0,
        )
        self.catalog = DefinitionStore(self.redis, keys, definitions)
        self.producer = DeferredProducer(
            kafka,
            client_id=f"{kafka.client_id}-outbox",
            enable_idempotence=kafka.enable_idempotence,
            linger_ms=kafka.linger_ms,
            max_request_size=settings.limits.max_message_bytes,
        )
        self.signatures = _signatures(settings, definitions)
        self.dispatcher = Dispatcher(
            self.store,
            self.producer,
            topics=kafka.topics,
            backoff=settings.backoff,
            excerpt_bytes=settings.limits.excerpt_bytes,
            sweep_interval_ms=settings.outbox.sweep_interval_ms,
            sweep_batch=settings.outbox.sweep_batch,
            signatures=self.signatures,
            clear_ms=settings.outbox.clear_ms,
            max_request_size=settings.limits.max_message_bytes,
        )
        #: This replica's name, in logs and in the breakers and drain leases it holds.
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.breakers = Breakers(self.redis, keys, settings.circuit_breaker, self.replica)
        self.upkeep = BreakerUpkeep(
            self.redis,
            keys,
            self.breakers,
            definitions.services,
            self.replica,
            settings.backoff,
        )
        self.registry = Registry(self.redis, keys, settings.discovery)
        monitoring = settings.service_monitoring
        #: This replica's Prometheus metrics (served on ``/metrics``).
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.recorder = Recorder(self.prometheus, monitoring.bucket_s)
        self.metrics = MetricsStore(self.redis, keys, monitoring.bucket_s, monitoring.window_ms)
        #: OpenTelemetry spans of runs and steps, when `tracing.enabled`.
        self.tracing = Tracing.configure(settings.tracing) if settings.tracing.enabled else None
        self.runtime = Runtime(
            definitions=self.catalog,
            store=self.store,
            dispatcher=self.dispatcher,
            topics=kafka.topics,
            limits=settings.limits,
            state_cache_size=settings.state_cache_size,
            breakers=self.breakers if settings.circuit_breaker.enabled else None,
            registry=self.registry if settings.discovery.enabled else None,
            balancing=settings.load_balancing,
            signatures=self.signatures,
            recorder=self.recorder if monitoring.enabled else None,
            tracing=self.tracing,
            replica=self.replica,
            operators=settings.signing.operator_keys(),
            controls_signed=_controls_signed(settings),
            clients=settings.signing.client_keys(),
            requests_signed=settings.signing.requests if settings.signing.enabled else "off",
            **_child_signers(settings, definitions),
            signal_sources=settings.signals.sources,
            flow=settings.flow_control,
            events=settings.events.enabled,
        )
        self.upkeep.limited = frozenset(settings.flow_control.services)
        per_instance = [
            s for s, limit in settings.flow_control.services.items() if limit.per_instance
        ]
        if per_instance and self.runtime.router is None:
            msg = (
                f"flow_control.services.{per_instance[0]}.per_instance limits what each instance "
                "is sent: it needs discovery.enabled and load_balancing.enabled (commands "
                "routed to instances)"
            )
            raise ConfigurationError(msg)
        #: Releases queued commands of services with a flow-control limit (None: none).
        self.flow = (
            FlowUpkeep(
                self.redis,
                keys,
                self.runtime.limiter,
                settings.flow_control,
                self.breakers if settings.circuit_breaker.enabled else None,
                self.replica,
                settings.backoff,
                self.store,
                self.runtime.router,
            )
            if self.runtime.limiter is not None
            else None
        )
        #: Repairs concurrency keys' slots (always on: any workflow may declare a key).
        self.keyed = (
            KeyUpkeep(
                self.redis, keys, self.runtime.slots, self.store, self.replica, settings.backoff
            )
            if self.runtime.slots is not None
            else None
        )
        self.flusher = MetricsFlusher(
            self.recorder, self.metrics, monitoring.flush_ms, settings.backoff
        )
        self.alerts = AlertEvaluator(
            self.redis,
            keys,
            monitoring,
            self.metrics,
            self.recorder.tally,
            self.dispatcher,
            kafka.topics.alerts,
            self.replica,
            definitions.services,
            self.registry if settings.discovery.enabled else None,
            settings.backoff,
        )
        if monitoring.enabled:  # else nothing would drain what it tallies
            self.breakers.on_change.append(self.recorder.breaker_changed(now_ms))
        self.timers = TimerPoller(self.store, self.runtime, settings.timers, settings.backoff)
        self.prometheus.register(
            StatsCollector(
                {
                    "runtime": self.runtime.stats.as_dict,
                    "outbox": lambda: {
                        "published": self.dispatcher.published,
                        "swept": self.dispatcher.swept,
                        **self.dispatcher.stats.as_dict(),
                    },
                    "breakers": self.breakers.stats.as_dict,
                },
                self._gauges,
            )
        )
        http = settings.http
        self.endpoints = (
            Endpoints(self.prometheus, self._readiness, http.host, http.port)
            if http.enabled
            else None
        )
        #: Writes the health topic's markers, so that silence is evidence of death.
        self.marker = Marker(
            self.redis,
            keys,
            self.producer,
            kafka.topics.health,
            settings.discovery,
            self.replica,
            self.signatures,
        )
        self.registry_upkeep = RegistryUpkeep(
            self.registry, self.runtime.stats, settings.backoff, self.marker
        )
        if self.runtime.router is not None:
            self.registry_upkeep.on_deaths.append(self.runtime.router.on_deaths)
            self.registry_upkeep.catch_up = self.runtime.router.sweep_down
        # Timers this replica sets, or makes due now, are polled for when due.
        self.runtime.on_timer_set = self.timers.nudge
        self.upkeep.queues.on_due = self.timers.nudge
        if self.flow is not None:
            self.flow.queues.on_due = self.timers.nudge
        if self.runtime.slots is not None:
            self.runtime.slots.on_due = self.timers.nudge
        self.schedule_states = ScheduleStates(self.redis, keys)
        #: Fires the loaded schedules' ticks (None: none loaded, or schedules disabled).
        self.scheduler = (
            _scheduler(settings, definitions, self.schedule_states, self.producer, self.store)
            if definitions.schedules and settings.schedules.enabled
            else None
        )
        self.offsets = Offsets()
        self.consumers = []
        for subscription in handlers.subscriptions(settings, self.runtime):
            boundary = Boundary(subscription.name, self.runtime.reject, settings.backoff)
            self.runtime.boundaries.append(boundary)
            self.consumers.append(
                BatchConsumer(kafka, subscription, boundary, self.offsets, settings.backoff)
            )
        self._started = False

    async def start(self) -> None:
        """Connect to Redis and Kafka and start consuming; on failure, undo what started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def connect(self) -> None:
        """Check the Redis layout, store the loaded definitions, start the outbox and the
        timer poller."""
        await self.store.check_layout()
        await self.catalog.publish()
        await self.producer.start()
        await warn_of_small_topics(
            self.settings.kafka, self._published_topics(), self.settings.limits.max_message_bytes
        )
        if self.endpoints is not None:
            try:
                await self.endpoints.start()
            except OSError as exc:
                http = self.settings.http
                msg = (
                    f"cannot serve metrics and health on {http.host}:{http.port}: {exc}; set "
                    "http.port (MEDIATOR_HTTP__PORT; 0 for any free port) or http.enabled false"
                )
                raise ConfigurationError(msg) from exc
        self.dispatcher.start()
        self.timers.start()
        if self.scheduler is not None:
            changed = await self.schedule_states.publish(self.scheduler.schedules.values())
            for name in changed:
                log.warning(
                    "schedule %s changed: it starts again from now (ticks of its earlier "
                    "spec are not caught up)",
                    name,
                )
            self.scheduler.start()
        monitoring = self.settings.service_monitoring
        if monitoring.enabled:
            self.flusher.start()
            if monitoring.alerts and self.alerts.rules:
                self.alerts.start()
        if self.settings.circuit_breaker.enabled:
            await self.breakers.refresh(self.definitions.services())
            self.upkeep.start()
        if self.settings.discovery.enabled:
            self.registry_upkeep.start()
        if self.flow is not None:
            self.flow.start()
        if self.keyed is not None:
            self.keyed.start()

    def _published_topics(self) -> list[str]:
        """The topics this replica may publish to, as far as it knows them at start: the
        mediator's own and every service's (not the `reply_to` topics of requests yet to
        come)."""
        topics = self.settings.kafka.topics
        services = (topics.service(service) for service in self.definitions.services())
        return sorted({*topics.mediator_topics(), *services})

    async def disconnect(self) -> None:
        """Stop the timers and the outbox (flushing publishes in flight), close the clients."""
        await _bounded("stop the alert evaluation", self.alerts.stop())
        await _bounded("write the last metrics", self.flusher.stop())
        if self.tracing is not None:
            await _bounded("export the last spans", asyncio.to_thread(self.tracing.shutdown))
        if self.endpoints is not None:
            await _bounded("stop the HTTP endpoints", self.endpoints.stop())
        await _bounded("stop the registry upkeep", self.registry_upkeep.stop())
        await _bounded("stop the breaker upkeep", self.upkeep.stop())
        if self.flow is not None:
            await _bounded("stop the flow-control upkeep", self.flow.stop())
        if self.keyed is not None:
            await _bounded("stop the concurrency-key upkeep", self.keyed.stop())
        await _bounded("stop the timer poller", self.timers.stop())
        await _bounded("stop the queue places' checks", self.runtime.stop_place_checks())
        if self.scheduler is not None:
            await _bounded("stop the scheduler", self.scheduler.stop())
        await _bounded("stop the outbox", self.dispatcher.stop())
        await _bounded("flush the outbox producer", self.producer.stop())
        await _bounded("close the Redis client", self.redis.aclose())

    async def prepare(self) -> None:
        """Everything before consuming, the same whichever way the replica is started
        (`start`, or FastStream's ``faststream run`` through `create_app`): check TLS to
        Kafka, connect Redis and the outbox, tune the collector, and carry the consumer
        offsets of an earlier version's groups over, so an upgrade replays nothing."""
        await check_tls(self.settings.kafka)
        await self.connect()
        tune_gc(self.settings.gc)
        kafka = self.settings.kafka
        await adopt_offsets(
            kafka, inbound_group(kafka), previous_groups(kafka), self.settings.backoff
        )

    async def consume(self) -> None:
        """Start the consumers side by side: each joins its consumer group, and a join can
        take seconds (Tansu holds the reply for half the session timeout)."""
        await asyncio.gather(*(consumer.start() for consumer in self.consumers))
        self._started = True

    async def stop_consuming(self) -> None:
        """Let each consumer finish the batch in hand, commit every processed offset, and
        leave the groups."""
        await _bounded(
            "finish the batches in hand", asyncio.gather(*(c.halt() for c in self.consumers))
        )
        await _bounded("commit processed offsets", self.offsets.flush())
        await _bounded(
            "leave the consumer groups", asyncio.gather(*(c.close() for c in self.consumers))
        )

    async def _start(self) -> None:
        await self.prepare()
        await self.consume()
        log.info(
            "mediator started: %d workflows, kafka %s, redis %s, %s event loop",
            len(self.definitions),
            self.settings.kafka.bootstrap_servers,
            describe(self.settings.redis),
            loop_name(),
        )

    async def stop(self) -> None:
        """Stop consuming, flush the outbox publishes in flight, disconnect.

        Each step is bounded (`STOP_STEP_S`): a broker that no longer answers cannot hold a
        replica's shutdown for ever. What a step leaves undone is safe to leave: offsets not
        committed are redelivered (and recognised), outbox entries not published are re-sent
        by any replica's sweeper.
        """
        await self.stop_consuming()
        await self.disconnect()
        if self._started:
            log.info(
                "mediator stopped: %s; rewinds %d, isolated %d; published %d, swept %d, %s",
                " ".join(f"{k}={v}" for k, v in self.runtime.stats.as_dict().items()),
                sum(b.rewinds for b in self.runtime.boundaries),
                sum(b.isolated for b in self.runtime.boundaries),
                self.dispatcher.published,
                self.dispatcher.swept,
                " ".join(f"outbox_{k}={v}" for k, v in self.dispatcher.stats.as_dict().items()),
            )
        self._started = False

    async def _readiness(self) -> str | None:
        """None when this replica consumes and Redis answers; else what is wrong."""
        if not self._started:
            return "starting or stopping"
        try:
            await self.redis.ping()
        except Exception as exc:
            return f"Redis does not answer: {exc}"
        return None

    def _gauges(self) -> Iterable[tuple[str, str, dict[str, str], float]]:
        """Read when scraped: breaker states, timer lag, outbox backlog in memory."""
        states = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
        for service in self.definitions.services():
            yield (
                "mediator_breaker_state",
                "Circuit breaker of a service as this replica sees it: 0 closed, "
                "1 half-open, 2 open.",
                {"service": service},
                states.get(self.breakers.state(service), 0.0),
            )
        for name, samples in (
            ("overhead", self.runtime.overhead),
            ("timer_lag", self.runtime.timer_lag),
        ):
            summary = samples.summary()
            for q in ("p50", "p99"):
                value = summary[q]
                if value is not None:
                    yield (
                        f"mediator_{name}_ms",
                        f"This replica's {name.replace('_', ' ')} (ms), recent samples.",
                        {"quantile": q},
                        float(value),
                    )
        yield (
            "mediator_timer_shards_failing",
            "Shards whose timers this replica cannot claim now (their claim fails on its "
            "own: its cluster primary out of memory, say); polled again after a capped "
            "backoff.",
            {},
            float(self.timers.failing_shards),
        )
        yield from _queue_gauges(self.flow, self.keyed)

    async def __aenter__(self) -> Mediator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Run until cancelled."""
        async with self:
            await asyncio.Event().wait()


def _queue_gauges(
    flow: FlowUpkeep | None, keyed: KeyUpkeep | None
) -> Iterable[tuple[str, str, dict[str, str], float]]:
    """Flow-control queues and concurrency keys, as this replica's upkeeps last read them
    from Redis (figures for the whole deployment, the same on every replica)."""
    if flow is not None:
        for service, queued in sorted(flow.queued.items()):
            labels = {"service": service}
            yield (
                "mediator_flow_queued",
                "Steps waiting in a limited service's queue.",
                labels,
                float(queued),
            )
            yield (
                "mediator_flow_oldest_wait_seconds",
                "How long the step waiting longest in a service's queue has waited.",
                labels,
                flow.oldest_wait_s.get(service, 0.0),
            )
    if keyed is not None:
        helps = {
            "keys": "Concurrency keys of a workflow with runs holding or waiting for a slot.",
            "running": "Runs of a workflow holding a slot of their concurrency key.",
            "queued": "Runs of a workflow waiting for a slot of their concurrency key.",
            "oldest_wait_s": "How long the run waiting longest for a slot of a workflow's "
            "concurrency keys has waited.",
        }
        for workflow, doc in sorted(keyed.workflows.items()):
            for field, help_text in helps.items():
                name = field.replace("_s", "_seconds") if field.endswith("_s") else field
                yield (
                    f"mediator_concurrency_{name}",
                    help_text,
                    {"workflow": workflow},
                    float(doc[field]),
                )


#: The longest any one step of `Mediator.stop` may take.
STOP_STEP_S = 15.0


def _signatures(settings: Settings, definitions: Definitions) -> Signatures | None:
    """The keys commands are signed with; refuses to start with signing on but keys
    missing."""
    if not settings.signing.enabled:
        log.warning("signing is off: replies and heartbeats are accepted from anyone")
        return None
    signatures = settings.signing.signatures()
    if signatures is None:
        msg = (
            "signing is on but no keys are set: give shared keys (signing.keys, e.g. "
            "MEDIATOR_SIGNING__KEYS=k1=<secret of 16+ characters>) or per-service ones "
            "(signing.services), or turn signing off (signing.enabled: false)"
        )
        raise ConfigurationError(msg)
    shared = sorted(s for s in definitions.services() if not signatures.has_own_keys(s))
    if signatures.shared is not None and shared:
        log.warning(
            "the shared signing keys (signing.keys) sign for services %s: whoever holds "
            "them can answer for any of these; give each service keys of its own "
            "(signing.services.<name>.keys)",
            ", ".join(shared),
        )
    missing = signatures.unsigned(definitions.services() | definitions.child_services())
    if missing:
        msg = (
            f"no signing key for services {', '.join(missing)}: give them keys "
            "(signing.services.<name>.keys) or set shared ones (signing.keys)"
        )
        raise ConfigurationError(msg)
    return signatures


def _child_signers(settings: Settings, definitions: Definitions) -> dict[str, Any]:
    """Who child runs' requests and the controls sent to child runs are signed as (the
    runtime's `request_signer` and `control_signer`); refuses to start when child runs
    need a signature nobody can give."""
    signing = settings.signing
    if not signing.enabled:
        return {"request_signer": None, "control_signer": None}
    client = signing.client
    keys = signing.request_signer()
    request_signer = (client, keys) if client is not None and keys is not None else None
    control_signer = signing.control_signer()
    children = sorted(definitions.child_services())
    if children and signing.requests != "off" and request_signer is None:
        msg = (
            f"workflows run child runs ({', '.join(children)}), and requests are signed: set "
            "signing.client to the client (of signing.clients) whose keys sign their requests"
        )
        raise ConfigurationError(msg)
    if children and signing.controls != "off" and control_signer is None:
        msg = (
            f"workflows run child runs ({', '.join(children)}), and controls are signed: set "
            "signing.operator to the operator (allowed cancel and compensate) that sends "
            "them their cancels and compensations"
        )
        raise ConfigurationError(msg)
    return {"request_signer": request_signer, "control_signer": control_signer}


def _scheduler(
    settings: Settings,
    definitions: Definitions,
    states: ScheduleStates,
    producer: DeferredProducer,
    store: Store,
) -> Scheduler:
    """The scheduler of the loaded schedules, signing what it publishes as this process's
    client (requests) and operator (cancels of `overlap: cancel_previous`)."""
    signing = settings.signing
    request_keys = signing.request_signer()
    if signing.enabled and signing.requests == "required" and request_keys is None:
        msg = (
            "schedules publish requests, and signing.requests is required: set signing.client "
            "to the client (of signing.clients) whose keys sign them"
        )
        raise ConfigurationError(msg)
    control_signer = signing.control_signer() if signing.enabled else None
    cancels = [s.name for s in definitions.schedules.values() if s.overlap == "cancel_previous"]
    if cancels and _controls_signed(settings) and control_signer is None:
        msg = (
            f"schedules {cancels} cancel the previous run (overlap: cancel_previous), and "
            "controls are signed: set signing.operator to the operator that cancels them"
        )
        raise ConfigurationError(msg)

    async def publish(
        topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        delivery = await producer.send(topic, value, key, headers=headers)
        await delivery

    async def is_live(workflow_id: str) -> bool | None:
        state = await store.load(workflow_id)
        return None if state is None else not state.terminal

    return Scheduler(
        states,
        definitions.schedules,
        settings.kafka.topics,
        publish,
        is_live,
        settings=settings.schedules,
        backoff=settings.backoff,
        request_keys=request_keys,
        control_signer=control_signer,
    )


def _controls_signed(settings: Settings) -> bool:
    """Whether controls must be signed by an operator; says so loudly when none can be."""
    signing = settings.signing
    if not signing.enabled or signing.controls == "off":
        log.warning(
            "controls are not checked: anyone who can write the control topic can "
            "cancel and retry runs, reset breakers and drain instances"
        )
        return False
    if not signing.operators:
        log.warning(
            "no operator keys (signing.operators): every control will be refused; give "
            "operators keys to cancel, retry, reset breakers or drain instances"
        )
    return True


async def _bounded(what: str, step: Awaitable[object]) -> None:
    """Run one shutdown step; give up on it after `STOP_STEP_S`, logging why."""
    try:
        async with asyncio.timeout(STOP_STEP_S):
            await step
    except TimeoutError:
        log.warning("shutdown: could not %s within %.0f s; moving on", what, STOP_STEP_S)
    except Exception as exc:
        log.warning("shutdown: could not %s: %s", what, exc)


def create_app(
    settings: Settings | None = None, definitions: Definitions | None = None
) -> FastStream:
    """A FastStream application running one mediator replica.

    Without arguments it reads the settings as ``mediator run`` does (``MEDIATOR_CONFIG``,
    then ``MEDIATOR_*``), loads the workflows they name and logs as they say, so it is a
    factory for ``faststream run mediator:create_app --factory`` and ``faststream docs gen
    mediator:create_app --factory`` (the AsyncAPI document of every channel and payload).
    Called so, a configuration it cannot use is one line on stderr and exit code 2.
    """
    if settings is not None and definitions is not None:
        return _app(Mediator(settings, definitions))
    try:
        if settings is None:
            settings = load_settings()
            if not logging.getLogger().handlers:
                logs.configure(
                    logs.level_of(settings.log_level) or logging.INFO, settings.log_format
                )
        if definitions is None:
            if not settings.workflows:
                msg = (
                    "no workflows configured: set MEDIATOR_WORKFLOWS "
                    "(or workflows in the MEDIATOR_CONFIG file)"
                )
                raise ConfigurationError(msg)
            definitions = load_paths(settings.workflows)
        return _app(Mediator(settings, definitions))
    except ValidationError as exc:
        print(f"error: invalid settings: {validation_reason(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except MediatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _app(mediator: Mediator) -> FastStream:
    """The replica as a FastStream application. Its consumers are the replica's own; the
    broker FastStream runs declares nothing (so it consumes nothing), and the AsyncAPI
    document is built from `handlers.document`, a broker that is never started."""
    settings = mediator.settings
    kafka = settings.kafka
    specification = AsyncAPI(
        handlers.document(settings, mediator.definitions.services()),
        title="kafka-mediator",
        version=__version__,
        description="Event-driven service orchestrator: requests in, commands to services, "
        "replies back, results out. Every payload is JSON; see the wire contract in the docs.",
    )
    broker = KafkaBroker(**broker_options(kafka), client_id=kafka.client_id, logger=None)
    app = FastStream(broker, specification=specification)
    app.context.set_global("mediator", mediator)
    app.on_startup(mediator.prepare)
    app.after_startup(mediator.consume)
    app.on_shutdown(mediator.stop_consuming)
    app.after_shutdown(mediator.disconnect)
    return app
