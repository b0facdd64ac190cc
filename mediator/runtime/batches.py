"""The runtime: decodes inbound batches, drives the engine, commits and dispatches.

It sits between the thin FastStream handlers and the pure engine. For a fetched batch it
loads every workflow it touches in one round trip, applies all of that workflow's events
in memory, commits each workflow once (all commits pipelined), then hands the outbox
messages to the producer. Kafka offsets are committed by the caller only after this
returns, i.e. after Redis has the transitions.

`Runtime` is the coordinator; each of its jobs is one module, each using only those
before it: `context` (what they share), `intake` (decode, signatures, sizes, dead letters,
flush), `commits` (a transition as a commit and its messages), `advance` (replies, timers,
the breaker gate and routing, conflicts), `requests` (starting runs, duplicates,
refusals), `controls` (operators' controls) and `health` (heartbeats and markers).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence

from mediator.core.engine import Engine
from mediator.core.expressions import Template
from mediator.core.signing import Keyring, Operators, Signatures
from mediator.runtime.boundary import Boundary
from mediator.runtime.breakers import Breakers
from mediator.runtime.context import CompiledSource, Record
from mediator.runtime.failures import is_transient
from mediator.runtime.health import Health
from mediator.runtime.metrics import Samples
from mediator.runtime.ports import Publisher, StateStore
from mediator.runtime.recording import Recorder
from mediator.runtime.registry import Registry
from mediator.runtime.routing import Router
from mediator.runtime.stats import RuntimeStats
from mediator.runtime.tracing import Tracing
from mediator.settings import (
    FlowControlSettings,
    LimitsSettings,
    LoadBalancingSettings,
    SignalSource,
)
from mediator.storage.cache import StateCache
from mediator.storage.catalog import DefinitionStore
from mediator.storage.correlation import Correlations
from mediator.storage.keys import Keys
from mediator.storage.limits import Limits
from mediator.storage.slots import Slots
from topics.names import Topics

__all__ = ["Record", "Runtime"]


class Runtime(Health):
    """Turns batches of requests and replies into committed transitions and messages.

    Bad input never raises: a record that does not decode, is too large or holds values
    the store cannot encode is dead-lettered with its reason, and whoever waits on it (the
    requester, the step) gets a clear error. What does raise is either transient
    (`StateUnavailable`, Kafka errors: the caller rewinds the batch) or unexpected (the
    caller isolates the record that causes it and dead-letters that one).
    """

    def __init__(
        self,
        *,
        definitions: DefinitionStore,
        store: StateStore,
        dispatcher: Publisher,
        topics: Topics,
        limits: LimitsSettings | None = None,
        state_cache_size: int = 100_000,
        breakers: Breakers | None = None,
        registry: Registry | None = None,
        balancing: LoadBalancingSettings | None = None,
        signatures: Signatures | None = None,
        recorder: Recorder | None = None,
        tracing: Tracing | None = None,
        replica: str = "",
        operators: Operators | None = None,
        controls_signed: bool = False,
        clients: Keyring | None = None,
        requests_signed: str = "off",
        request_signer: tuple[str, Keyring] | None = None,
        control_signer: tuple[str, Keyring] | None = None,
        signal_sources: Sequence[SignalSource] = (),
        flow: FlowControlSettings | None = None,
        events: bool = False,
    ) -> None:
        self.cache = StateCache(state_cache_size)
        #: Each commit's stamp (`WorkflowState.stamp`): a random prefix per runtime and a
        #: counter, unique across replicas and restarts.
        self._stamp_prefix = f"{secrets.token_hex(6)}."
        self._stamps = itertools.count(1)
        #: Tallies committed transitions for the metrics. None: metrics are off.
        self.recorder = recorder
        self.tracing = tracing
        #: This replica's name, in the audit log entries it writes.
        self.replica = replica
        self.definitions = definitions
        self.store = store
        self.keys: Keys = store.keys
        self.dispatcher = dispatcher
        self.topics = topics
        self.limits = limits or LimitsSettings()
        self.engine = Engine(replies_topic=topics.replies)
        #: Circuit breakers: commands to a service whose breaker is open are parked or
        #: rerouted before their transition commits. None: every command goes.
        self.breakers = breakers
        #: The registry of service instances, fed by heartbeats. None: discovery is off.
        self.registry = registry
        #: Keys commands are signed with and replies and heartbeats checked against. None:
        #: signing is off (nothing is signed, nothing is checked).
        self.signatures = signatures
        #: Whether controls must be signed by an operator (`operators`) who may send them.
        self.controls_signed = controls_signed
        self.operators = operators
        #: Requests' signatures: ``off``, ``optional`` or ``required`` (`clients`' keys).
        self.requests_signed = requests_signed
        self.clients = clients
        #: The client (name, keys) child runs' requests are signed as, and the operator
        #: the cancel and compensate controls sent to child runs are signed as. None:
        #: unsigned (signing off, or no `signing.client` / `signing.operator`).
        self.request_signer = request_signer
        self.control_signer = control_signer
        #: Signals by correlation key (`wait: {key: ...}`), in the store's Redis (None: a
        #: store without one, as in tests of the runtime alone).
        redis = getattr(store, "redis", None)
        self.correlations = Correlations(redis, store.keys) if redis is not None else None
        #: Publish every committed transition on the events topic (`events.enabled`).
        self.events = events
        #: Flow-control limits per service, and their permits (None: no limit set).
        self.flow = flow or FlowControlSettings()
        self.limiter = (
            Limits(redis, store.keys, self.flow.lease_ms)
            if redis is not None and self.flow.services
            else None
        )
        #: Whether any limited service has a per-instance limit (routing applies them).
        self.per_instance = any(
            limit.per_instance is not None for limit in self.flow.services.values()
        )
        #: Concurrency keys' slots (None: a store without Redis, as in runtime tests).
        self.slots = Slots(redis, store.keys) if redis is not None else None
        #: Permits of answered commands not released yet, per service: they go with the
        #: next permits taken for the service, or in the background (`_release_task`).
        self._releases: dict[str, list[str]] = {}
        self._release_task: asyncio.Task[None] | None = None
        #: Queue places asked for again in the background (`_retake_places`).
        self._place_checks: set[asyncio.Task[None]] = set()
        #: The signal sources (`signals.sources`) by topic, their expressions compiled.
        self.signal_sources = {
            source.topic: CompiledSource(
                source.event,
                Template.compile(source.key),
                Template.compile(source.payload) if source.payload is not None else None,
            )
            for source in signal_sources
        }
        self.overhead = Samples()
        #: The error boundaries of the subscribers feeding this runtime (for stats).
        self.boundaries: list[Boundary] = []
        self.stats = RuntimeStats()
        #: Routes commands of services that heartbeat to chosen instances. None: every
        #: command goes where its key falls (discovery or load balancing off).
        self.router = (
            Router(
                registry,
                balancing,
                self.engine,
                store,
                self.stats,
                breakers.settings if breakers is not None else None,
            )
            if registry is not None and balancing is not None and balancing.enabled
            else None
        )
        #: How late timers fired (ms after their due time, Redis clock). A timer claimed
        #: again after a lease ran out counts from that lease's end, not its first due time.
        self.timer_lag = Samples()
        #: Told the delay (ms) of the soonest timer each batch committed, by shard, so the timer
        #: poller can wake for it (None: nobody listens).
        self.on_timer_set: Callable[[Mapping[int, int]], None] | None = None

    # -- inbound ---------------------------------------------------------------------------

    async def handle_inbound(self, records: Sequence[Record]) -> None:
        """A batch of the requests and replies topics (one consumer reads both): the
        requests start runs while the replies advance theirs, side by side, so one part's
        Redis round trip overlaps the other's work.

        If either part raises, the other still finishes first (nothing is left running
        behind the caller's rewind); a transient failure is raised before any other, so
        the whole batch is redelivered rather than split."""
        requests_topic = self.topics.requests
        requests = [r for r in records if r.topic == requests_topic]
        if len(requests) == len(records):
            await self.handle_requests(requests)
            return
        if not requests:
            await self.handle_replies(records)
            return
        replies = [r for r in records if r.topic != requests_topic]
        outcomes = await asyncio.gather(
            self.handle_requests(requests), self.handle_replies(replies), return_exceptions=True
        )
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if errors:
            raise next((e for e in errors if is_transient(e)), errors[0])
