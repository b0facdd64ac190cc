"""Configuration: one frozen `Settings`, from environment variables and/or a YAML file.

Environment variables use the ``MEDIATOR_`` prefix and ``__`` for nesting, e.g.
``MEDIATOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``MEDIATOR_REDIS__URL=redis://r:6379/0``.
A YAML file (``--config FILE`` or ``MEDIATOR_CONFIG=FILE``) gives the same fields; the
environment wins over the file.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from mediator.codec import validation_reason
from mediator.core.alerts import Rule
from mediator.core.balancer import Strategy
from mediator.core.durations import parse_duration_ms
from mediator.core.expressions import ExpressionError, compile_expression
from mediator.core.signing import Keyring, Operator, Operators, Signatures, parse_keys
from mediator.errors import ConfigurationError
from mediator.kafka import KafkaConnection
from mediator.loops import EventLoop
from topics.names import DEFAULT_PREFIX, DEFAULT_SERVICE_PREFIX, Topics

__all__ = [
    "AlertThreshold",
    "AuditSettings",
    "BackoffSettings",
    "BreakerPolicy",
    "BreakerSettings",
    "DashboardSettings",
    "HttpSettings",
    "KafkaSettings",
    "LimitsSettings",
    "MonitoringSettings",
    "OutboxSettings",
    "RedisSettings",
    "Settings",
    "SigningSettings",
    "TimerSettings",
    "TracingSettings",
    "load_settings",
    "settings_document",
]


class KafkaSettings(KafkaConnection):
    """How to reach Kafka (addresses, TLS, SASL: `KafkaConnection`) and which topics to use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = "mediator"
    group_id: str = "mediator"
    topic_prefix: str = DEFAULT_PREFIX
    service_topic_prefix: str = DEFAULT_SERVICE_PREFIX
    # Apache Kafka supports the idempotent producer; the embedded Tansu broker does not
    # (it rejects InitProducerId), so `mediator dev` turns it off. Correctness never
    # depends on it: commands and results are deduplicated by id downstream.
    enable_idempotence: bool = True
    linger_ms: int = Field(default=1, ge=0)
    max_batch_records: int = Field(default=500, ge=1)
    partitions: int = Field(default=8, ge=1, description="Partitions for topics we create.")
    replication_factor: int = Field(default=1, ge=1, description="For topics we create.")
    # How long the broker may hold a fetch open when no data is there. Apache Kafka answers
    # as soon as data arrives, so a long wait costs nothing; Tansu waits it out, so the
    # embedded default uses a few milliseconds (each hop would otherwise cost ~the wait).
    fetch_max_wait_ms: int = Field(default=500, ge=0)
    # How long a subscriber's poll waits when nothing was fetched before it polls again.
    # Records fetched meanwhile end the wait at once, so this costs no latency.
    poll_timeout_ms: int = Field(default=500, ge=1)
    # Consumer-group liveness. A dead replica's partitions move after the session timeout;
    # Tansu also holds a JoinGroup reply for about half of it, which slows every start.
    session_timeout_ms: int = Field(default=10_000, ge=100)
    heartbeat_interval_ms: int = Field(default=3_000, ge=10)

    def consumer_options(self) -> dict[str, int]:
        """Options for any aiokafka consumer of this deployment (SDK workers included)."""
        return {
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
        }

    @property
    def topics(self) -> Topics:
        """The topic names these settings select."""
        return Topics(prefix=self.topic_prefix, service_prefix=self.service_topic_prefix)


class RedisSettings(BaseModel):
    """Where orchestration state lives and how it is laid out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``redis://`` or, for TLS, ``rediss://``. A password in it is never logged, but
    #: prefer `password` or `password_file`.
    url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    #: An ACL user and its password (Redis 6+), or the password of ``requirepass``.
    username: str | None = None
    password: SecretStr | None = None
    #: A file holding the password (a Docker or Kubernetes secret), instead of it.
    password_file: Path | None = None
    #: TLS (with a ``rediss://`` URL): the CA to trust, this client's certificate and key
    #: when the server asks for one, and whether the certificate must name the host.
    ssl_ca_certs: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    key_prefix: str = "med"
    shards: int = Field(default=16, ge=1, le=16384)
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    recent_limit: int = Field(default=1000, ge=1)
    # Without a timeout a stalled Redis would hang a handler forever; with one, the batch
    # is rewound and redelivered once Redis answers again.
    socket_timeout_s: float = Field(default=5.0, gt=0)
    # With Redis replicas: after each batch's commits, WAIT until this many replicas have
    # them before Kafka offsets move, so a failover cannot lose a transition whose input
    # was already acknowledged. 0 (the default) does not wait.
    wait_replicas: int = Field(default=0, ge=0)
    wait_timeout_ms: int = Field(default=1_000, ge=1)
    # A finished run's request fingerprint and status are kept this long after its state
    # expired, so a late duplicate is still recognised (and not run again).
    tombstone_s: float = Field(default=30 * 24 * 3600, ge=0)

    def client_options(self) -> dict[str, Any]:
        """redis-py's options for these settings: credentials and TLS (with the URL)."""
        options: dict[str, Any] = {}
        if self.password is not None and self.password_file is not None:
            msg = "give redis.password or redis.password_file, not both"
            raise ConfigurationError(msg)
        if self.username is not None:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password.get_secret_value()
        elif self.password_file is not None:
            try:
                options["password"] = self.password_file.read_text().strip()
            except OSError as exc:
                msg = f"redis.password_file: {exc}"
                raise ConfigurationError(msg) from exc
        tls = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
               "ssl_keyfile": self.ssl_keyfile}  # fmt: skip
        given = {name: path for name, path in tls.items() if path is not None}
        if given or not self.ssl_check_hostname:
            if not self.url.startswith("rediss://"):
                msg = "redis TLS settings need a rediss:// URL (redis.url)"
                raise ConfigurationError(msg)
            for name, path in given.items():
                if not path.is_file():
                    msg = f"redis.{name}: {path} is not a readable file"
                    raise ConfigurationError(msg)
                options[name] = str(path)
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options


class TimerSettings(BaseModel):
    """Durable timers (step timeouts, retries, workflow deadlines), kept in Redis."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Every replica polls for due timers this often: a timer fires at most this late
    # (plus the time to commit what it causes) when the replica is not busy.
    poll_interval_ms: int = Field(default=50, ge=5)
    # A claimed timer is the claimer's for this long; if it dies first (or a claim it gave
    # up on, say while Redis stalled, still ran), another replica fires it once this has
    # passed. Short is safe: a timer fired twice changes the state once (the revision
    # check), so this bounds how late a timer can be after such a failure.
    lease_ms: int = Field(default=2_000, ge=100)
    batch: int = Field(default=500, ge=1)


class OutboxSettings(BaseModel):
    """The at-least-once outbox that carries commands and results to Kafka."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lease_ms: int = Field(default=15_000, ge=100)
    sweep_interval_ms: int = Field(default=1_000, ge=10)
    sweep_batch: int = Field(default=500, ge=1)


class LimitsSettings(BaseModel):
    """Sizes the mediator enforces where messages enter and leave it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Apache Kafka's default `message.max.bytes` is 1 MiB plus a little. Applied to the
    # producer (max_request_size) and checked before anything enters the outbox: a command
    # or result that would not fit fails its step or run with `payload_too_large` instead
    # of jamming the outbox. Inbound records over it are refused the same way.
    max_message_bytes: int = Field(default=1_000_000, ge=1024)
    # A dead letter carries at most this much of the record it rejects (and the size of
    # the whole), so a dead letter never becomes a poison message itself.
    dead_letter_excerpt_bytes: int = Field(default=16_384, ge=256)
    #: Topics a request's ``reply_to`` may name (shell-style patterns), besides the results
    #: topic: results go nowhere else, so a request cannot make the mediator write into
    #: another application's topics. A request naming any other is refused.
    reply_to_topics: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*.results"])

    @field_validator("reply_to_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: a,b
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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

    initial_ms: int = Field(default=500, ge=1)
    max_ms: int = Field(default=30_000, ge=1)

    def delay_ms(self, failures: int) -> int:
        """The pause after `failures` consecutive failures (1 = the first)."""
        return min(self.max_ms, self.initial_ms << min(max(failures - 1, 0), 30))


def _millis(value: Any) -> Any:
    """A duration as written (``"60s"``, ``1.5``: seconds) in milliseconds."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        millis = parse_duration_ms(value)
        if millis is not None:
            return millis
    msg = f"{value!r} is not a duration (e.g. 60s, 500ms, 2m, or seconds as a number)"
    raise ValueError(msg)


#: A duration setting, held in milliseconds; written back (`model_dump`) as ``"<n>ms"``, so
#: a dumped configuration loads to the same values.
Millis = Annotated[
    int, BeforeValidator(_millis), PlainSerializer(lambda v: f"{v}ms", when_used="json")
]


class BreakerPolicy(BaseModel):
    """When a service's circuit breaker opens and how long it stays open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Consecutive failures (timeouts and retryable errors, counted across every replica)
    # that open the breaker. Non-retryable business errors are not failures.
    failure_threshold: int = Field(default=5, ge=1)
    # How long it stays open before one probe command is let through (cluster-wide).
    recovery_timeout: Millis = Field(
        default=60_000, description="Milliseconds (a duration string is accepted)."
    )
    # Successful probes needed to close it again.
    success_threshold: int = Field(default=1, ge=1)


class BreakerOverride(BaseModel):
    """One service's changes to the breaker policy (fields left out keep the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_threshold: int | None = Field(default=None, ge=1)
    recovery_timeout: Millis | None = None
    success_threshold: int | None = Field(default=None, ge=1)


class BreakerSettings(BreakerPolicy):
    """Circuit breakers, one per service, shared by every replica through Redis."""

    enabled: bool = True
    # Per-service overrides of the policy fields, e.g. ``payments: {failure_threshold: 3}``.
    services: dict[str, BreakerOverride] = Field(default_factory=dict)
    # How often a replica re-reads breaker states another replica may have changed.
    refresh_ms: int = Field(default=200, ge=10)
    # Parked commands released per second per service once its breaker closes.
    drain_rate: float = Field(default=50.0, gt=0)
    # A probe that got no answer within this long (or its step's timeout) lets another go.
    probe_timeout: Millis = Field(default=30_000)

    def policy(self, service: str) -> BreakerPolicy:
        """The policy of `service`: the defaults with its overrides."""
        override = self.services.get(service)
        changes = override.model_dump(exclude_none=True) if override is not None else {}
        return BreakerPolicy.model_construct(
            failure_threshold=changes.get("failure_threshold", self.failure_threshold),
            recovery_timeout=changes.get("recovery_timeout", self.recovery_timeout),
            success_threshold=changes.get("success_threshold", self.success_threshold),
        )


class DiscoverySettings(BaseModel):
    """The registry of service instances, fed by their heartbeats on the health topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # An instance is down once this many of its heartbeat intervals pass without one (its
    # own interval, from its heartbeats). Two keeps a killed instance's work moving again
    # within about three seconds at the SDK's default interval of one second.
    missed_heartbeats: int = Field(default=2, ge=1)
    # Every replica sweeps for instances whose heartbeats stopped this often.
    sweep_ms: int = Field(default=200, ge=10)
    # Added to every instance's TTL (missed heartbeats x its interval): room for a
    # heartbeat delayed in the broker or the network, so a live instance is not taken
    # for dead.
    grace_ms: int = Field(default=300, ge=0)
    # How often the replica holding the marking lease writes a marker into every
    # partition of the health topic: silence is evidence of death only once the topic has
    # been read past the instance's deadline (see `mediator.runtime.liveness`). A death is
    # found about this much later than its deadline, at most.
    mark_ms: int = Field(default=500, ge=10)
    # When Redis is found to have lost heartbeats it had taken (a failover promoted a
    # replica that was behind: the health topic was read further than Redis remembers),
    # no instance is marked down for this long, so every live one is heard from again.
    after_loss: Millis = Field(default=10_000)
    # Kept so configurations that set it still load; it has no effect. (It held sweeps
    # back after a start and when every instance went quiet at once; the markers tell
    # those stalls from deaths.)
    startup_grace: Millis = Field(default=5_000)
    # A down instance not heard from for this long is dropped from the registry.
    forget_after: Millis = Field(default=600_000)


def _fraction(value: Any) -> Any:
    """A share as written (``"5%"``, ``0.05``) as a fraction of one."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    msg = f"{value!r} is not a share (e.g. 5% or 0.05)"
    raise ValueError(msg)


class AlertThreshold(BaseModel):
    """One alert rule, evaluated per service over the alert window.

    ``response_time`` fires when the window's `percentile` (p95 by default) is above the
    threshold (a duration); ``error_rate`` and ``timeout_rate`` when that share of the
    commands answered or timed out is above it (``"5%"``); ``availability`` when the
    share of samples with an instance up is below it (``"99%"``; services that heartbeat).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: Literal["response_time", "error_rate", "timeout_rate", "availability"]
    threshold: str | float
    severity: Literal["info", "warning", "critical"] = "warning"
    percentile: float = Field(default=95, gt=0, le=100)
    # The services it applies to; empty: every service.
    services: list[str] = Field(default_factory=list)
    # Fewer answers than this in the window are too few to judge a rate or a percentile.
    min_samples: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _threshold_parses(self) -> AlertThreshold:
        self.limit  # noqa: B018 - raises on a threshold that does not parse
        return self

    @property
    def limit(self) -> float:
        """The threshold as a number: milliseconds, or a fraction of one."""
        if self.metric == "response_time":
            return float(_millis(self.threshold))
        return float(_fraction(self.threshold))

    def rule(self) -> Rule:
        """The rule the alert evaluator applies."""
        return Rule(
            self.metric,
            self.limit,
            self.severity,
            self.percentile,
            tuple(self.services),
            self.min_samples,
        )


def _default_thresholds() -> list[AlertThreshold]:
    return [
        AlertThreshold(metric="response_time", threshold="5s", severity="warning"),
        AlertThreshold(metric="error_rate", threshold="5%", severity="critical"),
        AlertThreshold(metric="availability", threshold="99%", severity="critical"),
    ]


class MonitoringSettings(BaseModel):
    """Service and workflow metrics kept in Redis, and the alerts evaluated over them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Width of one time bucket, and how long buckets are kept.
    bucket_s: int = Field(default=10, ge=1, le=3600)
    window: Millis = Field(default=24 * 3600 * 1000)
    # How often a replica writes what it tallied (one pipeline).
    flush_ms: int = Field(default=1_000, ge=10)
    # Alerts: evaluated by one replica at a time (a lease), this often, over this window.
    alerts: bool = True
    alert_interval: Millis = Field(default=5_000)
    alert_window: Millis = Field(default=60_000)
    alert_thresholds: list[AlertThreshold] = Field(default_factory=_default_thresholds)
    # Alert history kept in Redis (newest first).
    alert_history: int = Field(default=1_000, ge=1)


class AuditSettings(BaseModel):
    """The audit log of every run: each transition, in a capped Redis stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Entries kept per run (the oldest go first).
    max_entries: int = Field(default=200, ge=1)


class TracingSettings(BaseModel):
    """OpenTelemetry spans of runs and step attempts, exported by the replica (needs the
    ``otel`` extra). Trace context travels on the wire (W3C ``traceparent``) whether or
    not spans are exported."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    # "otlp": OTLP over HTTP to `endpoint` (else the standard OTEL_EXPORTER_OTLP_*
    # variables, default http://localhost:4318); "console": one JSON span per line on stdout.
    exporter: Literal["otlp", "console"] = "otlp"
    endpoint: str | None = None
    service_name: str = "mediator"


class GcSettings(BaseModel):
    """The replica's garbage collector. Python collects its youngest generation every 700
    allocations by default and walks everything older now and then; a replica holding
    thousands of runs' states spent a fifth of its CPU there at saturation. Tuned, it
    collects far less often (the engine's objects are freed by reference counting; only
    cycles wait for a collection)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tune: bool = True
    # gc.set_threshold(gen0, gen1, gen2): allocations between young collections, then
    # how many of each before the next older one.
    threshold: tuple[int, int, int] = (50_000, 20, 100)


class HttpSettings(BaseModel):
    """The replica's HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    # 0: any free port (logged at start).
    port: int = Field(default=9464, ge=0, le=65535)


class DashboardSettings(BaseModel):
    """Who may use the dashboard (`mediator dashboard`, and `mediator dev`'s)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The operator token every page and API call needs (HTTP Basic password, any user
    #: name, or ``Authorization: Bearer``), as is or as ``sha256:<hex>`` of it. Without
    #: one the dashboard listens on loopback only.
    token: SecretStr | None = None
    #: A file holding the token (a Docker or Kubernetes secret), instead of it.
    token_file: Path | None = None
    #: Host names the dashboard answers to (the ``Host`` header; a DNS-rebinding page
    #: names its own): loopback names, and the address it listens on, are always allowed.
    hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def secret(self) -> str | None:
        """The token (or its hash), from the setting or its file; None without one."""
        if self.token is not None and self.token_file is not None:
            msg = "give dashboard.token or dashboard.token_file, not both"
            raise ConfigurationError(msg)
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError as exc:
            msg = f"dashboard.token_file: {exc}"
            raise ConfigurationError(msg) from exc


class BalancePolicy(BaseModel):
    """How one service's commands are spread over its registered instances."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # round_robin, weighted (by the weight each instance announces), least_loaded (in
    # flight / capacity) or consistent_hash (session affinity on `key`).
    strategy: Strategy | None = None
    # For consistent_hash: a JMESPath expression over ``{payload, input, workflow}`` (the
    # request's payload, the command's input, the run's id/request_id/name), e.g.
    # ``payload.customer_id``. Commands with the same key go to the same instance while
    # it is eligible.
    key: str | None = None

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

    enabled: bool = True
    strategy: Strategy | None = Strategy.LEAST_LOADED
    # Per-service overrides, e.g. ``payments: {strategy: consistent_hash, key: ...}``.
    services: dict[str, BalancePolicy] = Field(default_factory=dict)

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


class KeySet(BaseModel):
    """Signing keys: id to secret (at least 16 characters); `current` signs (default: the
    first), all are accepted. Two at once let a key rotate without downtime."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    current: str | None = None
    #: A file holding the keys (``id=secret,...`` or a JSON object: a Docker or Kubernetes
    #: secret), read at start and added to `keys`.
    keys_file: Path | None = None

    @field_validator("keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        # From the environment: ``id=secret,id=secret`` or a JSON object.
        if isinstance(value, str):
            return {key.id: key.secret.decode() for key in parse_keys(value)}
        return value

    def revealed(self) -> dict[str, Any]:
        """As a JSON-ready dict with the secrets in it (a JSON dump shows them as stars)."""
        doc = self.model_dump(mode="json")
        doc["keys"] = {key_id: s.get_secret_value() for key_id, s in self.keys.items()}
        return doc

    def keyring(self, service: str | None = None) -> Keyring | None:
        """These keys as a keyring owned by `service` (None: shared); None when empty."""
        plain = {key_id: secret.get_secret_value() for key_id, secret in self.keys.items()}
        if self.keys_file is not None:
            try:
                text = self.keys_file.read_text().strip()
            except OSError as exc:
                msg = f"keys_file: {exc}"
                raise ValueError(msg) from exc
            plain |= {key.id: key.secret.decode() for key in parse_keys(text)}
        if not plain:
            return None
        return Keyring(parse_keys(plain, service), self.current)


_ACTIONS = ("cancel", "retry", "reset_breaker", "drain", "undrain")


class OperatorKeys(KeySet):
    """One operator's keys and what they may do (default: every control action)."""

    may: Annotated[list[Literal[_ACTIONS]], NoDecode] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(_ACTIONS)
    )

    @field_validator("may", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: cancel,retry
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class SigningSettings(KeySet):
    """HMAC-SHA256 signatures on commands, replies and heartbeats (see
    `mediator.core.signing`). On by default: the mediator refuses to start without keys
    unless ``enabled`` is false."""

    enabled: bool = True
    #: Per-service keys, e.g. ``payments: {keys: {pay-2: ..., pay-1: ...}, current: pay-2}``;
    #: a service without its own signs with the shared `keys`.
    services: dict[str, KeySet] = Field(default_factory=dict)
    #: Who may send controls: operator id -> their keys and the actions they may send,
    #: e.g. ``alice: {keys: {alice-1: ...}, may: [cancel, retry]}``. A control is applied
    #: only signed by one of these keys (with signing on and `controls` required).
    operators: dict[str, OperatorKeys] = Field(default_factory=dict)
    #: The operator this process (the CLI, the dashboard) sends controls as.
    operator: str | None = None
    #: ``required``: unsigned controls, and those of operators who may not send them, are
    #: dead-lettered; ``off``: controls are not checked (a closed network only).
    controls: Literal["required", "off"] = "required"
    #: How long after it was issued a control is accepted: a captured control published
    #: again later is refused.
    control_max_age_s: float = Field(default=300.0, gt=0)
    #: Clients whose signed requests are accepted: client id -> their keys. The id of the
    #: client whose key signed a request is kept with its run and in its audit log.
    clients: dict[str, KeySet] = Field(default_factory=dict)
    #: Requests: ``off`` (not checked), ``optional`` (a signed one must verify and is
    #: recorded as its client's; unsigned ones are taken) or ``required`` (unsigned ones are
    #: refused). Who may start workflows is otherwise up to Kafka ACLs.
    requests: Literal["off", "optional", "required"] = "off"
    #: The client this process (`mediator submit`) signs requests as.
    client: str | None = None
    #: Also sign over the value alone (``mediator-signature``) and accept records signed so:
    #: only while services that predate signatures over topic, key and value upgrade.
    legacy_signatures: bool = False

    @model_validator(mode="after")
    def _valid_keys(self) -> SigningSettings:
        self.signatures()
        self.operator_keys()
        self.client_keys()
        if self.client is not None and self.client not in self.clients:
            msg = f"signing.client {self.client!r} is not one of signing.clients"
            raise ValueError(msg)
        if self.operator is not None and self.operator not in self.operators:
            msg = f"signing.operator {self.operator!r} is not one of signing.operators"
            raise ValueError(msg)
        return self

    def operator_keys(self) -> Operators | None:
        """The operators whose controls are accepted; None when none are configured."""
        try:
            found = [
                Operator(name, ring, frozenset(keys.may))
                for name, keys in self.operators.items()
                if (ring := keys.keyring()) is not None
            ]
            if not found:
                return None
            return Operators(found, round(self.control_max_age_s * 1000))
        except ValueError as exc:
            msg = f"signing.operators: {exc}"
            raise ValueError(msg) from exc

    def client_keys(self) -> Keyring | None:
        """Every client's keys in one ring (each key owned by its client: `Key.service`);
        None when no client has keys."""
        try:
            keys = [
                key
                for name, keyset in self.clients.items()
                if (ring := keyset.keyring(name)) is not None
                for key in ring.keys
            ]
            return Keyring(keys) if keys else None
        except ValueError as exc:
            msg = f"signing.clients: {exc}"
            raise ValueError(msg) from exc

    def request_signer(self) -> Keyring | None:
        """The keys this process signs requests with (`client`); None: unsigned."""
        if not self.enabled or self.client is None:
            return None
        return self.clients[self.client].keyring(self.client)

    def control_signer(self) -> tuple[str, Keyring] | None:
        """Who this process sends controls as, and the keys it signs them with: the
        configured `operator`, else the only one configured; None when none can sign."""
        name = self.operator
        if name is None and len(self.operators) == 1:
            name = next(iter(self.operators))
        if name is None:
            return None
        ring = self.operators[name].keyring()
        return (name, ring) if ring is not None else None

    def signatures(self) -> Signatures | None:
        """Every key, for the mediator; None when no key is set."""
        try:
            services = {}
            for service, keys in self.services.items():
                ring = keys.keyring(service)
                if ring is not None:
                    services[service] = ring
            shared = self.keyring()
            if not (shared or services):
                return None
            return Signatures(shared, services, self.legacy_signatures)
        except ValueError as exc:
            msg = f"signing: {exc}"
            raise ValueError(msg) from exc

    def revealed(self) -> dict[str, Any]:
        doc = super().revealed()
        doc["services"] = {name: keys.revealed() for name, keys in self.services.items()}
        doc["operators"] = {name: keys.revealed() for name, keys in self.operators.items()}
        doc["clients"] = {name: keys.revealed() for name, keys in self.clients.items()}
        return doc

    def for_service(self, service: str) -> Keyring | None:
        """The keys a process serving `service` signs and verifies with."""
        signatures = self.signatures()
        return signatures.keyring(service) if signatures is not None else None


class Settings(BaseSettings):
    """Everything a mediator replica needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="MEDIATOR_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    outbox: OutboxSettings = OutboxSettings()
    timers: TimerSettings = TimerSettings()
    limits: LimitsSettings = LimitsSettings()
    backoff: BackoffSettings = BackoffSettings()
    circuit_breaker: BreakerSettings = BreakerSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    load_balancing: LoadBalancingSettings = LoadBalancingSettings()
    signing: SigningSettings = SigningSettings()
    service_monitoring: MonitoringSettings = MonitoringSettings()
    audit: AuditSettings = AuditSettings()
    http: HttpSettings = HttpSettings()
    dashboard: DashboardSettings = DashboardSettings()
    tracing: TracingSettings = TracingSettings()
    gc: GcSettings = GcSettings()
    workflows: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="YAML files or directories of workflow definitions "
        "(in the environment: separated by commas or the path separator).",
    )
    log_level: str = "INFO"
    # "text" for people, "json" (one object per line, with the run's fields) for pipelines.
    log_format: Literal["text", "json"] = "text"
    # The event loop of `mediator run`, `dev` and `demo-services` (mediator.loops): auto is
    # uvloop where it is installed, else asyncio's.
    event_loop: EventLoop = "auto"
    state_cache_size: int = Field(
        default=100_000, ge=0, description="Unfinished workflow states kept in memory (0: off)."
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level.isdigit() or level in logging.getLevelNamesMapping():
            return level
        msg = f"unknown log level {value!r}; use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        raise ValueError(msg)

    @field_validator("workflows", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = value.replace(os.pathsep, ",").split(",")
            return [part.strip() for part in parts if part.strip()]
        return value


def settings_document(settings: Settings) -> dict[str, Any]:
    """`settings` as a document `load_settings` reads back the same (secrets included):
    for a config file handed to another process."""
    doc = settings.model_dump(mode="json")
    doc["signing"] = settings.signing.revealed()
    return doc


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from a YAML file (optional), the environment, then explicit overrides."""
    path = config_file or (
        Path(os.environ["MEDIATOR_CONFIG"]) if "MEDIATOR_CONFIG" in os.environ else None
    )
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read config file {str(path)!r}: {exc}"
            raise ConfigurationError(msg) from exc
        if not isinstance(loaded, dict):
            msg = f"config file {str(path)!r} must hold a mapping of settings"
            raise ConfigurationError(msg)
        file_values = loaded
    try:
        env = Settings()
    except ValidationError as exc:
        msg = f"invalid MEDIATOR_* environment: {validation_reason(exc)}"
        raise ConfigurationError(msg) from exc
    except SettingsError as exc:
        msg = f"invalid MEDIATOR_* environment: {exc}".replace("\n", " ")
        raise ConfigurationError(msg) from exc
    merged = _deep_merge(file_values, env.model_dump(exclude_unset=True))
    merged = _deep_merge(merged, overrides)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        msg = f"invalid settings: {validation_reason(exc)}"
        raise ConfigurationError(msg) from exc
    settings.kafka.check()
    return settings


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
