"""How work moves: timers, the outbox, limits, backoff, circuit breakers, discovery and
load balancing."""

from __future__ import annotations

import fnmatch
import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from mediator.core.balancer import Strategy
from mediator.core.expressions import ExpressionError, Template, compile_expression
from mediator.settings.fields import DurationMs, comma_separated, renamed_durations


class ScheduleSettings(BaseModel):
    """Schedules (``schedules:`` in workflow files): each replica looks at them this often,
    on Redis's clock; a tick is fired by whichever replica moves the schedule on first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Fire the loaded schedules.")
    poll_ms: DurationMs = Field(
        default=500,
        ge=50,
        description="How often each replica looks for due ticks: a tick fires at most this "
        "late while a replica runs.",
    )
    grace_ms: DurationMs = Field(
        default=60_000,
        ge=0,
        description="With ``catch_up: none``, a tick this late still fires (later ones were "
        "missed: the mediator was down).",
    )


class ServiceLimit(BaseModel):
    """One service's flow-control limit, enforced across every replica."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_in_flight: int | None = Field(
        default=None, ge=1, description="Commands sent and not yet answered, at most."
    )
    rate: float | None = Field(default=None, gt=0, description="Commands sent a second, at most.")
    burst: int | None = Field(
        default=None,
        ge=1,
        description="With `rate`: how many may go at once after a quiet spell (a token "
        "bucket: at most rate x t + burst in any t seconds). Default: one second's worth.",
    )
    per_instance: int | None = Field(
        default=None,
        ge=1,
        description="Commands sent to any one instance and not yet answered, at most (needs "
        "discovery and load balancing: commands are routed to instances with room).",
    )

    def instance_limit(self) -> ServiceLimit | None:
        """The limit each instance's permits are taken under (None: no per-instance one)."""
        return None if self.per_instance is None else ServiceLimit(max_in_flight=self.per_instance)

    @property
    def bucket(self) -> int:
        """The token bucket's size (with a `rate`)."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate or 1))


class FlowControlSettings(BaseModel):
    """Limits on what the mediator sends each service, across all replicas: a command over
    a limit waits in the service's queue (its step `queued`) and goes out, oldest first,
    as capacity frees."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    services: dict[str, ServiceLimit] = Field(
        default_factory=dict,
        description="Per service: ``payment: {max_in_flight: 20, rate: 50, burst: 10}``.",
    )
    release_ms: DurationMs = Field(
        default=100,
        ge=10,
        description="How often a replica looks for room to release queued commands.",
    )
    lease_ms: DurationMs = Field(
        default=60_000,
        ge=1000,
        description="A permit whose release was lost (a replica died between committing a "
        "reply and releasing it) lapses after this.",
    )


class SignalSource(BaseModel):
    """A topic whose records are signals: each one is sent, as the signal `event`, to the
    run waiting on the correlation key `key` computes from it (a webhook relay's topic,
    another system's events)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$", description="The topic read.")
    event: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$",
        description="The signal each record is (what `wait: {event: ...}` waits for).",
    )
    key: str = Field(
        description="An expression on the record (`value`: its JSON value, `key`: its Kafka "
        "key as text) giving the correlation key, e.g. ``value.data.object.id``."
    )
    payload: str | None = Field(
        default=None,
        description="An expression on the record giving the signal's payload (an object; "
        "anything else is wrapped as ``{value: ...}``). Default: the record's value.",
    )

    @model_validator(mode="after")
    def _expressions(self) -> SignalSource:
        for name in ("key", "payload"):
            source = getattr(self, name)
            if source is None:
                continue
            try:
                Template.compile(source)
            except ExpressionError as exc:
                msg = f"signals.sources ({self.topic}): {name} {source!r}: {exc}"
                raise ValueError(msg) from None
        return self


class SignalSettings(BaseModel):
    """Signals read from topics other than the control topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[SignalSource] = Field(
        default_factory=list,
        description="Topics whose records are signals by correlation key. Their records are "
        "not signed: who may write them is up to Kafka ACLs.",
    )


class TimerSettings(BaseModel):
    """Durable timers (step timeouts, retries, workflow deadlines), kept in Redis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval_ms: DurationMs = Field(
        default=50,
        ge=5,
        description="Every replica polls every shard for due timers this often. In between it "
        "polls a shard alone when the earliest timer it saw there falls due, or one it set "
        "itself, so a timer fires within milliseconds of its due time; this bounds "
        "how late one set by another replica after the last poll can be.",
    )
    lease_ms: DurationMs = Field(
        default=2_000,
        ge=100,
        description="A claimed timer is the claimer's for this long; if it dies first (or a claim "
        "it gave up on, say while Redis stalled, still ran), another replica fires it "
        "once this has passed. Short is safe: a timer fired twice changes the state "
        "once (the revision check), so this bounds how late a timer can be after such "
        "a failure.",
    )
    batch: int = Field(
        default=500,
        ge=1,
        description="Most due timers one poll claims.",
    )


class OutboxSettings(BaseModel):
    """The at-least-once outbox that carries commands and results to Kafka."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_ms: DurationMs = Field(
        default=15_000,
        ge=100,
        description="An outbox entry is the publishing replica's for this long; after it, any "
        "replica's sweeper re-sends it.",
    )
    sweep_interval_ms: DurationMs = Field(
        default=1_000,
        ge=10,
        description="How often each replica sweeps the outbox for entries whose lease ran out.",
    )
    sweep_batch: int = Field(
        default=500,
        ge=1,
        description="Most entries one sweep takes over per shard.",
    )
    clear_ms: DurationMs = Field(
        default=20,
        ge=0,
        le=1_000,
        description="Entries Kafka acknowledged are deleted from Redis together, at most this "
        "long after the first (one round trip for many batches; 0: each batch at once). An "
        "entry not yet deleted when its replica dies is re-sent: consumers drop it by id.",
    )


class LimitsSettings(BaseModel):
    """Sizes the mediator enforces where messages enter and leave it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="Apache Kafka's default `message.max.bytes` is 1 MiB plus a little. Applied "
        "to the producer (max_request_size, and the most its batches hold) and checked "
        "before anything enters the outbox: a command or result that would not fit fails "
        "its step or run with `payload_too_large` instead of jamming the outbox. Inbound "
        "records over it are refused the same way. A replica warns at start of every "
        "topic it publishes to whose `max.message.bytes` is lower.",
    )
    dead_letter_excerpt_bytes: int = Field(
        default=16_384,
        ge=256,
        description="A dead letter carries at most this much of the record it rejects (and the "
        "size of the whole), so a dead letter never becomes a poison message itself.",
    )
    reply_to_topics: Annotated[list[str], NoDecode, BeforeValidator(comma_separated)] = Field(
        description="Topics a request's ``reply_to`` may name (shell-style patterns), besides the "
        "results topic: results go nowhere else, so a request cannot make the "
        "mediator write into another application's topics. A request naming any other "
        "is refused.",
        default_factory=lambda: ["*.results"],
    )

    max_child_depth: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="How deep child runs may nest (a child of a child... of a run). A `workflow` "
        "step whose child would be deeper fails with `child_depth_exceeded`; a cycle of "
        "workflows running each other is refused when the definitions load.",
    )

    def reply_to_allowed(self, topic: str, results: str) -> bool:
        """Whether a request may have its result published to `topic`."""
        return topic == results or any(fnmatch.fnmatchcase(topic, p) for p in self.reply_to_topics)

    @property
    def excerpt_bytes(self) -> int:
        """The excerpt a dead letter may carry: `dead_letter_excerpt_bytes`, but never so
        much that the dead letter (JSON-escaped, up to six bytes per byte, plus its other
        fields) would itself exceed `max_message_bytes` and be refused by the broker."""
        return min(self.dead_letter_excerpt_bytes, max(64, (self.max_message_bytes - 1024) // 6))


class BackoffSettings(BaseModel):
    """Capped exponential backoff for transient failures (Redis or Kafka unreachable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_ms: DurationMs = Field(
        default=500,
        ge=1,
        description="The first pause after a transient failure; each further one doubles it.",
    )
    max_ms: DurationMs = Field(
        default=30_000,
        ge=1,
        description="The longest pause between retries.",
    )

    def delay_ms(self, failures: int) -> int:
        """The pause after `failures` consecutive failures (1 = the first)."""
        return min(self.max_ms, self.initial_ms << min(max(failures - 1, 0), 30))


#: Duration settings' earlier names (in configurations that still use them).
_BREAKER_NAMES = {"recovery_timeout": "recovery_timeout_ms", "probe_timeout": "probe_timeout_ms"}


class BreakerPolicy(BaseModel):
    """When a service's circuit breaker opens and how long it stays open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        return renamed_durations(data, _BREAKER_NAMES)

    failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive failures (timeouts and retryable errors, counted across every "
        "replica) that open the breaker. Non-retryable business errors are not "
        "failures.",
    )
    recovery_timeout_ms: DurationMs = Field(
        default=60_000,
        ge=1,
        description="How long it stays open before one probe command is let through "
        "(cluster-wide).",
    )
    success_threshold: int = Field(
        default=1,
        ge=1,
        description="Successful probes needed to close it again.",
    )


class BreakerOverride(BaseModel):
    """One service's changes to the breaker policy (fields left out keep the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        return renamed_durations(data, _BREAKER_NAMES)

    failure_threshold: int | None = Field(default=None, ge=1)
    recovery_timeout_ms: DurationMs | None = Field(default=None, ge=1)
    success_threshold: int | None = Field(default=None, ge=1)


class BreakerSettings(BreakerPolicy):
    """Circuit breakers, one per service, shared by every replica through Redis."""

    enabled: bool = Field(
        default=True,
        description="Circuit breakers on (off: commands always go).",
    )
    services: dict[str, BreakerOverride] = Field(
        default_factory=dict,
        description="Per-service overrides of the policy fields, e.g. ``payments: "
        "{failure_threshold: 3}``.",
    )
    refresh_ms: DurationMs = Field(
        default=200,
        ge=10,
        description="How often a replica re-reads breaker states another replica may have changed.",
    )
    drain_rate: float = Field(
        default=50.0,
        gt=0,
        description="Parked commands released per second per service once its breaker closes.",
    )
    probe_timeout_ms: DurationMs = Field(
        default=30_000,
        ge=1,
        description="A probe that got no answer within this long (or its step's timeout) lets "
        "another go.",
    )

    def policy(self, service: str) -> BreakerPolicy:
        """The policy of `service`: the defaults with its overrides."""
        override = self.services.get(service)
        changes = override.model_dump(exclude_none=True) if override is not None else {}
        return BreakerPolicy.model_construct(
            failure_threshold=changes.get("failure_threshold", self.failure_threshold),
            recovery_timeout_ms=changes.get("recovery_timeout_ms", self.recovery_timeout_ms),
            success_threshold=changes.get("success_threshold", self.success_threshold),
        )


class DiscoverySettings(BaseModel):
    """The registry of service instances, fed by their heartbeats on the health topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _earlier_names(cls, data: Any) -> Any:
        return renamed_durations(
            data,
            {
                "after_loss": "after_loss_ms",
                "startup_grace": "startup_grace_ms",
                "forget_after": "forget_after_ms",
            },
        )

    enabled: bool = Field(
        default=True,
        description="The registry on: heartbeats applied, dead instances detected.",
    )
    missed_heartbeats: int = Field(
        default=2,
        ge=1,
        description="An instance is down once this many of its heartbeat intervals pass without "
        "one (its own interval, from its heartbeats). Two keeps a killed instance's "
        "work moving again within about three seconds at the SDK's default interval "
        "of one second.",
    )
    sweep_ms: DurationMs = Field(
        default=200,
        ge=10,
        description="Every replica sweeps for instances whose heartbeats stopped this often.",
    )
    grace_ms: DurationMs = Field(
        default=300,
        ge=0,
        description="Added to every instance's TTL (missed heartbeats x its interval): room for a "
        "heartbeat delayed in the broker or the network, so a live instance is not "
        "taken for dead.",
    )
    mark_ms: DurationMs = Field(
        default=500,
        ge=10,
        description="How often the replica holding the marking lease writes a marker into every "
        "partition of the health topic: silence is evidence of death only once the "
        "topic has been read past the instance's deadline (see "
        "`mediator.runtime.liveness`). A death is found about this much later than "
        "its deadline, at most.",
    )
    after_loss_ms: DurationMs = Field(
        default=10_000,
        ge=1,
        description="When Redis is found to have lost heartbeats it had taken (a failover "
        "promoted a replica that was behind: the health topic was read further than "
        "Redis remembers), no instance is marked down for this long, so every live "
        "one is heard from again.",
    )
    startup_grace_ms: DurationMs = Field(
        default=5_000,
        ge=1,
        description="Kept so configurations that set it still load; it has no effect. (It held "
        "sweeps back after a start and when every instance went quiet at once; the "
        "markers tell those stalls from deaths.)",
    )
    forget_after_ms: DurationMs = Field(
        default=600_000,
        ge=1,
        description="A down instance not heard from for this long is dropped from the registry.",
    )


class BalancePolicy(BaseModel):
    """How one service's commands are spread over its registered instances."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Strategy | None = Field(
        default=None,
        description="round_robin, weighted (by the weight each instance announces), least_loaded "
        "(in flight / capacity) or consistent_hash (session affinity on `key`).",
    )
    key: str | None = Field(
        default=None,
        description="For consistent_hash: a JMESPath expression over ``{payload, input, "
        "workflow}`` (the request's payload, the command's input, the run's "
        "id/request_id/name), e.g. ``payload.customer_id``. Commands with the same "
        "key go to the same instance while it is eligible.",
    )

    @field_validator("key")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_expression(value)
            except ExpressionError as exc:
                msg = f"load_balancing key {value!r} is not a JMESPath expression: {exc}"
                raise ValueError(msg) from None
        return value


class LoadBalancingSettings(BalancePolicy):
    """Routing commands to chosen instances of services that heartbeat (with
    ``discovery`` on); services that never heartbeat are served through their shared
    topic and consumer group whatever this says."""

    enabled: bool = Field(
        default=True,
        description="Commands to services that heartbeat go to instances the balancer picks (off: "
        "to their topic's consumer group).",
    )
    strategy: Strategy | None = Field(
        default=Strategy.LEAST_LOADED,
        description="The default strategy: least_loaded, round_robin, weighted or consistent_hash.",
    )
    services: dict[str, BalancePolicy] = Field(
        default_factory=dict,
        description="Per-service overrides, e.g. ``payments: {strategy: consistent_hash, key: "
        "...}``.",
    )

    @model_validator(mode="after")
    def _keys_given(self) -> LoadBalancingSettings:
        for service in ["", *self.services]:
            strategy, key = self.policy(service)
            if strategy is Strategy.CONSISTENT_HASH and key is None:
                where = f"service {service!r}" if service else "the default"
                msg = f"load_balancing ({where}): consistent_hash needs a `key`"
                raise ValueError(msg)
        return self

    def policy(self, service: str) -> tuple[Strategy, str | None]:
        """The strategy of `service` and its affinity key: its overrides, else the
        defaults."""
        override = self.services.get(service)
        strategy = (override.strategy if override else None) or self.strategy
        key = (override.key if override else None) or self.key
        return strategy or Strategy.LEAST_LOADED, key
