"""Wiring: Redis store, outbox dispatcher, runtime and the FastStream subscribers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable
from types import TracebackType

from faststream import FastStream
from faststream.kafka import KafkaBroker

import handlers
from mediator.core.signing import Signatures
from mediator.definitions import Definitions
from mediator.errors import ConfigurationError
from mediator.producers import new_producer
from mediator.runtime.batches import Runtime
from mediator.runtime.breakers import Breakers
from mediator.runtime.outbox import Dispatcher
from mediator.runtime.parking import BreakerUpkeep
from mediator.runtime.registry import Registry, RegistryUpkeep
from mediator.runtime.timers import TimerPoller
from mediator.settings import Settings
from mediator.storage.catalog import DefinitionStore
from mediator.storage.connection import connect
from mediator.storage.keys import Keys
from mediator.storage.store import Store

__all__ = ["Mediator", "create_app"]

log = logging.getLogger("mediator.app")


class Mediator:
    """One mediator replica. Any number may run against the same Kafka and Redis."""

    def __init__(self, settings: Settings, definitions: Definitions) -> None:
        self.settings = settings
        self.definitions = definitions
        kafka = settings.kafka
        redis = settings.redis
        self.redis = connect(redis.url, timeout_s=redis.socket_timeout_s)
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
        )
        self.catalog = DefinitionStore(self.redis, keys, definitions)
        self.producer = new_producer(
            kafka.bootstrap_servers,
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
        )
        self.registry_upkeep = RegistryUpkeep(self.registry, self.runtime.stats, settings.backoff)
        if self.runtime.router is not None:
            self.registry_upkeep.on_deaths.append(self.runtime.router.on_deaths)
            self.registry_upkeep.catch_up = self.runtime.router.sweep_down
        self.timers = TimerPoller(self.store, self.runtime, settings.timers, settings.backoff)
        self.broker = KafkaBroker(kafka.bootstrap_servers, client_id=kafka.client_id, logger=None)
        self.offsets = handlers.Offsets()
        handlers.register_requests(self.broker, self.runtime, settings, self.offsets)
        handlers.register_replies(self.broker, self.runtime, settings, self.offsets)
        handlers.register_control(self.broker, self.runtime, settings, self.offsets)
        if settings.discovery.enabled:
            handlers.register_health(self.broker, self.runtime, settings, self.offsets)
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
        self.dispatcher.start()
        self.timers.start()
        if self.settings.circuit_breaker.enabled:
            await self.breakers.refresh(self.definitions.services())
            self.upkeep.start()
        if self.settings.discovery.enabled:
            self.registry_upkeep.start()

    async def disconnect(self) -> None:
        """Stop the timers and the outbox (flushing publishes in flight), close the clients."""
        await _bounded("stop the registry upkeep", self.registry_upkeep.stop())
        await _bounded("stop the breaker upkeep", self.upkeep.stop())
        await _bounded("stop the timer poller", self.timers.stop())
        await _bounded("stop the outbox", self.dispatcher.stop())
        await _bounded("flush the outbox producer", self.producer.stop())
        await _bounded("close the Redis client", self.redis.aclose())

    async def _start(self) -> None:
        await self.connect()
        # Start the subscribers side by side: each joins its consumer group, and a join can
        # take seconds (Tansu holds the reply for half the session timeout).
        await self.broker.connect()
        await asyncio.gather(*(sub.start() for sub in self.broker.subscribers))
        self.broker.running = True
        self._started = True
        log.info(
            "mediator started: %d workflows, kafka %s, redis %s",
            len(self.definitions),
            self.settings.kafka.bootstrap_servers,
            self.settings.redis.url,
        )

    async def stop(self) -> None:
        """Stop consuming, flush the outbox publishes in flight, disconnect.

        Each step is bounded (`STOP_STEP_S`): a broker that no longer answers cannot hold a
        replica's shutdown for ever. What a step leaves undone is safe to leave: offsets not
        committed are redelivered (and recognised), outbox entries not published are re-sent
        by any replica's sweeper.
        """
        # Processed offsets first, while the consumers can still commit them.
        await _bounded("commit processed offsets", self.offsets.flush())
        await _bounded("stop the subscribers", self.broker.stop())
        await self.disconnect()
        if self._started:
            log.info(
                "mediator stopped: %s; rewinds %d, isolated %d; published %d, swept %d, %s",
                " ".join(f"{k}={v}" for k, v in self.runtime.stats.items()),
                sum(b.rewinds for b in self.runtime.boundaries),
                sum(b.isolated for b in self.runtime.boundaries),
                self.dispatcher.published,
                self.dispatcher.swept,
                " ".join(f"outbox_{k}={v}" for k, v in self.dispatcher.stats.items()),
            )
        self._started = False

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
    missing = signatures.unsigned(definitions.services())
    if missing:
        msg = (
            f"no signing key for services {', '.join(missing)}: give them keys "
            "(signing.services.<name>.keys) or set shared ones (signing.keys)"
        )
        raise ConfigurationError(msg)
    return signatures


async def _bounded(what: str, step: Awaitable[object]) -> None:
    """Run one shutdown step; give up on it after `STOP_STEP_S`, logging why."""
    try:
        async with asyncio.timeout(STOP_STEP_S):
            await step
    except TimeoutError:
        log.warning("shutdown: could not %s within %.0f s; moving on", what, STOP_STEP_S)
    except Exception as exc:
        log.warning("shutdown: could not %s: %s", what, exc)


def create_app(settings: Settings, definitions: Definitions) -> FastStream:
    """A FastStream application running one mediator replica (`faststream run` compatible)."""
    mediator = Mediator(settings, definitions)
    app = FastStream(mediator.broker)

    app.on_startup(mediator.connect)
    app.on_shutdown(mediator.offsets.flush)
    app.after_shutdown(mediator.disconnect)

    return app
